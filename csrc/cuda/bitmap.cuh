// Warp and block helpers shared by the kernels (pack/unpack, masks).
//
// A bitmap word is the ballot of one warp: bit j is lane j's predicate. With
// element e = 32*w + j handled by lane j of the warp that handles word w, the
// ballot is the word of the packed bitmap format directly.
//
// Built only on the portability layer (simt.cuh), so it runs under the host
// SIMT layer too.
#pragma once

#include <cstdint>

#include "simt.cuh"

namespace dropit {
namespace bitmap {

constexpr int kWarp = 32;

DROPIT_DEVICE int lane_id() { return simt::thread_idx() & (kWarp - 1); }
DROPIT_DEVICE int warp_id() { return simt::thread_idx() / kWarp; }
DROPIT_DEVICE int num_warps() { return simt::block_dim() / kWarp; }

// Bits of the lanes below this one.
DROPIT_DEVICE uint32_t lanemask_lt() { return (1u << lane_id()) - 1u; }

// The 32-bit word of the warp's predicates (bit j = lane j). All lanes call it.
DROPIT_DEVICE uint32_t ballot_word(bool pred) { return simt::ballot(pred); }

// Number of set bits of `word` below this lane: the lane's rank among the set lanes.
DROPIT_DEVICE int rank_in_word(uint32_t word) { return simt::popc(word & lanemask_lt()); }

// Inclusive prefix sum over the lanes of a warp. All lanes call it.
template <typename T>
DROPIT_DEVICE T warp_inclusive_scan(T v) {
  const int lane = lane_id();
  for (int d = 1; d < kWarp; d <<= 1) {
    const T u = simt::shfl_up(v, d);
    if (lane >= d) v += u;
  }
  return v;
}

namespace detail {
template <bool kIdleWarps, typename T, typename Barrier>
DROPIT_DEVICE T block_exclusive_scan(T v, simt::sptr<T> slots, T* total, Barrier barrier, int busy_warps) {
  const int lane = lane_id();
  const int warp = warp_id();
  const bool busy = !kIdleWarps || warp < busy_warps;  // the same in the whole warp
  T inc = v;
  if (busy) {
    inc = warp_inclusive_scan(v);
    if (lane == kWarp - 1) slots[warp] = inc;
  }
  barrier();
  if (!busy) return T(0);
  const T w = lane < busy_warps ? static_cast<T>(slots[lane]) : T(0);
  const T warps_inc = warp_inclusive_scan(w);
  const T warps_before = simt::shfl(warps_inc, warp == 0 ? 0 : warp - 1);
  if (total) *total = simt::shfl(warps_inc, busy_warps - 1);
  return (warp == 0 ? T(0) : warps_before) + inc - v;
}
}  // namespace detail

// Block-wide exclusive scan of one value per thread, in thread order. Every
// thread of the block calls it. Returns the sum of the values of the threads
// before this one; `*total` receives the sum over the block (unless `total` is
// null: then its shuffle is not run). Given `busy_warps`, the warps from it on
// must hold zeros: they only reach the barrier (their result is 0, not their
// prefix).
//
// `slots`: 32 T of shared memory. `barrier()` is called once, between the
// warps' totals landing in `slots` and their reads; the slots are read after
// it, so the next call needs another barrier in between. Up to 1024 threads.
template <typename T, typename Barrier>
DROPIT_DEVICE T block_exclusive_scan(T v, simt::sptr<T> slots, T* total, Barrier barrier) {
  return detail::block_exclusive_scan<false>(v, slots, total, barrier, num_warps());
}
template <typename T, typename Barrier>
DROPIT_DEVICE T block_exclusive_scan(T v, simt::sptr<T> slots, T* total, Barrier barrier, int busy_warps) {
  return detail::block_exclusive_scan<true>(v, slots, total, barrier, busy_warps);
}

// Number of 32-bit words of a bitmap over n elements.
DROPIT_DEVICE int64_t words_for(int64_t n) { return (n + kWarp - 1) / kWarp; }

// The word of the first n elements all set (n clamped to [0, 32]).
DROPIT_DEVICE uint32_t low_bits(int64_t n) {
  return n >= kWarp ? 0xffffffffu : (n <= 0 ? 0u : ((1u << n) - 1u));
}

// The lowest `m` set bits of `word` (m >= 0).
DROPIT_DEVICE uint32_t lowest_set_bits(uint32_t word, int m) {
  uint32_t kept = 0;
  for (; m > 0 && word != 0; --m) {
    const uint32_t low = word & (0u - word);
    kept |= low;
    word ^= low;
  }
  return kept;
}

}  // namespace bitmap
}  // namespace dropit
