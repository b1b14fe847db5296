// Kernel bodies of pack: pack_block, one thread block per chunk (grid-stride over chunks), and
// pack_warps, one warp per chunk for chunks of up to kWarpMaxChunk elements (see there).
//
//  1. One wide digit: a 4096-bin histogram of each key's top 12 bits, with plain shared atomics
//     (zeros and other digit-0 keys are counted by difference, not by atomics). The chunk is read
//     from global memory 16 bytes a lane over its 16-byte aligned middle (the few elements before
//     and after it one at a time), and staged in shared memory when it fits. Warp 0 picks the
//     bucket of the keep-th largest key from the threads' sums of runs of bins (no block scan).
//  2. Compaction's ballots: warps ballot "above the bucket" and "in it" into bitmap words (warp
//     w a run of consecutive words). Unless the bucket is kept whole, the select then finishes
//     on the bucket's keys alone (a few percent of the chunk for real data) with narrower digits
//     (select.cuh), by warp 0:
//     - late select (the bucket's keys fit beside the bitmap masks, the usual case): the ballots
//       run against the bucket's bounds, each thread gathers the bucket's keys of the words it
//       owns (their bits are in the masks: no pass over the chunk) through one counter, and after
//       the select sorts them against the final bounds;
//     - otherwise a pass over the chunk gathers them first into 32 slots (the keys of lane l of
//       warp w to slot (l + w) mod 32, so that ties that all fall on one lane of every warp, a
//       constant column's, spread), and the ballots run against the final bounds; a bucket that
//       overflows a slot (128 32-bit keys) is refined over the whole chunk instead.
//  3. One block scan over per-thread counts (at least 4 words a thread) orders the words, and each
//     thread writes the bitmap words it owns and their kept values (ties go to the lower index).
//
// The keys are bit patterns (uint16/32/64): the magnitude key of the value or the random key of
// its global index, so one body serves every floating dtype. Only the portability layer
// (simt.cuh) is used: the host SIMT layer runs this very source in the tests.
#pragma once

#include <cstdint>

#include "../dropit.h"
#include "bitmap.cuh"
#include "launch_plan.h"
#include "select.cuh"
#include "simt.cuh"

namespace dropit {

// Where the keys come from.
enum class KeySource : int {
  kSharedBits = 0,  // the chunk's bit patterns, staged in shared memory by the first pass
  kGlobalBits = 1,  // chunks too big for shared memory: each pass reads global memory again
  kRandom = 2,      // random keys, computed from the global index (no reads for the select)
};

constexpr int kWideBits = 12;
constexpr int kWideBins = 1 << kWideBits;
constexpr int kPackMaxThreads = 512;  // the launch bound: the plan uses 256 or 512
constexpr int kPackLoadAhead = 2;     // 16-byte loads in flight per thread in the wide pass
constexpr int kPackWordsPerThread = 4;  // bitmap words a thread compacts, at least (pack_block)

// The wide histogram's memory is reused: first the candidates, then two words per bitmap word.
// After the bins come 32 spare counters, one per lane, that take the keys of digit 0.
constexpr size_t kPackWideBytes = sizeof(uint32_t) * kWideBins;
static_assert(kPackWideBytes >= 2 * sizeof(uint32_t) * (kMaxChunk / 32), "masks of the largest chunk fit");
// Static shared memory of the body (bytes): wide bins and spares, narrow bins, scan slots, the
// chosen bin, the candidates' counts.
constexpr size_t kPackStaticSmem = kPackWideBytes + sizeof(uint32_t) * (32 + kNarrowBins) + sizeof(uint64_t) * 32 +
                                   sizeof(uint32_t) * (4 + 32);

// Everything a pack launch needs; int64 where a product can pass 2^31.
template <typename Bits>
struct PackParams : KernelGeometry {
  simt::gptr<const Bits> x;
  simt::gptr<Bits> values;
  simt::gptr<int32_t> bitmap;    // ceil(D/32) words per chunk, or null
  simt::gptr<uint16_t> offsets;  // aligned with values, or null
  uint64_t seed;                 // random keys only
};

template <typename Bits>
inline PackParams<Bits> make_pack_params(const ChunkGeometry& g, const Bits* x, Bits* values, int32_t* bitmap,
                                         uint16_t* offsets, uint64_t seed) {
  PackParams<Bits> p;
  static_cast<KernelGeometry&>(p) = kernel_geometry(g);
  p.x = simt::gptr<const Bits>(x);
  p.values = simt::gptr<Bits>(values);
  p.bitmap = simt::gptr<int32_t>(bitmap);
  p.offsets = simt::gptr<uint16_t>(offsets);
  p.seed = seed;
  return p;
}

// Threads per block for chunks of D.
inline int pack_threads(int64_t D) { return D <= 1024 ? 128 : (D <= 4096 ? 256 : 512); }

struct PackPlan : LaunchPlan {
  KeySource source = KeySource::kSharedBits;
  bool per_warp = false;  // pack_warps (a chunk per warp) rather than pack_block (a chunk per block)
};

// Dynamic shared memory of a staged chunk: the chunk, and up to 16 bytes more, since it is staged
// at the same offset from a 16-byte boundary as it has in global memory.
DROPIT_HD size_t staged_bytes(int64_t chunk, int elem_bytes) {
  return static_cast<size_t>(chunk) * static_cast<size_t>(elem_bytes) + 16;
}

// Small chunks go one to a warp (pack_warps): a block's fixed costs (a 4096-bin histogram cleared
// and scanned, block barriers and scans) would otherwise be paid for every 1024 elements or less.
// The warp's first digit is narrower (1024 bins, over a window of the keys' range: WindowDigit),
// and it needs no block barrier.
constexpr int kWarpMaxChunk = 1024;
constexpr int kWarpBits = 10;
constexpr int kWarpBins = 1 << kWarpBits;
constexpr int kWarpPerLane = 32;                       // candidates of a lane: the bucket's keys of one bitmap word
constexpr int kWarpBlockThreads = 256;                // 8 chunks a block

DROPIT_HD size_t round_up16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Each warp's dynamic shared memory, in this order: its wide bins and 32 spare counters (then its
// candidates: kWarpPerLane keys a lane), its narrow bins, 4 words of selection, its staged chunk.
DROPIT_HD size_t warp_bins_bytes(int key_bytes) {
  const size_t bins = sizeof(uint32_t) * (kWarpBins + 32);
  const size_t candidates = static_cast<size_t>(kWarpPerLane) * 32 * static_cast<size_t>(key_bytes);
  return round_up16(bins > candidates ? bins : candidates);
}
DROPIT_HD size_t warp_smem_bytes(int64_t chunk, int elem_bytes, bool random) {
  return warp_bins_bytes(random ? 4 : elem_bytes) + sizeof(uint32_t) * (kNarrowBins + 4) +
         (random ? 0 : round_up16(staged_bytes(chunk, elem_bytes)));
}

// `smem_limit`: the most shared memory (static + dynamic) a block may use on the device (its
// opt-in maximum); `static_smem`: the staged kernel's static shared memory as compiled.
// Magnitude keys are staged in shared memory when the chunk fits.
// Chunks up to kWarpMaxChunk go one to a warp when the block's warps fit in `warp_smem_limit`
// (the per-warp kernel's limit: it has no static shared memory).
inline PackPlan plan_pack(const ChunkGeometry& g, int elem_bytes, bool random, size_t smem_limit, int threads = 0,
                          size_t static_smem = kPackStaticSmem, size_t warp_smem_limit = SIZE_MAX) {
  const size_t staged = staged_bytes(g.chunk, elem_bytes);
  PackPlan plan;
  if (g.chunk <= kWarpMaxChunk) {
    const int t = threads > 0 ? threads : kWarpBlockThreads;
    const size_t smem = static_cast<size_t>(t / 32) * warp_smem_bytes(g.chunk, elem_bytes, random);
    if (smem <= smem_limit && smem <= warp_smem_limit) {
      plan.source = random ? KeySource::kRandom : KeySource::kSharedBits;
      plan.per_warp = true;
      static_cast<LaunchPlan&>(plan) = launch_plan(g.num_chunks, t / 32, t, smem);
      return plan;
    }
  }
  plan.source = random ? KeySource::kRandom
                       : (staged + static_smem <= smem_limit ? KeySource::kSharedBits : KeySource::kGlobalBits);
  static_cast<LaunchPlan&>(plan) =
      launch_plan(g.num_chunks, 1, threads > 0 ? threads : pack_threads(g.chunk),
                  plan.source == KeySource::kSharedBits ? staged : 0);
  return plan;
}

namespace kernels {

template <typename Bits>
struct ChunkOutputs {
  simt::gptr<Bits> values;
  simt::gptr<uint16_t> offsets;  // or null
  simt::gptr<int32_t> bitmap;    // or null
};

// The keys and values of one chunk, wherever they are read from.
template <typename Bits, typename Key, KeySource Src>
struct ChunkKeys {
  simt::gptr<const Bits> x;  // the chunk in global memory
  simt::sptr<Bits> staged;   // kSharedBits: the chunk in shared memory
  uint64_t seed;
  int64_t base;  // global index of the chunk's first element

