// Kernel bodies of unpack: one thread block per chunk (grid-stride over chunks).
//
// Bitmap index: in tiles of 32*kUnpackItems elements per warp, each lane reads
// its element's word, popcounts and a block-wide scan of the per-warp counts
// give the position of its value; every element of the dense chunk is written
// once, coalesced (dropped ones as 0).
// Offsets index: the block zeroes its dense chunk, then scatters the values.
//
// A corrupt index (the CPU op raises on it) can't make these bodies read or
// write outside their chunk: positions past keep and offsets past the chunk's
// length are ignored.
#pragma once

#include <cstdint>

#include "../dropit.h"
#include "bitmap.cuh"
#include "simt.cuh"

#ifndef DROPIT_KERNEL_NS
#define DROPIT_KERNEL_NS kernels
#endif

namespace dropit {

#ifndef DROPIT_UNPACK_COMMON_DEFINED
#define DROPIT_UNPACK_COMMON_DEFINED

constexpr int kUnpackItems = 4;  // bitmap words per warp per tile

template <typename Bits>
struct UnpackParams : KernelGeometry {
  simt::gptr<const Bits> values;
  simt::gptr<const int32_t> bitmap;    // or null
  simt::gptr<const uint16_t> offsets;  // or null
  simt::gptr<Bits> out;
};

template <typename Bits>
inline UnpackParams<Bits> make_unpack_params(const ChunkGeometry& g, const Bits* values,
                                             const int32_t* bitmap, const uint16_t* offsets,
                                             Bits* out) {
  UnpackParams<Bits> p;
  static_cast<KernelGeometry&>(p) = kernel_geometry(g);
  p.values = simt::gptr<const Bits>(values);
  p.bitmap = simt::gptr<const int32_t>(bitmap);
  p.offsets = simt::gptr<const uint16_t>(offsets);
  p.out = simt::gptr<Bits>(out);
  return p;
}

// Threads per block for chunks of D (multiples of 32, up to 1024).
inline int unpack_threads(int64_t D) { return D <= 1024 ? 128 : (D <= 4096 ? 256 : (D <= 8192 ? 512 : 1024)); }

#endif  // DROPIT_UNPACK_COMMON_DEFINED

namespace DROPIT_KERNEL_NS {

template <typename Bits>
DROPIT_DEVICE void unpack_bitmap_block(const UnpackParams<Bits>& p) {
  DROPIT_SHARED(uint32_t, scan_slots, 2 * 32);  // two alternating buffers
  const int nthreads = simt::block_dim();
  const int lane = bitmap::lane_id();
  const int warp = bitmap::warp_id();
  const uint32_t lt = bitmap::lanemask_lt();
  const int tile = nthreads * kUnpackItems;
  int parity = 0;
  for (int64_t c = simt::block_idx(); c < p.num_chunks; c += simt::grid_dim()) {
    const int L = p.chunk_len(c);
    const int k = p.chunk_keep(c);
    const simt::gptr<const Bits> vc = p.values + c * static_cast<int64_t>(p.keep);
    const simt::gptr<const int32_t> wc = p.bitmap + c * static_cast<int64_t>(p.words);
    const simt::gptr<Bits> oc = p.out + c * static_cast<int64_t>(p.chunk);
    const int used_words = (L + 31) >> 5;
    int run = 0;  // values taken by the tiles before this one
    for (int base = 0; base < L; base += tile) {
      uint32_t w[kUnpackItems];
      uint32_t n = 0;
#pragma unroll
      for (int j = 0; j < kUnpackItems; ++j) {
        const int word = (base >> 5) + warp * kUnpackItems + j;
        w[j] = word < used_words ? static_cast<uint32_t>(wc[word]) : 0u;
        n += static_cast<uint32_t>(simt::popc(w[j]));
      }
      uint32_t total = 0;
      const uint32_t before =
          bitmap::block_exclusive_scan_warp_counts(n, scan_slots + 32 * parity, &total);
      parity ^= 1;
      int pos0 = run + static_cast<int>(before);
#pragma unroll
      for (int j = 0; j < kUnpackItems; ++j) {
        const int e = base + (warp * kUnpackItems + j) * 32 + lane;
        if (e < L) {
          const int pos = pos0 + simt::popc(w[j] & lt);
          const bool kept = ((w[j] >> lane) & 1u) && static_cast<unsigned>(pos) < static_cast<unsigned>(k);
          oc[e] = kept ? static_cast<Bits>(vc[pos]) : static_cast<Bits>(0);
        }
        pos0 += simt::popc(w[j]);
      }
      run += static_cast<int>(total);
    }
  }
}

template <typename Bits>
DROPIT_DEVICE void unpack_offsets_block(const UnpackParams<Bits>& p) {
  const int tid = simt::thread_idx();
  const int nthreads = simt::block_dim();
  for (int64_t c = simt::block_idx(); c < p.num_chunks; c += simt::grid_dim()) {
    const int L = p.chunk_len(c);
    const int k = p.chunk_keep(c);
    const simt::gptr<const Bits> vc = p.values + c * static_cast<int64_t>(p.keep);
    const simt::gptr<const uint16_t> ofs = p.offsets + c * static_cast<int64_t>(p.keep);
    const simt::gptr<Bits> oc = p.out + c * static_cast<int64_t>(p.chunk);
    for (int e = tid; e < L; e += nthreads) oc[e] = static_cast<Bits>(0);
    simt::sync();  // the zeros land before the values
    for (int r = tid; r < k; r += nthreads) {
      const int o = ofs[r];
      if (o < L) oc[o] = static_cast<Bits>(vc[r]);
    }
    simt::sync();
  }
}

}  // namespace DROPIT_KERNEL_NS
}  // namespace dropit
