// CPU pack/unpack: the reference implementation of the selection contract.
//
// Pack, per chunk: a 12-bit histogram of the keys' top digits finds the bucket that holds the
// keep-th largest key. One ordered pass then marks the keys above that bucket and gathers the
// bucket's keys with their positions (a few percent of the chunk); an exact select among those
// gives the threshold t, and the keys equal to t are taken in index order until keep is reached.
// Last, the kept values are copied out word by word of that keep mask.
#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "../ops.h"
#include "parallel_cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace dropit {
namespace {

constexpr int kDigitBits = 12;
constexpr int kBins = 1 << kDigitBits;
// Up to this length a chunk skips the histogram: all its keys are candidates.
constexpr int64_t kSmallChunk = 64;

// Keys of one chunk, computed on the fly. kBits: the low bits a key can use; the top digit is
// taken just below them, so that a magnitude key's sign bit (always clear) wastes no bins.
template <typename Bits>
struct MagnitudeKeys {
  using Key = Bits;
  static constexpr int kBits = sizeof(Bits) * 8 - 1;
  const Bits* bits;
  Key operator()(int64_t i) const { return magnitude_key<Bits>(bits[i]); }
};

struct RandomKeys {
  using Key = uint32_t;
  static constexpr int kBits = 32;
  uint64_t seed;
  int64_t base;  // global index of the chunk's first element
  Key operator()(int64_t i) const { return random_key(seed, static_cast<uint64_t>(base + i)); }
};

template <typename KeyFn>
constexpr int kTopShift = KeyFn::kBits - kDigitBits;

// Adds chunk keys' top digits to two interleaved histograms (they halve the stalls of
// incrementing one hot bin back to back). With Track, returns the range of digits seen, so that
// small chunks scan and clear only it; for large ones the whole range is cheaper than tracking.
template <bool Track, typename KeyFn>
std::pair<int, int> count_digits(const KeyFn& key_of, int64_t L, int32_t* even, int32_t* odd) {
  constexpr int shift = kTopShift<KeyFn>;
  int lo = Track ? kBins - 1 : 0, hi = Track ? 0 : kBins - 1;  // locals: kept in registers
  int64_t i = 0;
  for (; i + 1 < L; i += 2) {
    const int d0 = static_cast<int>(key_of(i) >> shift), d1 = static_cast<int>(key_of(i + 1) >> shift);
    ++even[d0];
    ++odd[d1];
    if constexpr (Track) {
      lo = std::min(lo, std::min(d0, d1));
      hi = std::max(hi, std::max(d0, d1));
    }
  }
  if (i < L) {
    const int d = static_cast<int>(key_of(i) >> shift);
    ++even[d];
    lo = std::min(lo, d);
    hi = std::max(hi, d);
  }
  return {lo, hi};
}

// The keys of the bucket that holds the keep-th largest key, and how many keys lie above it.
template <typename Key>
struct Bucket {
  Key lo, hi;
  int64_t above;
};

// The bucket of the k-th largest key from the two histograms, whose bins above `top` are empty.
// The walk down skips 16 bins at a time: most of the top of the range is empty.
template <typename KeyFn, typename Key = typename KeyFn::Key>
Bucket<Key> bucket_from_histogram(const int32_t* even, const int32_t* odd, int top, int64_t k) {
  constexpr int kGroup = 16;
  int64_t above = 0;
  int d = top;
  for (; d >= kGroup - 1; d -= kGroup) {
    int64_t group = 0;
    for (int j = 0; j < kGroup; ++j) group += even[d - j] + odd[d - j];
    if (above + group >= k) break;
    above += group;
  }
  while (above + even[d] + odd[d] < k) above += even[d] + odd[d], --d;
  constexpr int shift = kTopShift<KeyFn>;
  const Key lo = static_cast<Key>(static_cast<Key>(d) << shift);
  return {lo, static_cast<Key>(lo | ((Key{1} << shift) - 1)), above};
}

// The histogram of chunks shorter than 2 * kBins, one per thread: zero between uses (each chunk
// clears the bins it counted), so a small pack neither allocates nor clears 32 KB.
int32_t* zeroed_histogram() {
  alignas(64) thread_local std::array<int32_t, 2 * kBins> hist{};
  return hist.data();
}

// Per-thread scratch of pack, sized for the longest chunk of one call (not the chunk size: a
// small tensor packed with the default D = 16384 would otherwise write 200 KB of scratch per call,
// more than its own pack). Left uninitialised: every element is written before it is read.
template <typename Key>
struct PackScratch {
  int32_t* hist = zeroed_histogram();
  std::vector<uint32_t> keep;         // the chunk's keep mask, a bit per element, even words
  std::unique_ptr<Key[]> cand_keys;   // the threshold bucket's keys, in index order
  std::unique_ptr<uint16_t[]> cand_pos;  // and their positions in the chunk
  std::unique_ptr<Key[]> select;      // a copy of cand_keys the select reorders
  explicit PackScratch(int64_t longest)
      : keep((longest + 63) / 64 * 2), cand_keys(new Key[longest]), cand_pos(new uint16_t[longest]),
        select(new Key[longest]) {}
};

template <typename KeyFn, typename Key = typename KeyFn::Key>
Bucket<Key> find_bucket(const KeyFn& key_of, int64_t L, int64_t k, PackScratch<Key>& s) {
  if (L <= kSmallChunk) return {Key{0}, std::numeric_limits<Key>::max(), 0};
  if (L >= 2 * kBins) {
    // Large chunks: a fresh local histogram. Being local, the compiler knows the counts don't
    // alias the input, which keeps the counting loop tight.
    std::array<int32_t, 2 * kBins> local{};
    count_digits<false>(key_of, L, local.data(), local.data() + kBins);
    return bucket_from_histogram<KeyFn>(local.data(), local.data() + kBins, kBins - 1, k);
  }
  // Smaller chunks: the zeroed scratch histogram; only the digits seen are scanned and cleared
  // (at D = 1024 this is 4-5x faster than a direct select).
  int32_t* even = s.hist;
  int32_t* odd = even + kBins;
  const auto [lo, hi] = count_digits<true>(key_of, L, even, odd);
  const Bucket<Key> b = bucket_from_histogram<KeyFn>(even, odd, hi, k);
  std::fill(even + lo, even + hi + 1, 0);
  std::fill(odd + lo, odd + hi + 1, 0);
  return b;
}

// The keys of one word of `len` (<= 32) keys from `base` into keys[], and two masks over them:
// bit j of `above` / `inside`: whether key j is greater than hi / within [lo, hi]. With SSE2,
// full words of 16- and 32-bit keys are compared 8 or 4 at a time (unsigned order through the
// sign-flip trick).
template <typename KeyFn, typename Key>
inline void classify_word(const KeyFn& key_of, int64_t base, int len, Key lo, Key hi, Key* keys,
                          uint32_t& above, uint32_t& inside) {
  if (len == 32) {
    for (int j = 0; j < 32; ++j) keys[j] = key_of(base + j);  // a fixed count: vectorised
  } else {
    for (int j = 0; j < len; ++j) keys[j] = key_of(base + j);
  }
#if defined(__SSE2__)
  if constexpr (sizeof(Key) == 4 || sizeof(Key) == 2) {
    if (len == 32) {
      constexpr int lanes = 16 / sizeof(Key);
      const bool wide = sizeof(Key) == 4;
      const __m128i flip = wide ? _mm_set1_epi32(INT32_MIN) : _mm_set1_epi16(INT16_MIN);
      const __m128i lov = _mm_xor_si128(wide ? _mm_set1_epi32(static_cast<int32_t>(lo))
                                             : _mm_set1_epi16(static_cast<int16_t>(lo)), flip);
      const __m128i hiv = _mm_xor_si128(wide ? _mm_set1_epi32(static_cast<int32_t>(hi))
                                             : _mm_set1_epi16(static_cast<int16_t>(hi)), flip);
      uint32_t below = 0;
      above = 0;
      for (int q = 0; q < 32 / lanes; ++q) {
        const __m128i v = _mm_xor_si128(_mm_load_si128(reinterpret_cast<const __m128i*>(keys) + q), flip);
        uint32_t gt, lt;
        if constexpr (sizeof(Key) == 4) {
          gt = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(v, hiv)));
          lt = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(lov, v)));
        } else {  // pack the 16-bit masks to bytes so movemask yields one bit per key
          gt = _mm_movemask_epi8(_mm_packs_epi16(_mm_cmpgt_epi16(v, hiv), _mm_setzero_si128())) & 0xFF;
          lt = _mm_movemask_epi8(_mm_packs_epi16(_mm_cmpgt_epi16(lov, v), _mm_setzero_si128())) & 0xFF;
        }
        above |= gt << (q * lanes);
        below |= lt << (q * lanes);
      }
      inside = ~(above | below);
      return;
    }
  }
