// Kernel bodies of ReLU with a 1-bit mask (see ../relu_mask.h for the semantics).
//
// Element e = 32*w + j is handled by lane j of the warp that handles mask word
// w, so a warp's ballot of its lanes' bits is the mask word itself and the
// warp's loads and stores are consecutive. A warp takes kWordsPerStep
// consecutive words per step (their loads are independent, so they are in
// flight together, and lane 0 stores the words with one 16-byte store), and
// warps stride over these groups by the number of warps in the grid; the loop
// bounds are warp-uniform, so every lane reaches the ballots. Only the
// portability layer (simt.cuh) and the bitmap helpers are used, so the host
// SIMT layer runs this very source.
#pragma once

#include <cstdint>

#include "../relu_mask_math.h"
#include "bitmap.cuh"
#include "launch_plan.h"
#include "simt.cuh"

namespace dropit {
namespace relu_kernels {

constexpr int kThreads = 256;
constexpr int kWordsPerStep = 4;  // mask words a warp handles per step
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// Launch shape (host side, shared by the launcher and the host SIMT tests).
inline LaunchPlan plan_relu_mask(int64_t n, int threads = kThreads, int64_t max_blocks = kMaxBlocks) {
  const int64_t words = (n + 31) / 32;
  return launch_plan((words + kWordsPerStep - 1) / kWordsPerStep, threads / 32, threads, 0, max_blocks);
}

// First word group of this warp and the stride between its groups.
DROPIT_DEVICE int64_t first_group() {
  return simt::block_idx() * bitmap::num_warps() + bitmap::warp_id();
}
DROPIT_DEVICE int64_t group_stride() { return simt::grid_dim() * bitmap::num_warps(); }

// y = relu(x) (y may be x) and mask = one bit per element of n.
template <typename Bits>
DROPIT_DEVICE void relu_mask_forward_body(simt::gptr<const Bits> x, simt::gptr<Bits> y, simt::gptr<uint32_t> mask,
                                          int64_t n, Bits sign, Bits inf) {
  const int lane = bitmap::lane_id();
  const int64_t words = bitmap::words_for(n);
  const int64_t groups = (words + kWordsPerStep - 1) / kWordsPerStep;
  const bool aligned = simt::address(mask) % 16 == 0;
  for (int64_t g = first_group(); g < groups; g += group_stride()) {
    const int64_t w0 = g * kWordsPerStep;
    Bits v[kWordsPerStep];
DROPIT_UNROLL
    for (int u = 0; u < kWordsPerStep; ++u) {
      const int64_t e = (w0 + u) * bitmap::kWarp + lane;
      v[u] = e < n ? static_cast<Bits>(x[e]) : Bits(0);
    }
    simt::Vec<uint32_t, kWordsPerStep> word{};
DROPIT_UNROLL
    for (int u = 0; u < kWordsPerStep; ++u) {
      const int64_t e = (w0 + u) * bitmap::kWarp + lane;
      if (e < n) y[e] = relu_value(v[u], sign, inf);
      if (w0 + u < words) word.v[u] = bitmap::ballot_word(e < n && relu_mask_bit(v[u], sign, inf));
    }
    if (lane == 0) {
      if (aligned && w0 + kWordsPerStep <= words) {
        simt::store_vec(mask + w0, word);
      } else {
        for (int u = 0; u < kWordsPerStep && w0 + u < words; ++u) mask[w0 + u] = word.v[u];
      }
    }
  }
}

// out = bit ? grad : +0 for each of the n elements.
template <typename Bits>
DROPIT_DEVICE void relu_mask_backward_body(simt::gptr<const Bits> grad, simt::gptr<const uint32_t> mask,
                                           simt::gptr<Bits> out, int64_t n) {
  const int lane = bitmap::lane_id();
  const int64_t words = bitmap::words_for(n);
  const int64_t groups = (words + kWordsPerStep - 1) / kWordsPerStep;
  const bool aligned = simt::address(mask) % 16 == 0;
  for (int64_t g = first_group(); g < groups; g += group_stride()) {
    const int64_t w0 = g * kWordsPerStep;
    // The same words in every lane: one broadcast load.
    simt::Vec<uint32_t, kWordsPerStep> word{};
    if (aligned && w0 + kWordsPerStep <= words) {
      word = simt::load_vec<kWordsPerStep>(mask + w0);
    } else {
      for (int u = 0; u < kWordsPerStep && w0 + u < words; ++u) word.v[u] = mask[w0 + u];
    }
DROPIT_UNROLL
    for (int u = 0; u < kWordsPerStep; ++u) {
      const int64_t e = (w0 + u) * bitmap::kWarp + lane;
      if (e < n) out[e] = ((word.v[u] >> lane) & 1u) ? static_cast<Bits>(grad[e]) : Bits(0);
    }
  }
}

}  // namespace relu_kernels
}  // namespace dropit
