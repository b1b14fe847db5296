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
#include <vector>

#include "../ops.h"

namespace dropit {
namespace {

constexpr int kDigitBits = 12;
constexpr int kBins = 1 << kDigitBits;
// Below this length a direct select is cheaper than clearing the histogram.
constexpr int64_t kSmallChunk = 2048;

template <typename Key>
struct Threshold {
  Key key;          // the keep-th largest key
  int64_t above;    // number of keys strictly greater than `key`
};

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

template <typename Key, typename KeyFn>
Threshold<Key> select_threshold(const KeyFn& key_of, int64_t L, int64_t k, std::vector<Key>& cand) {
  cand.clear();
  if (L <= kSmallChunk) {
    for (int64_t i = 0; i < L; ++i) cand.push_back(key_of(i));
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), std::greater<Key>());
    Key t = cand[k - 1];
    int64_t above = std::count_if(cand.begin(), cand.end(), [t](Key v) { return v > t; });
    return {t, above};
  }
  constexpr int shift = sizeof(Key) * 8 - kDigitBits;
  std::array<int32_t, kBins> hist{};
  for (int64_t i = 0; i < L; ++i) ++hist[key_of(i) >> shift];
  int64_t above = 0;
  int bucket = kBins - 1;
  while (above + hist[bucket] < k) above += hist[bucket--];
  for (int64_t i = 0; i < L; ++i) {
    Key v = key_of(i);
    if (static_cast<int>(v >> shift) == bucket) cand.push_back(v);
  }
  int64_t need = k - above;  // 1 <= need <= cand.size()
  std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(), std::greater<Key>());
  Key t = cand[need - 1];
  above += std::count_if(cand.begin(), cand.end(), [t](Key v) { return v > t; });
  return {t, above};
}

// make_keys(c) gives the key functor of chunk c.
template <typename Bits, typename MakeKeys>
void pack_chunks(const Bits* x, Bits* values, int32_t* bitmap, uint16_t* offsets,
                 const ChunkGeometry& g, const MakeKeys& make_keys) {
  at::parallel_for(0, g.num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<typename decltype(make_keys(0))::Key> cand;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t L = g.chunk_len(c), k = g.chunk_keep(c);
      const Bits* xc = x + c * g.chunk;
      Bits* vc = values + c * g.keep;
      const auto key_of = make_keys(c);
      using Key = typename std::decay_t<decltype(key_of)>::Key;
      int32_t* words = bitmap ? bitmap + c * g.words : nullptr;
      uint16_t* offs = offsets ? offsets + c * g.keep : nullptr;
      if (k == L) {  // keep everything: no selection needed
        std::memcpy(vc, xc, L * sizeof(Bits));
        if (words) {
          for (int64_t w = 0; w < g.words; ++w) {
            int64_t n = std::min<int64_t>(32, std::max<int64_t>(0, L - 32 * w));
            words[w] = n == 32 ? -1 : static_cast<int32_t>((1u << n) - 1u);
          }
        } else {
          for (int64_t i = 0; i < L; ++i) offs[i] = static_cast<uint16_t>(i);
        }
        continue;
      }
      Threshold<Key> th = select_threshold<Key>(key_of, L, k, cand);
      int64_t ties_left = k - th.above;
      int64_t pos = 0;
      uint32_t word = 0;
      for (int64_t i = 0; i < L; ++i) {
        Key v = key_of(i);
        bool kept = v > th.key || (v == th.key && ties_left > 0);
        if (kept) {
          ties_left -= (v == th.key);
          vc[pos] = xc[i];
          if (offs) offs[pos] = static_cast<uint16_t>(i);
          ++pos;
          word |= 1u << (i & 31);
        }
        if (words && ((i & 31) == 31 || i + 1 == L)) {
          words[i >> 5] = static_cast<int32_t>(word);
          word = 0;
        }
      }
      if (words) {
        for (int64_t w = (L + 31) / 32; w < g.words; ++w) words[w] = 0;
      }
    }
  });
}

template <typename Bits>
void unpack_chunks(const Bits* values, const int32_t* bitmap, const uint16_t* offsets, Bits* out,
                   const ChunkGeometry& g) {
  at::parallel_for(0, g.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t L = g.chunk_len(c), k = g.chunk_keep(c);
      const Bits* vc = values + c * g.keep;
      Bits* oc = out + c * g.chunk;
      std::memset(oc, 0, L * sizeof(Bits));
      if (bitmap) {
        const int32_t* words = bitmap + c * g.words;
        int64_t pos = 0;
        for (int64_t w = 0; w < g.words; ++w) {
          uint32_t word = static_cast<uint32_t>(words[w]);
          TORCH_CHECK_VALUE(pos + __builtin_popcount(word) <= k && (word == 0 || 32 * w + 31 - __builtin_clz(word) < L),
                            "corrupt bitmap in chunk ", c, ": it marks more than keep=", k,
                            " elements or elements past the chunk's end");
          while (word) {
            int j = __builtin_ctz(word);
            oc[32 * w + j] = vc[pos++];
            word &= word - 1;
          }
        }
        TORCH_CHECK_VALUE(pos == k, "corrupt bitmap in chunk ", c, ": it marks ", pos,
                          " elements, keep is ", k);
      } else {
        const uint16_t* offs = offsets + c * g.keep;
        for (int64_t r = 0; r < k; ++r) {
          TORCH_CHECK_VALUE(offs[r] < L, "corrupt offsets in chunk ", c, ": offset ", offs[r],
                            " is past the chunk's length ", L);
          oc[offs[r]] = vc[r];
        }
      }
    }
  });
}

template <typename Fn>
void dispatch_bits(at::ScalarType t, Fn&& fn) {
  switch (at::elementSize(t)) {
    case 2: fn(uint16_t{}); break;
    case 4: fn(uint32_t{}); break;
    default: fn(uint64_t{}); break;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pack_cpu(const at::Tensor& x, double gamma, int64_t chunk,
                                            bool bitmap, std::optional<int64_t> seed) {
  ChunkGeometry g = check_pack_args(x, gamma, chunk);
  auto [values, index] = allocate_packed(x, g, bitmap);
  if (g.numel == 0) return {values, index};
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