#endif
  above = inside = 0;
  for (int j = 0; j < len; ++j) {
    above |= static_cast<uint32_t>(keys[j] > hi) << j;
    inside |= static_cast<uint32_t>(keys[j] >= lo && keys[j] <= hi) << j;
  }
}

// One ordered pass over the chunk: keep[w] gets the keys above the bucket, and the bucket's keys
// and positions are appended to the scratch in index order. Returns how many there are.
template <typename KeyFn, typename Key = typename KeyFn::Key>
int64_t mark_above_gather_bucket(const KeyFn& key_of, int64_t L, const Bucket<Key>& b, PackScratch<Key>& s) {
  int64_t m = 0;
  alignas(16) Key keys[32];
  for (int64_t w = 0; w * 32 < L; ++w) {
    const int64_t base = 32 * w;
    uint32_t above, inside;
    classify_word(key_of, base, static_cast<int>(std::min<int64_t>(32, L - base)), b.lo, b.hi, keys, above, inside);
    s.keep[w] = above;
    for (; inside; inside &= inside - 1, ++m) {
      const int j = __builtin_ctz(inside);
      s.cand_keys[m] = keys[j];
      s.cand_pos[m] = static_cast<uint16_t>(base + j);
    }
  }
  return m;
}

// The need-th largest of keys[0, m) (reordered) and how many of them are greater.
template <typename Key>
std::pair<Key, int64_t> threshold_of(Key* keys, int64_t m, int64_t need) {
  std::nth_element(keys, keys + (need - 1), keys + m, std::greater<Key>());
  const Key t = keys[need - 1];
  return {t, static_cast<int64_t>(std::count_if(keys, keys + m, [t](Key v) { return v > t; }))};
}

