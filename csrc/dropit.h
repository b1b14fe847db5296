// Shared geometry and key math of DropIT's packed format.
//
// Everything here is plain C++ usable from host code, CUDA device code and the
// host SIMT layer alike (DROPIT_HD marks functions for both sides).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DROPIT_HD __host__ __device__ __forceinline__
#else
#define DROPIT_HD inline
#endif

namespace dropit {

constexpr int64_t kMaxChunk = 65536;  // offsets are 16-bit local positions

// Number of elements a chunk of length L keeps: L - floor(gamma * L), in double.
inline int64_t keep_count(int64_t L, double gamma) {
  return L - static_cast<int64_t>(std::floor(gamma * static_cast<double>(L)));
}

// Geometry of one packed tensor: n elements split in chunks of D.
struct ChunkGeometry {
  int64_t numel = 0;       // elements of the input
  int64_t chunk = 1;       // D
  int64_t num_chunks = 0;  // ceil(numel / D)
  int64_t last_len = 0;    // length of the last chunk (== D unless it is short)
  int64_t keep = 0;        // K = keep(D): stride of a chunk in `values` (and `offsets`)
  int64_t keep_last = 0;   // keep(last_len)
  int64_t words = 0;       // ceil(D / 32): bitmap words per chunk

  ChunkGeometry() = default;
  ChunkGeometry(int64_t n, int64_t D, double gamma)
      : numel(n), chunk(D), num_chunks((n + D - 1) / D),
        last_len(n == 0 ? 0 : n - (num_chunks - 1) * D),
        keep(keep_count(D, gamma)), keep_last(keep_count(last_len, gamma)),
        words((D + 31) / 32) {}

  // Total kept values (== values.numel()).
  int64_t total_kept() const { return num_chunks == 0 ? 0 : (num_chunks - 1) * keep + keep_last; }
  int64_t bitmap_words() const { return num_chunks * words; }
  int64_t chunk_len(int64_t c) const { return c + 1 == num_chunks ? last_len : chunk; }
  int64_t chunk_keep(int64_t c) const { return c + 1 == num_chunks ? keep_last : keep; }
};

// The geometry in the narrow fields kernels take: D <= 65536 fits int32, the chunk count may not.
struct KernelGeometry {
  int64_t num_chunks;
  int32_t chunk;      // D
  int32_t keep;       // K = keep(D), the chunk stride in values/offsets
  int32_t last_len;   // length of the last chunk
  int32_t keep_last;  // keep(last_len)
  int32_t words;      // ceil(D/32)

  DROPIT_HD int32_t chunk_len(int64_t c) const { return c + 1 == num_chunks ? last_len : chunk; }
  DROPIT_HD int32_t chunk_keep(int64_t c) const { return c + 1 == num_chunks ? keep_last : keep; }
};

inline KernelGeometry kernel_geometry(const ChunkGeometry& g) {
  return {g.num_chunks, static_cast<int32_t>(g.chunk), static_cast<int32_t>(g.keep),
          static_cast<int32_t>(g.last_len), static_cast<int32_t>(g.keep_last),
          static_cast<int32_t>(g.words)};
}

// Unsigned integer of the same width as a floating dtype; keys and values are
// handled as these bit patterns so one kernel serves every floating dtype.
template <int Bytes> struct BitsOf;
template <> struct BitsOf<2> { using type = uint16_t; };
template <> struct BitsOf<4> { using type = uint32_t; };
template <> struct BitsOf<8> { using type = uint64_t; };

// Magnitude key: the bit pattern with the sign bit cleared. As an unsigned
// integer it orders by |x|, equates +0/-0 and puts NaN above +inf.
template <typename Bits>
DROPIT_HD Bits magnitude_key(Bits bits) {
  return bits & static_cast<Bits>(~(static_cast<Bits>(1) << (sizeof(Bits) * 8 - 1)));
}

// Random key of the "random" strategy: a 32-bit hash of (seed, global index).
// splitmix64's finaliser: every bit of the input affects every output bit.
DROPIT_HD uint32_t random_key(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 32);
}

}  // namespace dropit
