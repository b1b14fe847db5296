// Kernel bodies of unpack: one thread block per chunk (grid-stride over chunks).
//
// Bitmap index: thread t loads a run of consecutive bitmap words (one coalesced pass over the
// chunk's words), popcounts give its count, one block scan gives each word's first value
// position; the words and positions go to shared memory, and the dense chunk is written 16
// bytes a lane (coalesced), each lane reading its few marked values (through the chunk's base
// pointers, computed once per chunk).
// Offsets index: the block zeroes its dense chunk (16 bytes a lane), then scatters the values.
//
// What a tampered index does (the CPU op raises on it; the CUDA op cannot without a host sync):
// whatever the index holds, these bodies read only the chunk's own values, bitmap words or offsets
// and write only the chunk's own dense elements -- never out of bounds. What the chunk gets:
//  - bitmap: the marked elements among the chunk's first L (bits past its length are ignored),
//    in index order, take the chunk's values in order; marked elements beyond the chunk's keep
//    count get +0 (a bitmap marking more than keep), values left over are unused (fewer);
//    unmarked elements are +0. Deterministic.
//  - offsets: every element is +0 except those named by an offset below the chunk's length L,
//    which hold the value of an offset naming them (offsets >= L are ignored). Order does not
//    matter; where offsets repeat, the element holds one of their values (which one is not
//    specified on a GPU).
#pragma once

#include <cstdint>

#include "../dropit.h"
#include "bitmap.cuh"
#include "launch_plan.h"
#include "simt.cuh"