// Chunk's keep mask into s.keep: its k largest keys, ties to the lower index. Bits past L are 0.
template <typename KeyFn, typename Key = typename KeyFn::Key>
void select_chunk(const KeyFn& key_of, int64_t L, int64_t k, PackScratch<Key>& s) {
  const int64_t nwords = (L + 31) / 32;
  if (nwords % 2) s.keep[nwords] = 0;  // the copy-out reads whole pairs of words
  if (k == L) {  // every key: no select
    std::fill(s.keep.begin(), s.keep.begin() + nwords, ~0u);
    if (L % 32) s.keep[nwords - 1] = (1u << (L % 32)) - 1u;
    return;
  }
  const Bucket<Key> b = find_bucket(key_of, L, k, s);
  const int64_t m = mark_above_gather_bucket(key_of, L, b, s);
  const int64_t need = k - b.above;  // taken from the bucket: 1 <= need <= m
  std::copy(s.cand_keys.get(), s.cand_keys.get() + m, s.select.get());
  const auto [t, greater] = threshold_of(s.select.get(), m, need);
  // Keys above t are kept; keys equal to t in index order until `ties` of them are taken.
  // Branch-free: whether a candidate is kept is data, a coin flip for the predictor.
  int64_t ties = need - greater;
  for (int64_t i = 0; i < m; ++i) {
    const Key v = s.cand_keys[i];
    const bool tie = v == t && ties > 0;
    ties -= tie;
    const uint32_t pos = s.cand_pos[i];
    s.keep[pos >> 5] |= static_cast<uint32_t>(v > t || tie) << (pos & 31);
  }
}

