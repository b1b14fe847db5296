// Kernel body of pack: one thread block per chunk (grid-stride over chunks).
//
//  1. Radix select of the keep-th largest key with 8-bit digits, most
//     significant first: a shared histogram of the digit among the keys that
//     match the prefix found so far, then a block scan over the 256 bins picks
//     the digit. It stops early once the selected bucket is kept whole.
//  2. One ordered compaction in tiles of 32*kPackItems elements per warp:
//     warp ballots of "key above the threshold" and "key equal to it" give the
//     bitmap words, popcounts and a block-wide scan give each kept value's
//     position and each tie's rank (ties go to the lower index).
//
// The keys are bit patterns (uint16/32/64): the magnitude key of the value or
// the random key of its global index, so one body serves every floating dtype.
// Only the portability layer (simt.cuh) is used: the host SIMT layer runs this
// very source in the tests.
#pragma once

#include <cstdint>

#include "../dropit.h"
#include "bitmap.cuh"
#include "simt.cuh"

// The test-only variants compile this header again in their own namespace with
// one barrier left out (1: after the histogram, 2: in the digit scan).
#ifndef DROPIT_KERNEL_NS
#define DROPIT_KERNEL_NS kernels
#endif
#ifndef DROPIT_TEST_DROP_BARRIER
#define DROPIT_TEST_DROP_BARRIER 0
#endif

