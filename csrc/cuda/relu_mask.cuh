// Kernel bodies of ReLU with a 1-bit mask (see ../relu_mask.h for the semantics).
//
// Element e = 32*w + j is handled by lane j of the warp that handles mask word
// w, so a warp's ballot of its lanes' bits is the mask word itself and the
// warp's loads and stores are consecutive. Warps stride over the words by the
// number of warps in the grid; the loop bound is warp-uniform, so every lane
// reaches the ballot. Only the portability layer (simt.cuh) and the bitmap
// helpers are used, so the host SIMT layer runs this very source.
#pragma once

#include <cstdint>

#include "../relu_mask_math.h"
#include "bitmap.cuh"
#include "simt.cuh"

namespace dropit {
namespace relu_kernels {

// Launch shape (host side, shared by the launcher and the host SIMT tests):
// kThreads threads, one mask word per warp per step, at most kMaxBlocks blocks.
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

inline int64_t grid_for(int64_t n, int threads = kThreads, int64_t max_blocks = kMaxBlocks) {
  const int64_t words = (n + 31) / 32;
  const int64_t warps = threads / 32;
  const int64_t blocks = (words + warps - 1) / warps;
  return blocks < max_blocks ? blocks : max_blocks;
}

// First mask word of this warp and the stride between its words.
DROPIT_DEVICE int64_t first_word() {
  return simt::block_idx() * bitmap::num_warps() + bitmap::warp_id();
}
DROPIT_DEVICE int64_t word_stride() { return simt::grid_dim() * bitmap::num_warps(); }

// y = relu(x) (y may be x) and mask = one bit per element of n.
template <typename Bits>
DROPIT_DEVICE void relu_mask_forward_body(simt::gptr<const Bits> x, simt::gptr<Bits> y,
                                          simt::gptr<uint32_t> mask, int64_t n,
                                          Bits sign, Bits inf) {
  const int lane = bitmap::lane_id();
  const int64_t words = bitmap::words_for(n);
  for (int64_t w = first_word(); w < words; w += word_stride()) {
    const int64_t e = w * bitmap::kWarp + lane;
    bool bit = false;
    if (e < n) {
      const Bits v = x[e];
      bit = relu_mask_bit(v, sign, inf);
      y[e] = relu_value(v, sign, inf);
    }
    const uint32_t word = bitmap::ballot_word(bit);
    if (lane == 0) mask[w] = word;
  }
}

// out = bit ? grad : +0 for each of the n elements.
template <typename Bits>
DROPIT_DEVICE void relu_mask_backward_body(simt::gptr<const Bits> grad, simt::gptr<const uint32_t> mask,
                                           simt::gptr<Bits> out, int64_t n) {
  const int lane = bitmap::lane_id();
  const int64_t words = bitmap::words_for(n);
  for (int64_t w = first_word(); w < words; w += word_stride()) {
    const uint32_t word = mask[w];  // the same address in every lane: one broadcast load
    const int64_t e = w * bitmap::kWarp + lane;
    if (e < n) out[e] = ((word >> lane) & 1u) ? static_cast<Bits>(grad[e]) : static_cast<Bits>(0);
  }
}

}  // namespace relu_kernels
}  // namespace dropit
