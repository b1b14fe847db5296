// CPU pack/unpack: the reference implementation of the selection contract.
//
// Per chunk: a radix select finds the keep-th largest key t (one 12-bit
// histogram pass, then an exact select among the keys of t's bucket), and one
// ordered pass keeps every key > t plus the first (keep - #{key > t}) keys == t.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "../ops.h"

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
// Below this length a direct select beats the histogram.
constexpr int64_t kSmallChunk = 64;

// Keys of one chunk, computed on the fly from the stored bit patterns.
template <typename Bits>
struct MagnitudeKeys {
  using Key = Bits;
  const Bits* bits;
  Key operator()(int64_t i) const { return magnitude_key<Bits>(bits[i]); }
};

struct RandomKeys {
  using Key = uint32_t;
  uint64_t seed;
  int64_t base;  // global index of the chunk's first element
  Key operator()(int64_t i) const { return random_key(seed, static_cast<uint64_t>(base + i)); }
};

template <typename Key>
struct Threshold {
  Key key;          // the keep-th largest key
  int64_t above;    // number of keys strictly greater than `key`
};

template <typename Key>
Threshold<Key> threshold_of(std::vector<Key>& cand, int64_t need) {
  std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(), std::greater<Key>());
  const Key t = cand[need - 1];
  return {t, static_cast<int64_t>(std::count_if(cand.begin(), cand.end(), [t](Key v) { return v > t; }))};
}

// Adds chunk keys' top digits to two interleaved histograms (they halve the stalls of
// incrementing one hot bin back to back). With Track, returns the range of digits seen, so that
// small chunks scan and clear only it; for large ones the whole range is cheaper than tracking.
template <bool Track, typename KeyFn>
std::pair<int, int> count_digits(const KeyFn& key_of, int64_t L, int32_t* even, int32_t* odd) {
  constexpr int shift = sizeof(typename KeyFn::Key) * 8 - kDigitBits;
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

// Per-thread scratch of the select: candidate keys, and the two histograms, kept zeroed between
// chunks by clearing only the bins a chunk touched.
template <typename Key>
struct SelectScratch {
  std::vector<Key> cand;
  std::vector<int32_t> hist = std::vector<int32_t>(2 * kBins, 0);
};

// The keep-th largest key of a chunk and how many keys lie above it.
template <typename Key, typename KeyFn>
Threshold<Key> select_threshold(const KeyFn& key_of, int64_t L, int64_t k, SelectScratch<Key>& s) {
  std::vector<Key>& cand = s.cand;
  cand.clear();
  if (L <= kSmallChunk) {
    for (int64_t i = 0; i < L; ++i) cand.push_back(key_of(i));
    return threshold_of(cand, k);
  }
  constexpr int shift = sizeof(Key) * 8 - kDigitBits;
  // Finds the bucket of the keep-th largest key from the histograms, then selects among the keys
  // of that bucket (all of them are candidates).
  auto select_in_bucket = [&](const int32_t* even, const int32_t* odd, int hi) {
    int64_t above = 0;
    int bucket = hi;
    while (above + even[bucket] + odd[bucket] < k) above += even[bucket] + odd[bucket], --bucket;
    for (int64_t j = 0; j < L; ++j) {
      const Key v = key_of(j);
      if (static_cast<int>(v >> shift) == bucket) cand.push_back(v);
    }
    Threshold<Key> th = threshold_of(cand, k - above);
    th.above += above;
    return th;
  };
  if (L >= 2 * kBins) {
    // Large chunks: a fresh local histogram. Being local, the compiler knows the counts don't
    // alias the input, which keeps the counting loop tight.
    std::array<int32_t, 2 * kBins> local{};
    count_digits<false>(key_of, L, local.data(), local.data() + kBins);
    return select_in_bucket(local.data(), local.data() + kBins, kBins - 1);
  }
  // Small chunks: the zeroed scratch histogram; only the digits seen are scanned and cleared (at
  // D = 1024 this is 4-5x faster than a direct select; for large chunks tracking costs more).
  int32_t* even = s.hist.data();
  int32_t* odd = even + kBins;
  const auto [lo, hi] = count_digits<true>(key_of, L, even, odd);
  Threshold<Key> th = select_in_bucket(even, odd, hi);
  std::fill(even + lo, even + hi + 1, 0);
  std::fill(odd + lo, odd + hi + 1, 0);
  return th;
}

// Bit j of `above` / `equal`: whether key base+j is greater than / equal to t, for one full
// word of 32 keys. With SSE2, 16- and 32-bit keys are compared 8 or 4 at a time (unsigned order
// through the sign-flip trick); otherwise one by one.
template <typename KeyFn, typename Key>
inline void compare_word(const KeyFn& key_of, int64_t base, Key t, uint32_t& above, uint32_t& equal) {
#if defined(__SSE2__)
  if constexpr (sizeof(Key) == 4 || sizeof(Key) == 2) {
    constexpr int lanes = 16 / sizeof(Key);
    alignas(16) Key keys[32];
    for (int j = 0; j < 32; ++j) keys[j] = key_of(base + j);
    if constexpr (sizeof(Key) == 4) {
      const __m128i flip = _mm_set1_epi32(INT32_MIN);
      const __m128i tv = _mm_xor_si128(_mm_set1_epi32(static_cast<int32_t>(t)), flip);
      for (int q = 0; q < 32 / lanes; ++q) {
        const __m128i v = _mm_xor_si128(_mm_load_si128(reinterpret_cast<const __m128i*>(keys) + q), flip);
        above |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(v, tv)))) << (q * lanes);
        equal |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(v, tv)))) << (q * lanes);
      }
    } else {
      const __m128i flip = _mm_set1_epi16(INT16_MIN);
      const __m128i tv = _mm_xor_si128(_mm_set1_epi16(static_cast<int16_t>(t)), flip);
      for (int q = 0; q < 32 / lanes; ++q) {
        const __m128i v = _mm_xor_si128(_mm_load_si128(reinterpret_cast<const __m128i*>(keys) + q), flip);
        // packs 16-bit masks to bytes so movemask yields one bit per key
        const __m128i gt = _mm_packs_epi16(_mm_cmpgt_epi16(v, tv), _mm_setzero_si128());
        const __m128i eq = _mm_packs_epi16(_mm_cmpeq_epi16(v, tv), _mm_setzero_si128());
        above |= static_cast<uint32_t>(_mm_movemask_epi8(gt) & 0xFF) << (q * lanes);
        equal |= static_cast<uint32_t>(_mm_movemask_epi8(eq) & 0xFF) << (q * lanes);
      }
    }
    return;
  }