  DROPIT_DEVICE Bits value(int e) const {
    if constexpr (Src == KeySource::kSharedBits) {
      return staged[e];
    } else {
      return x[e];
    }
  }
  DROPIT_DEVICE Key operator()(int e) const {
    if constexpr (Src == KeySource::kRandom) {
      return random_key(seed, static_cast<uint64_t>(base + e));
    } else {
      return magnitude_key<Bits>(value(e));
    }
  }
  // The same keys from bitmap word w's first element on: a loop over a word's bits then indexes
  // by bit, without rebuilding the word's address each time.
  DROPIT_DEVICE ChunkKeys from_word(int w) const {
    ChunkKeys k = *this;
    if constexpr (Src == KeySource::kSharedBits) {
      k.staged += 32 * w;
    } else {
      k.x += 32 * w;
    }
    k.base += 32 * w;
    return k;
  }
};

// Elements before the first 16-byte boundary at or after `address` (a pointer to T; all of them
// when it is not even aligned to T), up to `len`.
template <typename T>
DROPIT_DEVICE int head_to_16(uintptr_t address, int len) {
  const int head = address % sizeof(T) != 0 ? len : static_cast<int>((16 - address % 16) % 16 / sizeof(T));
  return head < len ? head : len;
}

// Calls f(v) for the elements of the chunk: v a Vec of 16 bytes of them at a time (kLoadAhead
// loads in flight per thread) for the 16-byte aligned middle of `src`, a Vec of one element for the
// head before it and the tail after it. With `stage`, the bits are also stored to the same place
// of `staged`, which must be congruent to `src` modulo 16 bytes (its vector stores stay aligned).
// The team reading the chunk is threads [0, nthreads) as numbered by `tid` (the block, or a warp).
template <int kLoadAhead, typename Bits, typename Src, typename F>
DROPIT_DEVICE void for_each_element(Src src, int L, int tid, int nthreads, bool stage, simt::sptr<Bits> staged,
                                    const F& f) {
  constexpr int V = simt::kVec16<Bits>;
  const int head = head_to_16<Bits>(simt::address(src), L);
  const int nvec = (L - head) / V;
  const int step = nthreads * V;  // elements between a thread's consecutive vectors
  if (tid < head) {  // head < V <= nthreads
    const Bits bits = src[tid];
    if (stage) staged[tid] = bits;
    f(simt::Vec<Bits, 1>{{bits}});
  }
  int i = tid;
  Src from = src + (head + tid * V);
  simt::sptr<Bits> to = staged + (head + tid * V);
  for (; i + (kLoadAhead - 1) * nthreads < nvec; i += kLoadAhead * nthreads) {
    simt::Vec<Bits, V> v[kLoadAhead];
DROPIT_UNROLL
    for (int u = 0; u < kLoadAhead; ++u) v[u] = simt::load_vec<V>(from + u * step);
DROPIT_UNROLL
    for (int u = 0; u < kLoadAhead; ++u) {
      if (stage) simt::store_vec(to + u * step, v[u]);
      f(v[u]);
    }
    from += kLoadAhead * step;
    to += kLoadAhead * step;
  }
  if constexpr (kLoadAhead > 1) {
    for (; i < nvec; i += nthreads) {
      const simt::Vec<Bits, V> v = simt::load_vec<V>(from);
      if (stage) simt::store_vec(to, v);
      f(v);
      from += step;
      to += step;
    }
  }
  for (int e = head + nvec * V + tid; e < L; e += nthreads) {
    const Bits bits = src[e];
    if (stage) staged[e] = bits;
    f(simt::Vec<Bits, 1>{{bits}});
  }
}

// The magnitude keys of a Vec of bit patterns.
template <typename Key, typename Bits, int N>
DROPIT_DEVICE simt::Vec<Key, N> magnitude_keys(const simt::Vec<Bits, N>& v) {
  simt::Vec<Key, N> k;
DROPIT_UNROLL
  for (int j = 0; j < N; ++j) k.v[j] = magnitude_key<Bits>(v.v[j]);
  return k;
}

// Calls f(keys) for the keys of the chunk (in no particular order), keys a Vec of up to 16 bytes
// of them, reading them as cheaply as their source allows (random keys are computed, one element
// per thread at a time).
template <typename Bits, typename Key, KeySource Src, typename F>
DROPIT_DEVICE void for_each_key(const ChunkKeys<Bits, Key, Src>& keys, int L, int tid, int nthreads, bool from_global,
                                bool stage, const F& f) {
  if constexpr (Src == KeySource::kRandom) {
    for (int e = tid; e < L; e += nthreads) f(simt::Vec<Key, 1>{{keys(e)}});
  } else {
    auto g = [&](const auto& v) DROPIT_INLINE_LAMBDA { f(magnitude_keys<Key>(v)); };
    if (from_global) {
      for_each_element<kPackLoadAhead>(keys.x, L, tid, nthreads, stage, keys.staged, g);
    } else {
      for_each_element<1>(keys.staged, L, tid, nthreads, false, keys.staged, g);
    }
  }
}

// pack_block on sm_80+: stages chunk `keys` asynchronously. The 16-byte aligned middle by copies
// from global to shared memory that need no registers, so every copy of a thread is in flight at
// once (before: kPackLoadAhead loads a thread, interleaved with the histogram's atomics); the head
// and tail (fewer than a vector each) through registers, an element a thread. The copies land at
// the thread's wait (Sync::copies); a barrier after it, and the chunk is read from shared memory.
template <typename Bits, typename Key, KeySource Src>
DROPIT_DEVICE void copy_chunk_async(const ChunkKeys<Bits, Key, Src>& keys, int L, int tid, int nthreads) {
  constexpr int V = simt::kVec16<Bits>;
  const int head = head_to_16<Bits>(simt::address(keys.x), L);
  const int nvec = (L - head) / V;
  const int step = nthreads * V;  // elements between a thread's consecutive copies
  simt::gptr<const Bits> from = keys.x + (head + tid * V);
  simt::sptr<Bits> to = keys.staged + (head + tid * V);
  int i = tid;
  for (; i + 3 * nthreads < nvec; i += 4 * nthreads) {
DROPIT_UNROLL
    for (int u = 0; u < 4; ++u) simt::copy_async16(to + u * step, from + u * step);
    from += 4 * step;
    to += 4 * step;
  }
  for (; i < nvec; i += nthreads) {
    simt::copy_async16(to, from);
    from += step;
    to += step;
  }
  for (int r = tid; r < L - nvec * V; r += nthreads) {  // r: the head's elements, then the tail's
    const int e = r < head ? r : nvec * V + r;
    keys.staged[e] = keys.x[e];
  }
}

// The keys of chunk c; staged (kSharedBits) at `staged_base` plus the chunk's own offset from a
// 16-byte boundary, so that its aligned middle moves by vectors.
template <typename Key, KeySource Src, typename Bits>
DROPIT_DEVICE ChunkKeys<Bits, Key, Src> chunk_keys(const PackParams<Bits>& p, int64_t c, simt::sptr<Bits> staged_base) {
  const int64_t xbase = c * static_cast<int64_t>(p.chunk);
  const simt::gptr<const Bits> xc = p.x + xbase;
  const simt::sptr<Bits> staged = Src == KeySource::kSharedBits
                                      ? staged_base + static_cast<int>(simt::address(xc) % 16 / sizeof(Bits))
                                      : staged_base;
  return ChunkKeys<Bits, Key, Src>{xc, staged, p.seed, xbase};
}

// Where chunk c's kept values, offsets and bitmap words go.
template <typename Bits>
DROPIT_DEVICE ChunkOutputs<Bits> chunk_outputs(const PackParams<Bits>& p, int64_t c) {
  const int64_t kept0 = c * static_cast<int64_t>(p.keep);
  return ChunkOutputs<Bits>{p.values + kept0, p.offsets ? p.offsets + kept0 : nullptr,
                            p.bitmap ? p.bitmap + c * static_cast<int64_t>(p.words) : nullptr};
}

// A first digit's bucket: the selection to narrow, and the bounds of the keys in it, which are
// those of the selection's bucket (prefix, shift) unless the digit's bin was a clamped one.
template <typename Key>
struct FirstBucket {
  Selection<Key> s;
  Key lowest;
  Key highest;
};

// The first digit of pack_block, and of pack_warps on random keys: the key's top kBits bits.
template <typename Key, int kBits, int kKeyBits>
struct TopBitsDigit {
  static constexpr int kBins = 1 << kBits;
  static constexpr int kShift = kKeyBits - kBits;
  // The key's counter: its bin, whose byte offset is taken straight from the digit's bits (a mask
  // and one shift-and-add to the address, not the digit, then its address); digit 0, `spare`.
  DROPIT_DEVICE simt::sptr<uint32_t> counter(simt::sptr<uint32_t> bins, simt::sptr<uint32_t> spare, Key key) const {
    const uint32_t at = static_cast<uint32_t>((key & (static_cast<Key>(kBins - 1) << kShift)) >> (kShift - 2));
    const simt::sptr<uint32_t> bin = simt::ptr_cast<uint32_t>(simt::ptr_cast<unsigned char>(bins) + static_cast<int>(at));
    return at != 0 ? bin : spare;
  }
  template <int N>
  DROPIT_DEVICE void count(const simt::Vec<Key, N>& ks, simt::sptr<uint32_t> bins, simt::sptr<uint32_t> spare) const {
DROPIT_UNROLL
    for (const Key key : ks.v) {
      const simt::sptr<uint32_t> at = counter(bins, spare, key);
      simt::atomic_add_shared(at, 1u);
    }
  }
  DROPIT_DEVICE FirstBucket<Key> bucket(const BinChoice& c, int k, int L) const {
    Selection<Key> s{0, kKeyBits, k, L};
    take_bin(s, c, kShift);
    return {s, s.prefix, s.highest()};
  }
};

// pack_warps' first digit of magnitude keys: kBins bins of 2^kShift keys each (1/128 of a binade
// of fp32 or fp64, 1/32 of bf16's, 1/256 of fp16's) over a window placed by a sample of the chunk,
// its top kMargin bins above the sample's largest key (fp32: 8 binades, the top one above it).
// (The top bits' digit gives N(0,1) data 4 bins a binade: ~5 % of a chunk shared the threshold's
// bin, and the gather, narrow passes, sort and the atomics' collisions scaled with that; now
// ~0.2 %.) Keys above the window count in the top bin, keys below it in bin 0 or in the 32 words
// below the bins (lane l's at bins[-1 - l]: no atomics piling on one word), which choose_bin reads
// by difference. These two bins are not buckets of fixed bits: their selection is the whole key
// range, narrowed on their keys alone (between `lowest` and `highest`).
template <typename Key>
struct WindowDigit {
  static constexpr int kBins = kWarpBins;
  static constexpr int kKeyBits = static_cast<int>(8 * sizeof(Key)) - 1;  // magnitude keys
  static constexpr int kShift = sizeof(Key) == 2 ? 2 : (sizeof(Key) == 4 ? 16 : 45);
  static constexpr int kTopQ = (1 << (kKeyBits - kShift)) - 1;  // the largest key >> kShift
  static constexpr int kMargin = sizeof(Key) == 2 ? 64 : 128;
  static_assert(kTopQ >= kBins - 1, "the window fits in the keys' range");
  int base;    // bin b holds the keys whose key >> kShift is base + b (bin 0: at most, the top: at least)
  int sink;    // this lane's counter below the bins: -1 - lane