namespace dropit {

// The barriers of the unpack bodies (see simt::BlockSync).
enum UnpackBarrier : int {
  kUnpackScanned = 1,  // inside the words' scan
  kWordsShared,        // the words and their positions, before the writers read them
  kZeroed,             // offsets: the zeros, before the values land
  kUnpackChunkDone,    // bitmap: every read of the chunk's words, before the next chunk's land
};

template <typename Bits>
struct UnpackParams : KernelGeometry {
  simt::gptr<const Bits> values;
  simt::gptr<const int32_t> bitmap;    // or null
  simt::gptr<const uint16_t> offsets;  // or null
  simt::gptr<Bits> out;
};

template <typename Bits>
inline UnpackParams<Bits> make_unpack_params(const ChunkGeometry& g, const Bits* values, const int32_t* bitmap,
                                             const uint16_t* offsets, Bits* out) {
  UnpackParams<Bits> p;
  static_cast<KernelGeometry&>(p) = kernel_geometry(g);
  p.values = simt::gptr<const Bits>(values);
  p.bitmap = simt::gptr<const int32_t>(bitmap);
  p.offsets = simt::gptr<const uint16_t>(offsets);
  p.out = simt::gptr<Bits>(out);
  return p;
}

// Threads per block for chunks of D: about one bitmap word per thread (multiples of 32, up to 1024),
// at least 64 (32 blocks of 64 fill an SM's 2048 threads; small chunks then pay their per-chunk
// scan and barriers on two warps, not four).
inline int unpack_threads(int64_t D) {
  const int64_t words = (D + 31) / 32;
  return words <= 64 ? 64 : (words <= 128 ? 128 : (words <= 256 ? 256 : (words <= 512 ? 512 : 1024)));
}

// Dynamic shared memory of the bitmap body: a word and the position of its first value, per word
// of a chunk (16 KB at D = 65536, within the 48 KB a launch gets without opting in; sized to the
// chunk, so that small chunks leave room for many blocks per SM). The offsets body takes none.
inline LaunchPlan plan_unpack(const ChunkGeometry& g, bool bitmap, int threads = 0) {
  return launch_plan(g.num_chunks, 1, threads > 0 ? threads : unpack_threads(g.chunk),
                     bitmap ? 2 * sizeof(uint32_t) * static_cast<size_t>(g.words) : 0);
}

namespace kernels {

// Needs 2 * words * 4 bytes of dynamic shared memory (plan_unpack).
template <typename Bits, typename Sync = simt::BlockSync>
DROPIT_DEVICE void unpack_bitmap_block(const UnpackParams<Bits>& p, Sync sync = Sync()) {
  constexpr int V = simt::kVec16<Bits>;  // elements per 16-byte store; 32 % V == 0
  const simt::sptr<uint32_t> words = simt::dynamic_shared<uint32_t>();
  DROPIT_SHARED(uint32_t, slots, 32);
  const int tid = simt::thread_idx();
  const int nthreads = simt::block_dim();
  for (int64_t c = simt::block_idx(); c < p.num_chunks; c += simt::grid_dim()) {
    const int L = p.chunk_len(c);
    const int k = p.chunk_keep(c);
    const simt::gptr<const Bits> vc = simt::pinned(p.values + c * static_cast<int64_t>(p.keep));
    const simt::gptr<const int32_t> wc = simt::pinned(p.bitmap + c * static_cast<int64_t>(p.words));
    const simt::gptr<Bits> oc = simt::pinned(p.out + c * static_cast<int64_t>(p.chunk));
    const int used_words = (L + 31) >> 5;
    // Thread t: words [t*R, t*R + R), bits past the chunk's length cleared.
    const int per_thread = (used_words + nthreads - 1) / nthreads;
    const int t_begin = tid * per_thread < used_words ? tid * per_thread : used_words;
    const int t_end = t_begin + per_thread < used_words ? t_begin + per_thread : used_words;
    uint32_t count = 0;
    for (int w = t_begin; w < t_end; ++w) {
      const uint32_t word = static_cast<uint32_t>(static_cast<int32_t>(wc[w])) & bitmap::low_bits(L - 32 * w);
      words[2 * w] = word;
      count += static_cast<uint32_t>(simt::popc(word));
    }
    uint32_t total = 0;
    uint32_t pos = bitmap::block_exclusive_scan<uint32_t>(count, slots, &total, [&] { sync(kUnpackScanned); });
    for (int w = t_begin; w < t_end; ++w) {
      words[2 * w + 1] = pos;
      pos += static_cast<uint32_t>(simt::popc(words[2 * w]));
    }
    sync(kWordsShared);
    // Each lane writes V consecutive elements (one word's bits), coalesced across the warp.
    const int nvec = simt::address(oc) % 16 == 0 ? L / V : 0;
    for (int i = tid; i < nvec; i += nthreads) {
      const int e0 = i * V;
      const simt::Vec<uint32_t, 2> wp = simt::load_vec<2>(words + 2 * (e0 >> 5));
      const int bit0 = e0 & 31;
      const uint32_t marked = (wp.v[0] >> bit0) & ((1u << V) - 1u);
      // The group's marked elements take the values from `first` on, as far as the chunk has them.
      const uint32_t first = wp.v[1] + static_cast<uint32_t>(simt::popc(wp.v[0] & bitmap::low_bits(bit0)));
      simt::Vec<Bits, V> out;
      uint32_t pos = first;
DROPIT_UNROLL
      for (int j = 0; j < V; ++j) {
        const bool m = (marked >> j) & 1u;
        out.v[j] = m && pos < static_cast<uint32_t>(k) ? static_cast<Bits>(vc[pos]) : Bits(0);
        pos += m ? 1u : 0u;
      }
      simt::store_vec(oc + e0, out);
    }
    for (int e = nvec * V + tid; e < L; e += nthreads) {
      const simt::Vec<uint32_t, 2> wp = simt::load_vec<2>(words + 2 * (e >> 5));
      const uint32_t p0 = wp.v[1] + static_cast<uint32_t>(simt::popc(wp.v[0] & bitmap::low_bits(e & 31)));
      const bool marked = (wp.v[0] >> (e & 31)) & 1u;
      oc[e] = marked && p0 < static_cast<uint32_t>(k) ? static_cast<Bits>(vc[p0]) : Bits(0);
    }
    sync(kUnpackChunkDone);
  }
}

template <typename Bits, typename Sync = simt::BlockSync>
DROPIT_DEVICE void unpack_offsets_block(const UnpackParams<Bits>& p, Sync sync = Sync()) {
  constexpr int V = simt::kVec16<Bits>;
  const int tid = simt::thread_idx();
  const int nthreads = simt::block_dim();
  for (int64_t c = simt::block_idx(); c < p.num_chunks; c += simt::grid_dim()) {
    const int L = p.chunk_len(c);
    const int k = p.chunk_keep(c);
    const simt::gptr<const Bits> vc = p.values + c * static_cast<int64_t>(p.keep);
    const simt::gptr<const uint16_t> ofs = p.offsets + c * static_cast<int64_t>(p.keep);
    const simt::gptr<Bits> oc = p.out + c * static_cast<int64_t>(p.chunk);
    const int nvec = simt::address(oc) % 16 == 0 ? L / V : 0;
    for (int i = tid; i < nvec; i += nthreads) simt::store_vec(oc + i * V, simt::Vec<Bits, V>{});
    for (int e = nvec * V + tid; e < L; e += nthreads) oc[e] = Bits(0);
    sync(kZeroed);
    for (int r = tid; r < k; r += nthreads) {
      const int o = static_cast<uint16_t>(ofs[r]);
      if (o < L) oc[o] = static_cast<Bits>(vc[r]);
    }
  }
}

}  // namespace kernels
}  // namespace dropit