namespace dropit {

#ifndef DROPIT_PACK_COMMON_DEFINED
#define DROPIT_PACK_COMMON_DEFINED

// Where the radix passes take the keys from.
enum class KeySource : int {
  kSharedBits = 0,  // the chunk's bit patterns are loaded into shared memory once
  kGlobalBits = 1,  // chunks too big for shared memory: every pass re-reads global memory
  kRandom = 2,      // random keys, computed from the global index (no reads at all)
};

constexpr int kPackItems = 4;   // bitmap words per warp per compaction tile
constexpr int kHistCopies = 4;  // histogram copies (spread the shared atomics of a bin)
constexpr int kLoadAhead = 4;   // global loads in flight per thread in the first radix pass
constexpr int kRadixBins = 256;
constexpr int kMinThreads = 256;  // the digit scan uses one thread per bin
constexpr int kMaxThreads = 1024;

// Everything a pack launch needs; int64 where a product can pass 2^31.
template <typename Bits>
struct PackParams : KernelGeometry {
  simt::gptr<const Bits> x;
  simt::gptr<Bits> values;
  simt::gptr<int32_t> bitmap;    // ceil(D/32) words per chunk, or null
  simt::gptr<uint16_t> offsets;  // aligned with values, or null
  uint64_t seed;      // random keys only
};

template <typename Bits>
inline PackParams<Bits> make_pack_params(const ChunkGeometry& g, const Bits* x, Bits* values,
                                         int32_t* bitmap, uint16_t* offsets, uint64_t seed) {
  PackParams<Bits> p;
  static_cast<KernelGeometry&>(p) = kernel_geometry(g);
  p.x = simt::gptr<const Bits>(x);
  p.values = simt::gptr<Bits>(values);
  p.bitmap = simt::gptr<int32_t>(bitmap);
  p.offsets = simt::gptr<uint16_t>(offsets);
  p.seed = seed;
  return p;
}

// Static shared memory of the pack body (bytes), for the launch plan.
constexpr size_t kPackStaticSmem = sizeof(uint32_t) * (kHistCopies * kRadixBins + 2 * 32 + 8 + 4);

// Threads per block for chunks of D. At ~56 registers a thread, 1024-thread
// blocks would fill an SM's register file alone; two 512-thread blocks per SM
// let one block's barriers and scans overlap the other's loads.
inline int pack_threads(int64_t D) { return D <= 4096 ? 256 : 512; }

struct PackPlan {
  int threads;
  KeySource source;
  size_t dynamic_smem;  // bytes
  int64_t grid;
};

// `smem_limit`: the most shared memory (static + dynamic) a block may use on
// the device (its opt-in maximum). Magnitude keys are staged in shared memory
// when the chunk fits, else read from global memory on every pass.
inline PackPlan plan_pack(const ChunkGeometry& g, int elem_bytes, bool random, size_t smem_limit,
                          int threads = 0) {
  PackPlan plan;
  plan.threads = threads > 0 ? threads : pack_threads(g.chunk);
  const size_t staged = static_cast<size_t>(g.chunk) * static_cast<size_t>(elem_bytes);
  if (random) {
    plan.source = KeySource::kRandom;
    plan.dynamic_smem = 0;
  } else if (staged + kPackStaticSmem <= smem_limit) {
    plan.source = KeySource::kSharedBits;
    plan.dynamic_smem = staged;
  } else {
    plan.source = KeySource::kGlobalBits;
    plan.dynamic_smem = 0;
  }
  const int64_t max_grid = 2147483647;
  plan.grid = g.num_chunks < max_grid ? g.num_chunks : max_grid;
  return plan;
}

#endif  // DROPIT_PACK_COMMON_DEFINED

namespace DROPIT_KERNEL_NS {

template <typename Bits, typename Key, KeySource Src>
DROPIT_DEVICE Key pack_key(Bits bits, uint64_t seed, int64_t global_index) {
  if constexpr (Src == KeySource::kRandom) {
    return random_key(seed, static_cast<uint64_t>(global_index));
  } else {
    return magnitude_key<Bits>(bits);
  }
}

// The body of the pack kernel. Key is Bits for magnitude keys, uint32_t for
// random keys. Needs blockDim.x a multiple of 32 in [256, 1024] and, for
// kSharedBits, chunk * sizeof(Bits) bytes of dynamic shared memory.
template <typename Bits, typename Key, KeySource Src>
DROPIT_DEVICE void pack_block(const PackParams<Bits>& p) {
  // Significant key bits: a magnitude key's top bit (the sign) is always 0, so
  // its first digit starts below it: for float32 the first digit is the whole
  // exponent. The last digit may overlap the one before (e.g. 31 = 8+8+8+7
  // bits); the overlapping bit is already fixed by the prefix, which is harmless.
  constexpr int kKeyBits = static_cast<int>(sizeof(Key) * 8) - (Src == KeySource::kRandom ? 0 : 1);
  constexpr int kPasses = (kKeyBits + 7) / 8;
  DROPIT_SHARED(uint32_t, hist, kHistCopies * kRadixBins);
  DROPIT_SHARED(uint32_t, scan_slots, 2 * 32);  // two alternating buffers
  DROPIT_SHARED(uint32_t, bin_sums, 8);         // per-warp sums of the digit scan
  DROPIT_SHARED(uint32_t, sel, 4);              // digit, count above it, its bucket's count
  simt::sptr<Bits> staged = nullptr;
  if constexpr (Src == KeySource::kSharedBits) staged = simt::dynamic_shared<Bits>();

  const int tid = simt::thread_idx();
  const int nthreads = simt::block_dim();
  const int lane = bitmap::lane_id();
  const int warp = bitmap::warp_id();
  const uint32_t lt = bitmap::lanemask_lt();
  const int tile = nthreads * kPackItems;
  int parity = 0;

  for (int64_t c = simt::block_idx(); c < p.num_chunks; c += simt::grid_dim()) {
    const int L = p.chunk_len(c);
    const int k = p.chunk_keep(c);
    const int64_t xbase = c * static_cast<int64_t>(p.chunk);
    const simt::gptr<const Bits> xc = p.x + xbase;
    const simt::gptr<Bits> vc = p.values + c * static_cast<int64_t>(p.keep);
    const simt::gptr<uint16_t> oc = p.offsets ? p.offsets + c * static_cast<int64_t>(p.keep) : nullptr;
    const simt::gptr<int32_t> wc = p.bitmap ? p.bitmap + c * static_cast<int64_t>(p.words) : nullptr;

    if (k == L) {  // everything is kept (gamma small or the chunk tiny)
      for (int e = tid; e < L; e += nthreads) {
        vc[e] = xc[e];
        if (oc) oc[e] = static_cast<uint16_t>(e);
      }
      if (wc) {
        for (int w = tid; w < p.words; w += nthreads)
          wc[w] = static_cast<int32_t>(bitmap::low_bits(static_cast<int64_t>(L) - 32 * w));
      }
      simt::sync();
      continue;
    }

    // ---- 1. radix select: the keep-th largest key, 8 bits at a time ----
    Key prefix = 0;  // digits found so far, in place
    int shift = kKeyBits;  // low bit of the current digit
    int need = k;  // how many to keep among the keys that match the prefix
    for (int pass = 0; pass < kPasses; ++pass) {
      const int high = shift;  // bits from `high` up are fixed by the prefix
      shift = shift > 8 ? shift - 8 : 0;
      for (int i = tid; i < kHistCopies * kRadixBins; i += nthreads) hist[i] = 0u;
      simt::sync();
      const simt::sptr<uint32_t> h = hist + (warp % kHistCopies) * kRadixBins;
      if (pass == 0) {
        // Every key counts. Magnitude keys crowd into a few top digits (the
        // exponent), so the lanes of a warp that share a bin add once
        // (match_any). Loads are issued kLoadAhead at a time, in warp-uniform
        // steps.
        for (int i0 = tid - lane; i0 < L; i0 += nthreads * kLoadAhead) {
          Bits b[kLoadAhead];
#pragma unroll
          for (int u = 0; u < kLoadAhead; ++u) {
            const int i = i0 + u * nthreads + lane;
            b[u] = 0;
            if constexpr (Src != KeySource::kRandom) {
              if (i < L) b[u] = xc[i];
            }
          }
#pragma unroll
          for (int u = 0; u < kLoadAhead; ++u) {
            const int i = i0 + u * nthreads + lane;
            const bool in = i < L;
            if constexpr (Src == KeySource::kSharedBits) {
              if (in) staged[i] = b[u];
            }
            const uint32_t bin =
                static_cast<uint32_t>(pack_key<Bits, Key, Src>(b[u], p.seed, xbase + i) >> shift) & 0xffu;
            if constexpr (Src == KeySource::kRandom) {
              if (in) simt::atomic_add_shared(h + bin, 1u);
            } else {
              const uint32_t peers = simt::match_any(in ? bin : 0x100u);
              if (in && lane == simt::ffs(peers) - 1)
                simt::atomic_add_shared(h + bin, static_cast<uint32_t>(simt::popc(peers)));
            }
          }
        }
      } else {
        // Only the keys that match the prefix count: few, spread over the bins.
        for (int i = tid; i < L; i += nthreads) {
          Bits bits = 0;
          if constexpr (Src == KeySource::kSharedBits) {
            bits = staged[i];
          } else if constexpr (Src == KeySource::kGlobalBits) {
            bits = xc[i];
          }
          const Key key = pack_key<Bits, Key, Src>(bits, p.seed, xbase + i);
          if (static_cast<Key>(key >> high) == static_cast<Key>(prefix >> high))
            simt::atomic_add_shared(h + ((key >> shift) & 0xff), 1u);
        }
      }
#if DROPIT_TEST_DROP_BARRIER != 1
      simt::sync();
#endif
      // Suffix sums over the bins (thread t holds bin 255 - t): the digit is
      // the bin whose suffix sum first reaches `need`.
      uint32_t cnt = 0, inc = 0;
      if (tid < kRadixBins) {
        const int b = kRadixBins - 1 - tid;
        for (int cp = 0; cp < kHistCopies; ++cp) cnt += hist[cp * kRadixBins + b];
        inc = bitmap::warp_inclusive_scan(cnt);
        if (lane == 31) bin_sums[warp] = inc;
      }
#if DROPIT_TEST_DROP_BARRIER != 2
      simt::sync();
#endif
      if (tid < kRadixBins) {
        for (int w = 0; w < warp; ++w) inc += bin_sums[w];
        const uint32_t want = static_cast<uint32_t>(need);
        if (inc >= want && inc - cnt < want) {
          sel[0] = static_cast<uint32_t>(kRadixBins - 1 - tid);
          sel[1] = inc - cnt;
          sel[2] = cnt;
        }
      }
      simt::sync();
      need -= static_cast<int>(sel[1]);
      prefix = static_cast<Key>(prefix | (static_cast<Key>(sel[0]) << shift));
      if (static_cast<int>(sel[2]) == need) break;  // the whole bucket is kept
    }

    // ---- 2. ordered compaction ----
    // Key k is kept if k >> shift > thi, or == thi and fewer than `need`
    // equal keys come before it.
    const Key thi = static_cast<Key>(prefix >> shift);
    const int used_words = (L + 31) >> 5;
    int run_above = 0, run_ties = 0;  // over the tiles before this one
    for (int base = 0; base < L; base += tile) {
      Bits v[kPackItems];
      uint32_t above_w[kPackItems], tie_w[kPackItems];
      uint32_t n_above = 0, n_ties = 0;
#pragma unroll
      for (int j = 0; j < kPackItems; ++j) {
        const int e = base + (warp * kPackItems + j) * 32 + lane;
        const bool in = e < L;
        Bits bits = 0;
        Key hi = 0;
        if (in) {
          if constexpr (Src == KeySource::kSharedBits) {
            bits = staged[e];
          } else {
            bits = xc[e];
          }
          hi = static_cast<Key>(pack_key<Bits, Key, Src>(bits, p.seed, xbase + e) >> shift);
        }
        v[j] = bits;
        above_w[j] = simt::ballot(in && hi > thi);
        tie_w[j] = simt::ballot(in && hi == thi);
        n_above += static_cast<uint32_t>(simt::popc(above_w[j]));
        n_ties += static_cast<uint32_t>(simt::popc(tie_w[j]));
      }
      // Both counts in one word: a tile holds at most 4096 elements.
      uint32_t total = 0;
      const uint32_t before = bitmap::block_exclusive_scan_warp_counts(
          (n_above << 16) | n_ties, scan_slots + 32 * parity, &total);
      parity ^= 1;
      int above_before = run_above + static_cast<int>(before >> 16);
      int ties_before = run_ties + static_cast<int>(before & 0xffffu);
#pragma unroll
      for (int j = 0; j < kPackItems; ++j) {
        const int word = (base >> 5) + warp * kPackItems + j;
        const int n_tie = simt::popc(tie_w[j]);
        const int m = need - ties_before;  // ties still to keep (warp-uniform)
        uint32_t kept_ties;
        if (m <= 0) {
          kept_ties = 0u;
        } else if (m >= n_tie) {
          kept_ties = tie_w[j];
        } else {
          kept_ties = simt::ballot(((tie_w[j] >> lane) & 1u) && bitmap::rank_in_word(tie_w[j]) < m);
        }
        const uint32_t kept = above_w[j] | kept_ties;
        if (wc && lane == 0 && word < used_words) wc[word] = static_cast<int32_t>(kept);
        if ((kept >> lane) & 1u) {
          const int pos = above_before + (ties_before < need ? ties_before : need) +
                          bitmap::rank_in_word(kept);
          if (static_cast<unsigned>(pos) < static_cast<unsigned>(k)) {  // guards a corrupt state
            vc[pos] = v[j];
            if (oc) oc[pos] = static_cast<uint16_t>(word * 32 + lane);
          }
        }
        above_before += simt::popc(above_w[j]);
        ties_before += n_tie;
      }
      run_above += static_cast<int>(total >> 16);
      run_ties += static_cast<int>(total & 0xffffu);
    }
    if (wc) {
      for (int w = used_words + tid; w < p.words; w += nthreads) wc[w] = 0;
    }
    simt::sync();  // shared memory is reused by the next chunk
  }
}

}  // namespace DROPIT_KERNEL_NS
}  // namespace dropit