// make_keys(c) gives the key functor of chunk c.
template <typename Bits, typename MakeKeys>
void pack_chunks(const Bits* x, Bits* values, int32_t* bitmap, uint16_t* offsets,
                 const ChunkGeometry& g, const MakeKeys& make_keys) {
  using Key = typename decltype(make_keys(0))::Key;
  at::parallel_for(0, g.num_chunks, grain_items(g.chunk), [&](int64_t begin, int64_t end) {
    PackScratch<Key> scratch(std::min(g.chunk, g.numel));
    for (int64_t c = begin; c < end; ++c) {
      const int64_t L = g.chunk_len(c);
      select_chunk(make_keys(c), L, g.chunk_keep(c), scratch);
      // Copy the kept values out in index order, with the chunk's bitmap words or offsets.
      const Bits* xc = x + c * g.chunk;
      Bits* vc = values + c * g.keep;
      const int64_t nwords = (L + 31) / 32;
      if (bitmap) {
        int32_t* words = bitmap + c * g.words;
        std::copy(scratch.keep.begin(), scratch.keep.begin() + nwords, words);
        std::fill(words + nwords, words + g.words, 0);
      }
      uint16_t* offs = offsets ? offsets + c * g.keep : nullptr;
      int64_t pos = 0;
      // 64 elements per step: the loop over a word's set bits ends (and mispredicts) half as often.
      for (int64_t w = 0; w < nwords; w += 2) {
        uint64_t bits = scratch.keep[w] | static_cast<uint64_t>(scratch.keep[w + 1]) << 32;
        for (; bits; bits &= bits - 1, ++pos) {
          const int64_t j = 32 * w + __builtin_ctzll(bits);
          vc[pos] = xc[j];
          if (offs) offs[pos] = static_cast<uint16_t>(j);
        }
      }
    }
  });
}

// Asks for transparent huge pages on a large, freshly allocated output before it is first
// written: faulting in 4 KB pages one by one otherwise costs more than the unpack itself.
void prefer_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint
#else
  (void)data;
  (void)bytes;
#endif
}

// Bits set in a word. Without the popcnt instruction (baseline x86-64) the builtin is a call.
inline int popcount32(uint32_t v) {
#if defined(__x86_64__) && !defined(__POPCNT__)
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  return static_cast<int>((((v + (v >> 4)) & 0x0F0F0F0Fu) * 0x01010101u) >> 24);
#else
  return __builtin_popcount(v);
#endif
}

// Checks that chunk c's bitmap marks exactly `k` elements, none past the chunk's end, so that a
// corrupt Packed can't make unpack read or write out of bounds.
void check_bitmap_chunk(const int32_t* words, int64_t nwords, int64_t L, int64_t k, int64_t c) {
  int64_t marked = 0;
  for (int64_t w = 0; w < nwords; ++w) {
    const uint32_t word = static_cast<uint32_t>(words[w]);
    const int64_t valid = std::clamp<int64_t>(L - 32 * w, 0, 32);
    const uint32_t outside = valid == 32 ? 0u : ~((1u << valid) - 1u);
    TORCH_CHECK_VALUE((word & outside) == 0, "corrupt bitmap in chunk ", c,
                      ": it marks elements past the chunk's length ", L);
    marked += popcount32(word);
  }
  TORCH_CHECK_VALUE(marked == k, "corrupt bitmap in chunk ", c, ": it marks ", marked,
                    " elements, keep is ", k);
}