#endif
  for (int j = 0; j < 32; ++j) {
    const Key v = key_of(base + j);
    above |= static_cast<uint32_t>(v > t) << j;
    equal |= static_cast<uint32_t>(v == t) << j;
  }
}

// make_keys(c) gives the key functor of chunk c.
template <typename Bits, typename MakeKeys>
void pack_chunks(const Bits* x, Bits* values, int32_t* bitmap, uint16_t* offsets,
                 const ChunkGeometry& g, const MakeKeys& make_keys) {
  using Key = typename decltype(make_keys(0))::Key;
  at::parallel_for(0, g.num_chunks, 1, [&](int64_t begin, int64_t end) {
    SelectScratch<Key> scratch;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t L = g.chunk_len(c), k = g.chunk_keep(c);
      const Bits* xc = x + c * g.chunk;
      Bits* vc = values + c * g.keep;
      const auto key_of = make_keys(c);
      int32_t* words = bitmap ? bitmap + c * g.words : nullptr;
      uint16_t* offs = offsets ? offsets + c * g.keep : nullptr;
      Threshold<Key> th{0, 0};  // keep == L: threshold 0 with L ties keeps every key
      if (k < L) th = select_threshold<Key>(key_of, L, k, scratch);
      // Keys above the threshold are kept; keys equal to it are kept in index order until `ties`
      // of them are taken. Both masks of a word are built branch-free.
      int64_t ties = k - th.above;
      int64_t pos = 0;
      for (int64_t w = 0; w * 32 < L; ++w) {
        const int64_t base = w * 32;
        uint32_t above = 0, equal = 0;
        if (L - base >= 32) {
          compare_word(key_of, base, th.key, above, equal);
        } else {
          for (int64_t j = 0; j < L - base; ++j) {
            const Key v = key_of(base + j);
            above |= static_cast<uint32_t>(v > th.key) << j;
            equal |= static_cast<uint32_t>(v == th.key) << j;
          }
        }
        if (equal) {  // rare: keys equal to the threshold
          if (__builtin_popcount(equal) > ties) {  // only the lowest `ties` of them fit
            uint32_t first = 0;
            for (int64_t r = 0; r < ties; ++r, equal &= equal - 1) first |= equal & (0u - equal);
            equal = first;
          }
          ties -= __builtin_popcount(equal);
        }
        uint32_t word = above | equal;
        if (words) words[w] = static_cast<int32_t>(word);
        for (; word; word &= word - 1, ++pos) {
          const int j = __builtin_ctz(word);
          vc[pos] = xc[base + j];
          if (offs) offs[pos] = static_cast<uint16_t>(base + j);
        }
      }
      if (words) {
        for (int64_t w = (L + 31) / 32; w < g.words; ++w) words[w] = 0;
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
    marked += __builtin_popcount(word);
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
  at::parallel_for(0, g.num_chunks, 1, [&](int64_t begin, int64_t end) {
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
