// Warp-ballot bitmap helpers shared by the kernels (pack/unpack, masks).
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
DROPIT_DEVICE uint32_t warp_inclusive_scan(uint32_t v) {
  const int lane = lane_id();
  for (int d = 1; d < kWarp; d <<= 1) {
    uint32_t u = simt::shfl_up(v, d);
    if (lane >= d) v += u;
  }
  return v;
}

// Block-wide exclusive scan of one count per warp (e.g. the popcount of its
// ballot words). Every thread of the block calls it; `warp_count` must be the
// same in all lanes of a warp. Returns the sum of the counts of the warps
// before this one; `*total` receives the sum over the block.
//
// `slots` is shared memory of at least 32 uint32. It contains one barrier;
// the slots are read after it, so a second call must use other slots (keep
// two buffers and alternate) unless a barrier separates the calls.
// Block sizes up to 1024 threads (32 warps).
DROPIT_DEVICE uint32_t block_exclusive_scan_warp_counts(uint32_t warp_count, simt::sptr<uint32_t> slots,
                                                        uint32_t* total) {
  const int lane = lane_id();
  const int warp = warp_id();
  const int nwarps = num_warps();
  if (lane == 0) slots[warp] = warp_count;
  simt::sync();
  uint32_t c = lane < nwarps ? slots[lane] : 0u;
  uint32_t inc = warp_inclusive_scan(c);
  uint32_t before = simt::shfl(inc, warp == 0 ? 0 : warp - 1);
  *total = simt::shfl(inc, nwarps - 1);
  return warp == 0 ? 0u : before;
}

// Number of 32-bit words of a bitmap over n elements.
DROPIT_DEVICE int64_t words_for(int64_t n) { return (n + kWarp - 1) / kWarp; }

// The word of the first n elements all set (n clamped to [0, 32]).
DROPIT_DEVICE uint32_t low_bits(int64_t n) {
  return n >= kWarp ? 0xffffffffu : (n <= 0 ? 0u : ((1u << n) - 1u));
}

}  // namespace bitmap
}  // namespace dropit