// Checks that chunk c's k offsets are strictly ascending and below the chunk's length L: the
// only offsets pack writes, so a tampered index is rejected instead of rebuilding another tensor.
void check_offsets_chunk(const uint16_t* offs, int64_t k, int64_t L, int64_t c) {
  for (int64_t r = 0; r < k; ++r) {
    TORCH_CHECK_VALUE(offs[r] < L, "corrupt offsets in chunk ", c, ": offset ", offs[r],
                      " at position ", r, " is past the chunk's length ", L);
    TORCH_CHECK_VALUE(r == 0 || offs[r] > offs[r - 1], "corrupt offsets in chunk ", c,
                      ": they must be strictly ascending, got ", offs[r], " after ", offs[r - 1],
                      " at position ", r);
  }
}

template <typename Bits>
void unpack_chunks(const Bits* values, const int32_t* bitmap, const uint16_t* offsets, Bits* out,
                   const ChunkGeometry& g) {
  at::parallel_for(0, g.num_chunks, grain_items(g.chunk), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t L = g.chunk_len(c), k = g.chunk_keep(c);
      const Bits* vc = values + c * g.keep;
      Bits* oc = out + c * g.chunk;
      if (bitmap) {
        // Word by word: zero 32 outputs, then place the marked values while the line is in L1.
        const int32_t* words = bitmap + c * g.words;
        check_bitmap_chunk(words, g.words, L, k, c);  // so pos stays below k
        int64_t pos = 0;
        for (int64_t w = 0; w * 32 < L; ++w) {
          Bits* o = oc + 32 * w;
          std::memset(o, 0, std::min<int64_t>(32, L - 32 * w) * sizeof(Bits));
          for (uint32_t word = static_cast<uint32_t>(words[w]); word; word &= word - 1) {
            o[__builtin_ctz(word)] = vc[pos++];
          }
        }
      } else {
        const uint16_t* offs = offsets + c * g.keep;
        check_offsets_chunk(offs, k, L, c);
        std::memset(oc, 0, L * sizeof(Bits));
        for (int64_t r = 0; r < k; ++r) oc[offs[r]] = vc[r];
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pack_cpu(const at::Tensor& x, double gamma, int64_t chunk,
                                            bool bitmap, std::optional<int64_t> seed) {
  ChunkGeometry g = check_pack_args(x, gamma, chunk);
  auto [values, index] = allocate_packed(x, g, bitmap);
  if (g.numel == 0) return {values, index};
  prefer_huge_pages(values.data_ptr(), values.nbytes());
  dispatch_bits(x.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    const Bits* xp = static_cast<const Bits*>(x.const_data_ptr());
    Bits* vp = static_cast<Bits*>(values.data_ptr());
    int32_t* bp = bitmap ? index.data_ptr<int32_t>() : nullptr;
    uint16_t* op = bitmap ? nullptr : static_cast<uint16_t*>(index.data_ptr());
    if (seed.has_value()) {
      const uint64_t s = static_cast<uint64_t>(*seed);
      pack_chunks(xp, vp, bp, op, g, [&](int64_t c) { return RandomKeys{s, c * g.chunk}; });
    } else {
      pack_chunks(xp, vp, bp, op, g, [&](int64_t c) { return MagnitudeKeys<Bits>{xp + c * g.chunk}; });
    }
  });
  return {values, index};
}

at::Tensor unpack_cpu(const at::Tensor& values, const at::Tensor& index, int64_t numel,
                      double gamma, int64_t chunk, bool bitmap) {
  ChunkGeometry g = check_unpack_args(values, index, numel, gamma, chunk, bitmap);
  at::Tensor out = at::empty({numel}, values.options());
  if (numel == 0) return out;
  prefer_huge_pages(out.data_ptr(), out.nbytes());
  dispatch_bits(values.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    unpack_chunks<Bits>(static_cast<const Bits*>(values.const_data_ptr()),
                        bitmap ? index.const_data_ptr<int32_t>() : nullptr,
                        bitmap ? nullptr : static_cast<const uint16_t*>(index.const_data_ptr()),
                        static_cast<Bits*>(out.data_ptr()), g);
  });
  return out;
}

}  // namespace dropit