  // From `sample`, a key of this lane's (a sample spread over the chunk).
  DROPIT_DEVICE WindowDigit(Key sample, int lane) : sink(-1 - lane) {
    const int top = static_cast<int>(simt::reduce_max(static_cast<uint32_t>(sample >> kShift))) + kMargin;
    // (base >= 0: a 16-bit key's offset from it then stays inside 16 bits)
    const int lowest = (top < kTopQ ? top : kTopQ) - (kBins - 1);
    base = lowest > 0 ? lowest : 0;
  }
  DROPIT_DEVICE simt::sptr<uint32_t> counter(simt::sptr<uint32_t> bins, Key key) const {
    const int d = static_cast<int>(key >> kShift) - base;
    const int below_top = d < kBins - 1 ? d : kBins - 1;
    const int at = below_top > sink ? below_top : sink;
    return bins + at;
  }
  // Counts a Vec of keys; 16-bit keys two at a time, the halves of a 32-bit word: their counters'
  // byte offsets are the keys' bits above kShift = 2 (no shift), less the base's, clamped to
  // [4 * sink, 4 * (kBins - 1)] (sm_90: one DPX add-and-min and one min for the two).
  template <int N>
  DROPIT_DEVICE void count(const simt::Vec<Key, N>& ks, simt::sptr<uint32_t> bins, simt::sptr<uint32_t>) const {
    if constexpr (sizeof(Key) == 2 && N % 2 == 0) {
      static_assert(kShift == 2, "a key's bits above kShift are its counter's byte offset");
      const uint32_t minus_base = static_cast<uint16_t>(-4 * base) * 0x10001u;
      const uint32_t top = static_cast<uint32_t>(4 * (kBins - 1)) * 0x10001u;
      const uint32_t bottom = static_cast<uint16_t>(4 * sink) * 0x10001u;
      const simt::sptr<unsigned char> bytes = simt::ptr_cast<unsigned char>(bins);
DROPIT_UNROLL
      for (int i = 0; i < N; i += 2) {
        const uint32_t pair = static_cast<uint32_t>(ks.v[i]) | (static_cast<uint32_t>(ks.v[i + 1]) << 16);
        const uint32_t at = simt::max_s16x2(simt::add_min_s16x2(pair & 0x7ffc7ffcu, minus_base, top), bottom);
        const simt::sptr<uint32_t> low = simt::ptr_cast<uint32_t>(bytes + static_cast<int16_t>(at & 0xffffu));
        const simt::sptr<uint32_t> high = simt::ptr_cast<uint32_t>(bytes + (static_cast<int32_t>(at) >> 16));
        simt::atomic_add_shared(low, 1u);
        simt::atomic_add_shared(high, 1u);
      }
    } else {
DROPIT_UNROLL
      for (const Key key : ks.v) {
        const simt::sptr<uint32_t> at = counter(bins, key);
        simt::atomic_add_shared(at, 1u);
      }
    }
  }
  DROPIT_DEVICE FirstBucket<Key> bucket(const BinChoice& c, int k, int) const {
    const bool bottom = c.bin == 0, top = c.bin == kBins - 1;
    const Key lowest_key = bottom ? Key(0) : static_cast<Key>(static_cast<Key>(base + static_cast<int>(c.bin)) << kShift);
    const Key highest_key = top ? static_cast<Key>((Key(1) << kKeyBits) - 1)
                                : static_cast<Key>((static_cast<Key>(base + static_cast<int>(c.bin) + 1) << kShift) - 1);
    const bool clamped = bottom || top;
    return {{clamped ? Key(0) : lowest_key, clamped ? kKeyBits : kShift, k - static_cast<int>(c.above),
             static_cast<int>(c.count)},
            lowest_key, highest_key};
  }
};

// The first digit of a chunk's keys, by the team (the block, or a warp) on its cleared bins:
// each key's `digit` counted in `hist` (digit 0, zeros among them, to the thread's `spare`
// counter: no atomics piling on one bin; choose_bin counts bin 0 by difference), then the bin of
// the k-th largest key chosen. `counted`, `scanned`, `chosen`: the barriers' ids. kCopied: the
// chunk is staged already (copy_chunk_async), and is read from shared memory.
template <bool kCopied = false, typename Team, typename Digit, typename Bits, typename Key, KeySource Src,
          typename Sync>
DROPIT_DEVICE FirstBucket<Key> first_digit(Team team, const Digit& digit, const ChunkKeys<Bits, Key, Src>& keys, int L,
                                           int k, bool stage, simt::sptr<uint32_t> hist, simt::sptr<uint32_t> spare,
                                           simt::sptr<uint32_t> slots, simt::sptr<uint32_t> sel, const Sync& sync,
                                           int counted, int scanned, int chosen) {
  auto count = [&](const auto& ks) DROPIT_INLINE_LAMBDA { digit.count(ks, hist, spare); };
  if constexpr (kCopied) {
    // (Not through for_each_key: nvcc's line table then gave this pass the gather's call site, and
    // the cost model could not match it.)
    for_each_element<1>(keys.staged, L, team.rank(), team.size(), false, keys.staged,
                        [&](const auto& v) DROPIT_INLINE_LAMBDA { count(magnitude_keys<Key>(v)); });
  } else {
    for_each_key(keys, L, team.rank(), team.size(), /*from_global=*/true, stage, count);
  }
  team.sync(sync, counted);
  constexpr int kBins = Digit::kBins;
  if constexpr (std::is_same_v<Team, BlockTeam>) {  // `slots`: kNarrowBins words for the runs' sums
    choose_bin_by_runs<kBins, kNarrowBins>(hist, static_cast<uint32_t>(L), static_cast<uint32_t>(k), slots, sel, sync,
                                           scanned, chosen);
    const simt::Vec<uint32_t, 4> c = simt::load_vec<4>(sel);
    return digit.bucket(BinChoice{c.v[0], c.v[1], c.v[2]}, k, L);
  } else {
    return digit.bucket(choose_bin<kBins>(team, hist, static_cast<uint32_t>(L), static_cast<uint32_t>(k), slots, sel,
                                          sync, scanned, chosen),
                        k, L);
  }
}

// Whether a key is in a selection's bucket of `shift` low bits but not its lowest key: key -
// (lowest + 1) < bucket width - 1, wrapping below.
template <typename Key>
struct InBucketAboveLowest {
  Key above_lowest;
  Key rest;
  DROPIT_DEVICE InBucketAboveLowest(const Selection<Key>& s, int shift)
      : above_lowest(static_cast<Key>(s.prefix + 1)), rest(static_cast<Key>((Key(1) << shift) - 1)) {}
  DROPIT_DEVICE bool operator()(Key key) const { return static_cast<Key>(key - above_lowest) < rest; }
};

// Warp 0's selection, written by its lane 0 for the block (to read after a barrier), and read.
// (One 16-byte vector each way: `to` is 16-byte aligned.)
template <typename Key>
DROPIT_DEVICE void share_selection(const Selection<Key>& s, simt::sptr<uint64_t> to, int lane) {
  if (lane == 0) {
    simt::store_vec(to, simt::Vec<uint64_t, 2>{{static_cast<uint64_t>(s.prefix),
                                               (static_cast<uint64_t>(s.shift) << 40) |
                                                   (static_cast<uint64_t>(s.need) << 20) |
                                                   static_cast<uint64_t>(s.count)}});
  }
}
template <typename Key>
DROPIT_DEVICE Selection<Key> shared_selection(simt::sptr<uint64_t> from) {
  const simt::Vec<uint64_t, 2> v = simt::load_vec<2>(from);
  const uint64_t packed = v.v[1];
  return {static_cast<Key>(v.v[0]), static_cast<int>(packed >> 40), static_cast<int>((packed >> 20) & 0xfffff),
          static_cast<int>(packed & 0xfffff)};
}

// A chunk kept whole, written by threads [0, nthreads) of the team (`tid` this thread's rank).
template <typename Bits>
DROPIT_DEVICE void keep_whole_chunk(const ChunkOutputs<Bits>& out, simt::gptr<const Bits> xc, int L, int64_t words,
                                    int tid, int nthreads) {
  for (int e = tid; e < L; e += nthreads) {
    out.values[e] = static_cast<Bits>(xc[e]);
    if (out.offsets) out.offsets[e] = static_cast<uint16_t>(e);
  }
  if (out.bitmap) {
    for (int w = tid; w < words; w += nthreads)
      out.bitmap[w] = static_cast<int32_t>(bitmap::low_bits(static_cast<int64_t>(L) - 32 * w));
  }
}

// Word w's masks once its bucket's keys (the set bits of in_bucket) are sorted against the final
// bucket: {above, from}, with those above it added to `above` and those in it to "from" (the
// rest of the bucket in neither). Every such key is at least the first bucket's lowest, so one
// compare a side: at least the final lowest is in the final bucket or above it. key_of(i, j): the
// i-th of them, bit j of the word.
template <typename Key, typename KeyOf>
DROPIT_DEVICE simt::Vec<uint32_t, 2> sort_keys(uint32_t in_bucket, uint32_t above, const Selection<Key>& s,
                                               const KeyOf& key_of) {
  const Key lowest = s.prefix;
  const Key highest = s.highest();
  uint32_t from = above;
  int i = 0;
  for (uint32_t rest = in_bucket; rest != 0; rest &= rest - 1) {
    const int j = simt::ffs(rest) - 1;
    const Key key = key_of(i, j);
    above |= static_cast<uint32_t>(key > highest) << j;
    from |= static_cast<uint32_t>(key >= lowest) << j;
    ++i;
  }
  return simt::Vec<uint32_t, 2>{{above, from}};
}
// The same with the keys read from the chunk.
template <typename Bits, typename Key, KeySource Src>
DROPIT_DEVICE simt::Vec<uint32_t, 2> sort_bucket_keys(const ChunkKeys<Bits, Key, Src>& keys, int w, uint32_t in_bucket,
                                                       uint32_t above, const Selection<Key>& s) {
  const ChunkKeys<Bits, Key, Src> word = keys.from_word(w);
  return sort_keys(in_bucket, above, s, [&](int, int j) { return word(j); });
}

// Writes the values of word w's kept keys (the set bits of `kept`) at vp and, with offsets,
// their positions in the chunk at op, advancing both. The offsets have a loop of their own: a
// null test inside the values' loop cost nvcc a 64-bit compare and four register copies a key.
template <typename Bits, typename Key, KeySource Src>
DROPIT_DEVICE void write_kept(const ChunkKeys<Bits, Key, Src>& keys, uint32_t kept, int w, simt::gptr<Bits>& vp,
                              simt::gptr<uint16_t>& op) {
  const ChunkKeys<Bits, Key, Src> word = keys.from_word(w);
  for (uint32_t rest = kept; rest != 0; rest &= rest - 1) {
    *vp = word.value(simt::ffs(rest) - 1);
    vp += 1;
  }
  if (op) {
    for (uint32_t rest = kept; rest != 0; rest &= rest - 1) {
      *op = static_cast<uint16_t>(32 * w + simt::ffs(rest) - 1);
      op += 1;
    }
  }
}

// The body of the pack kernel. Key is Bits for magnitude keys, uint32_t for random keys. Needs
// blockDim.x a multiple of 32 up to kPackMaxThreads and, for kSharedBits, chunk * sizeof(Bits)
// bytes of dynamic shared memory. `sync` is the barrier policy (simt::BlockSync in production).
template <typename Bits, typename Key, KeySource Src, typename Sync = simt::BlockSync>
DROPIT_DEVICE void pack_block(const PackParams<Bits>& p, Sync sync = Sync()) {
  // Significant key bits: a magnitude key's top bit (the sign) is always 0.
  constexpr int kKeyBits = static_cast<int>(sizeof(Key) * 8) - (Src == KeySource::kRandom ? 0 : 1);
  constexpr int kWideShift = kKeyBits - kWideBits;
  // Candidates: slot l holds up to kPerLane keys, its i-th at i*32 + l, and takes the keys of lane
  // l - w (mod 32) of warp w: lanes storing or reading their slots touch distinct banks, nobody
  // contends for a counter (an atomic on one address, nvcc aggregates across the warp at some
  // cost), and keys that land on one lane of every warp (a constant column's ties) spread over
  // the slots. A bucket that overflows a slot is refined over the whole chunk instead.
  constexpr int kBufferKeys = static_cast<int>(kPackWideBytes / sizeof(Key));
  constexpr int kPerLane = kBufferKeys / 32;
  constexpr bool kStaged = Src == KeySource::kSharedBits;
  // sm_80+: the staged chunk is copied in asynchronously before the histogram reads it (below
  // sm_80, the histogram's pass over global memory stages it).
  constexpr bool kCopied = kStaged && simt::has_async_copy();
  DROPIT_SHARED(uint32_t, wide, kWideBins + 32);  // wide bins (then candidates, then bitmap words), spares
  DROPIT_SHARED(uint32_t, narrow, kNarrowBins);   // the wide runs' sums; narrow bins; warp 0's selection
  DROPIT_SHARED(uint64_t, slots, 32);             // block scans
  DROPIT_SHARED(uint32_t, sel, 4);                // chosen bin, keys above it, keys in it
  DROPIT_SHARED(uint32_t, gathered, 32);          // candidates per slot
  const simt::sptr<uint32_t> slots32 = simt::ptr_cast<uint32_t>(slots);
  // Warp 0's selection for the block, in the narrow bins once they are read (`slots` may be
  // rewritten by the compaction's scan before a slower warp has read it).
  const simt::sptr<uint64_t> narrow64 = simt::ptr_cast<uint64_t>(narrow);
  static_assert(kMaxChunk < (1 << 20), "need and count of a selection fit 20 bits");
  const simt::sptr<Key> candidates = simt::ptr_cast<Key>(wide);
  const simt::sptr<uint32_t> masks = wide;  // per bitmap word: keys above the bucket, keys >= its lowest
  simt::sptr<Bits> staged_base = nullptr;
  if constexpr (kStaged) staged_base = simt::dynamic_shared<Bits>();

  const int tid = simt::thread_idx();
  const int nthreads = simt::block_dim();
  const int lane = bitmap::lane_id();
  const int warp = bitmap::warp_id();
  const int nwarps = bitmap::num_warps();

  for (int64_t c = simt::block_idx(); c < p.num_chunks; c += simt::grid_dim()) {
    const int L = p.chunk_len(c);
    const int k = p.chunk_keep(c);
    const ChunkKeys<Bits, Key, Src> keys = chunk_keys<Key, Src>(p, c, staged_base);
    // The chunk's outputs, formed where they are written (fewer registers live across the select).
    auto outputs = [&] { return chunk_outputs(p, c); };

    if (k == L) {  // everything is kept (gamma small or the chunk tiny): no shared memory used
      keep_whole_chunk(outputs(), keys.x, L, p.words, tid, nthreads);
      continue;
    }

    // ---- 1. the wide digit ----
    // (sm_80+: the chunk's copies to shared memory are in flight while the bins are cleared.)
    if constexpr (kCopied) copy_chunk_async(keys, L, tid, nthreads);
    for (int i = tid; i < kWideBins / 4; i += nthreads) simt::store_vec(wide + 4 * i, simt::Vec<uint32_t, 4>{});
    if (tid < 32) gathered[tid] = 0u;
    if constexpr (kCopied) sync.copies(kChunkCopied);
    sync(kWideCleared);
    Selection<Key> s = first_digit<kCopied>(BlockTeam(), TopBitsDigit<Key, kWideBits, kKeyBits>(), keys, L, k, kStaged,
                                            wide, wide + (kWideBins + lane), narrow, sel, sync, kWideCounted,
                                            kWideScanned, kWideChosen)
                           .s;

    const int used_words = (L + 31) >> 5;
    // Late select: when the bucket's keys fit beside the bitmap masks (two words a bitmap word,
    // in 16-byte pairs) in the wide region, the compaction's ballots run first, against the
    // bucket's bounds; the threads then gather their words' bucket keys from the masks (no pass
    // over the chunk), warp 0 selects among them, and the threads sort their words' bucket keys
    // against the final bounds.
    // (The candidates' place, formed where used: fewer registers live across the ballots.)
    auto late_candidates = [&] { return simt::ptr_cast<Key>(wide + 4 * ((used_words + 1) >> 1)); };
    const bool late = !s.whole() && s.count <= static_cast<int>((kWideBins - 4 * ((used_words + 1) >> 1)) *
                                                               sizeof(uint32_t) / sizeof(Key));

    // ---- 2. the bucket's keys, then narrower digits (late: after the ballots) ----
    if (!s.whole() && !late) {
      // Gather the bucket's keys but its lowest (they count in bin 0 by number) into the lane's
      // slot: one atomic per 16 bytes of keys holding any; keys past a full slot are left out.
      const InBucketAboveLowest<Key> in_bucket(s, kWideShift);
      const int my_slot = (lane + warp) & 31;
      for_each_key(keys, L, tid, nthreads, /*from_global=*/!kStaged, false, [&](const auto& ks) {
        uint32_t match = 0;
        int j = 0;
DROPIT_UNROLL
        for (const Key key : ks.v) {
          match |= static_cast<uint32_t>(in_bucket(key)) << j;
          ++j;
        }
        if (match != 0) {
          uint32_t slot = simt::atomic_add_shared(gathered + my_slot, static_cast<uint32_t>(simt::popc(match)));
          j = 0;
DROPIT_UNROLL
          for (const Key key : ks.v) {
            if ((match >> j) & 1u) {
              if (slot < static_cast<uint32_t>(kPerLane)) candidates[static_cast<int>(slot) * 32 + my_slot] = key;
              ++slot;
            }
            ++j;
          }
        }
      });
      sync(kCandidatesGathered);
      const uint32_t gathered_here = gathered[lane];
      if (simt::ballot(gathered_here > static_cast<uint32_t>(kPerLane)) == 0) {  // the same in every warp
        // Warp 0 alone, lane l on slot l; then it shares the selection.
        if (warp == 0) {
          auto own_candidates = [&](const auto& f) {
            for (uint32_t i = 0; i < gathered_here; ++i) f(static_cast<Key>(candidates[static_cast<int>(i) * 32 + lane]));
          };
          narrow_selection(WarpTeam(), s, own_candidates, narrow, slots32, sel, sync);
          share_selection(s, narrow64, lane);
        }
        sync(kSelectionShared);
        s = shared_selection<Key>(narrow64);
      } else {  // too crowded a bucket: every pass reads the whole chunk
        auto chunk_keys = [&](const auto& f) {
          for (int e = tid; e < L; e += nthreads) f(keys(e));
        };
        narrow_selection(BlockTeam(), s, chunk_keys, narrow, slots32, sel, sync);
      }
    }

    // ---- 3. compaction ----
    // Word w: bit j of masks[2w] is set if key 32w+j is above the bucket, of masks[2w+1] if it
    // is at least the bucket's lowest key. Warp `warp` ballots a run of consecutive words, two at
    // a time where both are full (lane 0 stores their four masks at once).
    const Key lowest = s.prefix;
    const Key highest = s.highest();
    const int full_words = L >> 5;  // words whose 32 elements all exist
    const int warp_words = ((used_words + nwarps - 1) / nwarps + 1) & ~1;  // even: pairs stay 16-byte aligned
    const int w_begin = warp * warp_words < used_words ? warp * warp_words : used_words;
    const int w_end = w_begin + warp_words < used_words ? w_begin + warp_words : used_words;
    int cw = w_begin;
    for (; cw + 2 <= w_end && cw + 2 <= full_words; cw += 2) {
      simt::Vec<uint32_t, 4> m;
DROPIT_UNROLL
      for (int u = 0; u < 2; ++u) {
        const Key key = keys(32 * (cw + u) + lane);
        m.v[2 * u] = simt::ballot(key > highest);
        m.v[2 * u + 1] = simt::ballot(key >= lowest);
      }
      if (lane == 0) simt::store_vec(masks + 2 * cw, m);
    }
    for (; cw < w_end; ++cw) {
      const bool in = 32 * cw + lane < L;
      const Key key = in ? keys(32 * cw + lane) : Key(0);
      const uint32_t above = simt::ballot(in && key > highest);
      const uint32_t from = simt::ballot(in && key >= lowest);
      if (lane == 0) simt::store_vec(masks + 2 * cw, simt::Vec<uint32_t, 2>{{above, from}});
    }
    sync(kMasksWritten);
    // Thread t owns words [t*R, t*R + R): counts, one scan, then its words and values. At least
    // kPackWordsPerThread words a thread (the other warps idle): a warp's loops over its threads'
    // words run as long as its busiest lane, and every busy warp pays for the scan.
    const int per_thread = used_words > nthreads * kPackWordsPerThread ? (used_words + nthreads - 1) / nthreads
                                                                       : kPackWordsPerThread;
    const int t_begin = tid * per_thread < used_words ? tid * per_thread : used_words;
    const int t_end = t_begin + per_thread < used_words ? t_begin + per_thread : used_words;
    // The loops that may visit a thread's words in any order start at a word rotated by lane (for
    // a power-of-two count): the masks of lanes 4 apart would otherwise share banks.
    const int own = t_end - t_begin;
    const int wrap = (own & (own - 1)) == 0 ? own - 1 : -1;
    const int turn = wrap >= 0 ? (lane >> 2) & wrap : 0;
    auto any_order = [&](int i) { return t_begin + ((i + turn) & wrap); };
    if (late) {
      // The bucket's keys of this thread's words (in `from`, not `above`), through one counter.
      for (int i = 0; i < own; ++i) {
        const int w = any_order(i);
        const simt::Vec<uint32_t, 2> m = simt::load_vec<2>(masks + 2 * w);
        uint32_t rest = m.v[1] & ~m.v[0];
        if (rest != 0) {
          int at = static_cast<int>(simt::atomic_add_shared(gathered, static_cast<uint32_t>(simt::popc(rest))));
          for (; rest != 0; rest &= rest - 1) {
            late_candidates()[at] = keys(32 * w + simt::ffs(rest) - 1);
            ++at;
          }
        }
      }
      sync(kCandidatesGathered);
      if (warp == 0) {
        const int n = s.count;  // every key of the bucket was gathered
        auto candidates_of_lane = [&](const auto& f) {
          const simt::sptr<Key> bucket_keys = late_candidates();
          for (int i = lane; i < n; i += 32) f(static_cast<Key>(bucket_keys[i]));
        };
        narrow_selection(WarpTeam(), s, candidates_of_lane, narrow, slots32, sel, sync);
        share_selection(s, narrow64, lane);
      }
      sync(kSelectionShared);
      s = shared_selection<Key>(narrow64);
    }
    const auto [vc, oc, wc] = outputs();
    uint32_t n_above = 0, n_ties = 0;
    for (int i = 0; i < own; ++i) {
      const int w = any_order(i);
      simt::Vec<uint32_t, 2> m = simt::load_vec<2>(masks + 2 * w);
      const uint32_t in_bucket = m.v[1] & ~m.v[0];
      if (late && in_bucket != 0) {  // each of the bucket's keys: above the final bucket, in it, or neither
        m = sort_bucket_keys(keys, w, in_bucket, m.v[0], s);
        simt::store_vec(masks + 2 * w, m);
      }
      n_above += static_cast<uint32_t>(simt::popc(m.v[0]));
      n_ties += static_cast<uint32_t>(simt::popc(m.v[1] & ~m.v[0]));
    }
    const uint64_t before = bitmap::block_exclusive_scan<uint64_t>(
        (static_cast<uint64_t>(n_above) << 32) | n_ties, slots, nullptr, [&] { sync(kCompactionScanned); },
        (used_words + 32 * per_thread - 1) / (32 * per_thread));
    const int ties_before = static_cast<int>(before & 0xffffffffu);
    int ties_left = s.need - ties_before;  // ties this thread may still keep
    // Where this thread's first kept value goes: the keys above the bucket and the kept ties
    // before it (so at most k - 1: every position stays inside the chunk's values).
    const int pos = static_cast<int>(before >> 32) + (ties_before < s.need ? ties_before : s.need);
    simt::gptr<Bits> vp = vc + pos;
    simt::gptr<uint16_t> op = oc ? oc + pos : nullptr;
    for (int w = t_begin; w < t_end; ++w) {
      const simt::Vec<uint32_t, 2> m = simt::load_vec<2>(masks + 2 * w);
      const uint32_t ties = m.v[1] & ~m.v[0];
      const int n_tie = simt::popc(ties);
      const uint32_t kept_ties = ties_left <= 0 ? 0u : (n_tie <= ties_left ? ties : bitmap::lowest_set_bits(ties, ties_left));
      ties_left -= n_tie;
      const uint32_t kept = m.v[0] | kept_ties;
      if (wc) wc[w] = static_cast<int32_t>(kept);
      write_kept(keys, kept, w, vp, op);
    }
    if (wc) {
      for (int w = used_words + tid; w < p.words; w += nthreads) wc[w] = 0;
    }
    // (A block's last chunk needs no barrier: nothing follows. With one block a chunk, the
    // launcher's grid, that is every chunk.)
    if (c + simt::grid_dim() < p.num_chunks) sync(kChunkDone);
  }
}

// Bitmap word w's masks against a bucket [lowest, highest], by one thread alone (pack_warps' lane
// w): {above, from}, bit j set if key 32w+j is above highest, resp. at least lowest (0 past L).
// A full word staged at a 16-byte boundary is read 16 bytes at a time, starting at a vector that
// depends on w (the 8 threads of a quarter warp then read 8 different bank groups); each vector's
// bits are shifted in at the bottom, so the masks come out rotated, and are rotated back once.
// Otherwise one key at a time, from key w on (consecutive words' threads, different banks), the
// same way.
// (Loops, not unrolled whole: straight-line code of this size would hide from the cost model.)
template <typename Bits, typename Key, KeySource Src>
DROPIT_DEVICE simt::Vec<uint32_t, 2> word_masks(const ChunkKeys<Bits, Key, Src>& keys, int w, int L, Key lowest,
                                                 Key highest) {
  const ChunkKeys<Bits, Key, Src> word = keys.from_word(w);
  const int n = L - 32 * w;  // the word's elements, when below 32
  uint32_t above = 0, from = 0;
  if constexpr (Src == KeySource::kSharedBits) {
    constexpr int V = simt::kVec16<Bits>;
    constexpr int kVecs = 32 / V;
    if (n >= 32 && simt::address(word.staged) % 16 == 0) {
      const int r = (kVecs >= 8 ? w : w * kVecs / 8) & (kVecs - 1);
      // Vector (i + r) mod kVecs for i = kVecs - 1 down to 0: one pointer, stepped down and
      // wrapped to the word's last vector after its first (no index arithmetic a vector). (For
      // 16-bit keys, 4 vectors a word, nvcc's index arithmetic was as short.)
      simt::sptr<Bits> at = word.staged + V * ((r - 1) & (kVecs - 1));
#if defined(__CUDACC__)
#pragma unroll 2
#endif
      for (int i = kVecs - 1; i >= 0; --i) {
        uint32_t a = 0, f = 0;
        if constexpr (sizeof(Bits) == 2) {
          at = word.staged + V * ((i + r) & (kVecs - 1));
          // Two keys a 32-bit word: the high one is compared where it is, against bounds moved
          // up 16 bits (its magnitude bits, the rest cleared: above highest iff above highest's
          // with all low bits set).
          const simt::Vec<uint32_t, 4> v = simt::load_vec<4>(simt::ptr_cast<uint32_t>(at));
          const uint32_t highest_hi = (static_cast<uint32_t>(highest) << 16) | 0xffffu;
          const uint32_t lowest_hi = static_cast<uint32_t>(lowest) << 16;
DROPIT_UNROLL
          for (int t = 0; t < V; ++t) {
            const uint32_t key = v.v[t / 2] & (t % 2 == 0 ? 0x7fffu : 0x7fff0000u);
            a |= static_cast<uint32_t>(key > (t % 2 == 0 ? static_cast<uint32_t>(highest) : highest_hi)) << t;
            f |= static_cast<uint32_t>(key >= (t % 2 == 0 ? static_cast<uint32_t>(lowest) : lowest_hi)) << t;
          }
        } else {
          const simt::Vec<Bits, V> v = simt::load_vec<V>(at);
DROPIT_UNROLL
          for (int t = 0; t < V; ++t) {
            const Key key = magnitude_key<Bits>(v.v[t]);
            a |= static_cast<uint32_t>(key > highest) << t;
            f |= static_cast<uint32_t>(key >= lowest) << t;
          }
        }
        above = (above << V) | a;
        from = (from << V) | f;
        if constexpr (sizeof(Bits) != 2) at = at == word.staged ? at + (32 - V) : at - V;
      }
      // Vector q of the word sits at (q - r) mod kVecs: rotate left by r vectors.
      const int rot = V * r;
      return simt::Vec<uint32_t, 2>{{(above << rot) | (above >> ((32 - rot) & 31)),
                                     (from << rot) | (from >> ((32 - rot) & 31))}};
    }
  }
  if (n > 0) {
    // Key (b + w) mod 32 of the word is shifted in at the bottom when it will end at bit b of the
    // masks; they are rotated back by w at the end.
    int j = w & 31;
    if (n >= 32) {
#if defined(__CUDACC__)
#pragma unroll 4
#endif
      for (int i = 0; i < 32; ++i) {
        j = (j - 1) & 31;
        const Key key = word(j);
        above = (above << 1) | static_cast<uint32_t>(key > highest);
        from = (from << 1) | static_cast<uint32_t>(key >= lowest);
      }
    } else {
#if defined(__CUDACC__)
#pragma unroll 1
#endif
      for (int i = 0; i < 32; ++i) {
        j = (j - 1) & 31;
        const bool in = j < n;
        const Key key = in ? word(j) : Key(0);
        above = (above << 1) | static_cast<uint32_t>(in && key > highest);
        from = (from << 1) | static_cast<uint32_t>(in && key >= lowest);
      }
    }
    const int rot = w & 31;
    above = (above << rot) | (above >> ((32 - rot) & 31));
    from = (from << rot) | (from >> ((32 - rot) & 31));
  }
  return simt::Vec<uint32_t, 2>{{above, from}};
}

// The body of the per-warp pack kernel: warp w of block b packs chunks b * warps + w, striding by
// the grid's warps, each chunk of at most kWarpMaxChunk elements, by the warp alone: a 1024-bin first
// digit (magnitude keys: WindowDigit; random keys, uniform already: the top bits); masks against the
// bucket's bounds, lane w computing bitmap word w's (at most 32 words); each lane's bucket keys of its
// word into its own slot (it reads back only what it wrote: no barrier) for the narrow digits, then
// sorted against the final bounds; one warp scan orders the kept values. Needs warp_smem_bytes().
template <typename Bits, typename Key, KeySource Src, typename Sync = simt::BlockSync>
DROPIT_DEVICE void pack_warps(const PackParams<Bits>& p, Sync sync = Sync()) {
  constexpr int kKeyBits = static_cast<int>(sizeof(Key) * 8) - (Src == KeySource::kRandom ? 0 : 1);
  constexpr bool kStaged = Src == KeySource::kSharedBits;
  static_assert(kWarpMaxChunk <= 32 * 32, "a chunk's bitmap words fit one a lane");
  const int lane = bitmap::lane_id();
  const int warp = bitmap::warp_id();
  const int nwarps = bitmap::num_warps();
  // This warp's shared memory (warp_smem_bytes, laid out in that order).
  const size_t warp_bytes = warp_smem_bytes(p.chunk, sizeof(Bits), Src == KeySource::kRandom);
  const simt::sptr<uint32_t> hist =
      simt::dynamic_shared<uint32_t>() + static_cast<int>(warp * warp_bytes / sizeof(uint32_t));
  // The first digit's bins: after 32 words of WindowDigit's counters below them, or before the 32
  // spare counters of TopBitsDigit's.
  const simt::sptr<uint32_t> bins = hist + (kStaged ? 32 : 0);
  const simt::sptr<Key> candidates = simt::ptr_cast<Key>(hist);  // lane l's i-th at i * 32 + l
  const simt::sptr<uint32_t> narrow = hist + static_cast<int>(warp_bins_bytes(sizeof(Key)) / sizeof(uint32_t));
  const simt::sptr<uint32_t> sel = narrow + kNarrowBins;
  const simt::sptr<Bits> staged_base = simt::ptr_cast<Bits>(sel + 4);

  for (int64_t c = static_cast<int64_t>(simt::block_idx()) * nwarps + warp; c < p.num_chunks;
       c += static_cast<int64_t>(simt::grid_dim()) * nwarps) {
    const int L = p.chunk_len(c);
    const int k = p.chunk_keep(c);
    const ChunkKeys<Bits, Key, Src> keys = chunk_keys<Key, Src>(p, c, staged_base);
    const ChunkOutputs<Bits> out = chunk_outputs(p, c);
    if (k == L) {
      keep_whole_chunk(out, keys.x, L, p.words, lane, 32);
      continue;
    }

    // ---- 1. the first digit ----
    // (The digit is made before the bins are cleared: a window's warp reduction overlaps the clear.)
    auto first = [&](const auto& digit) DROPIT_INLINE_LAMBDA {
      for (int i = lane; i < kWarpBins / 4; i += 32) simt::store_vec(bins + 4 * i, simt::Vec<uint32_t, 4>{});
      sync.warp(kWarpCleared);
      return first_digit(SoloWarpTeam(), digit, keys, L, k, kStaged, bins, hist + (kWarpBins + lane), sel, sel, sync,
                         kWarpCounted, 0, 0);
    };
    FirstBucket<Key> bucket;
    if constexpr (kStaged) {  // the window from a sample of the chunk: a key a lane, spread over it
      bucket = first(WindowDigit<Key>(magnitude_key<Bits>(keys.x[(lane * L) >> 5]), lane));
    } else {
      bucket = first(TopBitsDigit<Key, kWarpBits, kKeyBits>());
    }
    Selection<Key> s = bucket.s;

    // ---- 2. word `lane`'s masks against the bucket's bounds, by the lane alone ----
    const simt::Vec<uint32_t, 2> bounds = word_masks(keys, lane, L, bucket.lowest, bucket.highest);
    uint32_t above = bounds.v[0], from = bounds.v[1];
    if (!s.whole()) {
      // ---- 3. the bucket's keys of word `lane` into the lane's own slot; narrower digits; then
      // each of them above the final bucket, in it (a tie) or neither ----
      // The bucket's keys but those equal to its prefix (zeros, in bin 0's bucket: often half the
      // chunk after a ReLU), which the narrow digits count by number; `gathered`: their bits.
      const uint32_t in_bucket = from & ~above;
      const Key prefix = s.prefix;
      uint32_t gathered = 0;
      int mine = 0;
      for (uint32_t rest = in_bucket; rest != 0; rest &= rest - 1) {
        const int j = simt::ffs(rest) - 1;
        const Key key = keys(32 * lane + j);
        if (key != prefix) {
          candidates[mine * 32 + lane] = key;
          ++mine;
          gathered |= 1u << j;
        }
      }
      auto own_candidates = [&](const auto& f) {
        for (int i = 0; i < mine; ++i) f(static_cast<Key>(candidates[i * 32 + lane]));
      };
      narrow_selection(SoloWarpTeam(), s, own_candidates, narrow, sel, sel, sync);
      // (read back from the lane's slot, in the order they were put there)
      const simt::Vec<uint32_t, 2> m =
          sort_keys(gathered, above, s, [&](int i, int) { return static_cast<Key>(candidates[i * 32 + lane]); });
      above = m.v[0];
      // The keys equal to the first bucket's prefix are in the final bucket when it starts there.
      from = m.v[1] | (s.prefix == prefix ? in_bucket & ~gathered : 0u);
    }

    // ---- 4. compaction ----
    const uint32_t ties = from & ~above;
    const int n_tie = simt::popc(ties);
    // Keys above and ties of the words before this lane's (both below 2^16: a chunk is <= 1024).
    const uint32_t counts = (static_cast<uint32_t>(simt::popc(above)) << 16) | static_cast<uint32_t>(n_tie);
    const uint32_t before = bitmap::warp_inclusive_scan(counts) - counts;
    const int ties_before = static_cast<int>(before & 0xffffu);
    const int ties_left = s.need - ties_before;
    const uint32_t kept_ties =
        ties_left <= 0 ? 0u : (n_tie <= ties_left ? ties : bitmap::lowest_set_bits(ties, ties_left));
    const uint32_t kept = above | kept_ties;
    if (out.bitmap && lane < p.words) out.bitmap[lane] = static_cast<int32_t>(kept);
    const int pos = static_cast<int>(before >> 16) + (ties_before < s.need ? ties_before : s.need);
    simt::gptr<Bits> vp = out.values + pos;
    simt::gptr<uint16_t> op = out.offsets ? out.offsets + pos : nullptr;
    write_kept(keys, kept, lane, vp, op);
    // No barrier before the next chunk: it writes the staged chunk only after kWarpCleared, which
    // every lane reaches after its last read here, and its bins (over the candidates) only after
    // every lane has gone past the compaction's scan, which takes what the lane read of them.
  }
}

}  // namespace kernels
}  // namespace dropit
