// Radix select of pack's kernel body: finding the keep-th largest key of a chunk digit by digit.
//
// A selection is a bucket of keys (those whose bits from `shift` up equal `prefix`'s) and how many
// of them are still to keep; every key above the bucket is kept. Each step counts a digit of the
// keys in the bucket, then one scan over the bins picks the bin the keep-th largest key falls in.
// Only the portability layer (simt.cuh) is used: the host SIMT layer runs this very source.
#pragma once

#include <cstdint>
#include <type_traits>

#include "bitmap.cuh"
#include "simt.cuh"

namespace dropit {

// The barriers of the pack body, each named after what it orders. The body calls its barrier
// policy with these (simt::BlockSync syncs at all of them; the tests leave one out at a time).
enum PackBarrier : int {
  kWideCleared = 1,       // the wide histogram's zeros, before the counts
  kWideCounted,           // every count and the staged chunk, before the bins are read
  kWideScanned,           // inside the bin scan: the warps' sums, before they are read
  kWideChosen,            // the chosen bin, before it is read; every bin read, before candidates land there
  kCandidatesGathered,    // the candidates and their number, before the narrow passes read them
  kNarrowCleared,         // a narrow histogram's zeros, before its counts (a warp barrier on candidates)
  kNarrowCounted,         // its counts, before they are read (warp barrier on candidates)
  kNarrowScanned,         // inside its bin scan (whole chunk only: a warp scans by shuffles)
  kNarrowChosen,          // its chosen bin, before it is read; its bins read, before the next pass clears them
  kSelectionShared,       // warp 0's selection among the candidates, before the block reads it
  kMasksWritten,          // the compaction's bitmap words, before the threads that own them read them
  kCompactionScanned,     // inside the compaction's scan
  kChunkDone,             // every read of the chunk's shared memory, before the next chunk writes it
  // pack_warps (a chunk per warp): warp barriers only
  kWarpCleared,           // the warp's bins' zeros, before its counts; its last chunk's reads, before the next's writes
  kWarpCounted,           // its counts and staged chunk, before the bins and the chunk are read
  // pack_block on sm_80+: not a barrier but the wait for a thread's asynchronous copies of the
  // staged chunk (Sync::copies), before kWideCleared lets any thread read them
  kChunkCopied,
};

// The narrow digits' width: a 256-bin histogram, which one warp scans with 8 bins a lane.
constexpr int kNarrowBits = 8;
constexpr int kNarrowBins = 1 << kNarrowBits;

// The threads that run a select step together: the whole block, or warp 0 alone (on the few
// candidates the wide digit leaves: no block barriers, scans by shuffles only).
struct BlockTeam {
  DROPIT_DEVICE int rank() const { return simt::thread_idx(); }
  DROPIT_DEVICE int size() const { return simt::block_dim(); }
  template <typename Sync>
  DROPIT_DEVICE void sync(const Sync& s, int id) const { s(id); }
  // Exclusive scan over the team in rank order; `id` names the barrier inside it.
  template <typename T, typename Sync>
  DROPIT_DEVICE T exclusive_scan(T v, simt::sptr<T> slots, T* total, const Sync& s, int id) const {
    return bitmap::block_exclusive_scan<T>(v, slots, total, [&] { s(id); });
  }
};

struct WarpTeam {
  DROPIT_DEVICE int rank() const { return bitmap::lane_id(); }
  DROPIT_DEVICE int size() const { return bitmap::kWarp; }
  template <typename Sync>
  DROPIT_DEVICE void sync(const Sync& s, int id) const { s.warp(id); }
  template <typename T, typename Sync>
  DROPIT_DEVICE T exclusive_scan(T v, simt::sptr<T>, T* total, const Sync&, int) const {
    const T inc = bitmap::warp_inclusive_scan(v);
    *total = simt::shfl(inc, bitmap::kWarp - 1);
    return inc - v;
  }
};

// A warp that packs a chunk alone (pack_warps): choose_bin hands its choice round by shuffles, and
// each lane clears the narrow bins it sums. (pack_block's warp 0 keeps the shared-memory
// hand-over of WarpTeam: there it is a few instructions per chunk of thousands of elements.)
struct SoloWarpTeam : WarpTeam {};

template <typename Key>
struct Selection {
  Key prefix;  // the bucket's lowest key: its bits below `shift` are 0
  int shift;   // low bit of the bucket's fixed bits
  int need;    // keys of the bucket still to keep, the first ones in index order (1..count)
  int count;   // keys in the bucket

  DROPIT_DEVICE Key highest() const { return prefix | static_cast<Key>((Key(1) << shift) - 1); }
  DROPIT_DEVICE bool whole() const { return need == count; }
};

// The sum of bins [bottom, top) of `hist`, a run of `per` bins from the top of kBins bins (the run
// of thread `tid`: each thread of the team sums one).
template <int kBins>
DROPIT_DEVICE uint32_t run_sum(simt::sptr<uint32_t> hist, int tid, int per) {
  const int top = kBins - tid * per;  // this thread's bins: [bottom, top)
  const int bottom = top - per > 0 ? top - per : 0;
  uint32_t sum = 0;  // (bin 0: what was counted there, if anything; choose_bin adds the uncounted keys)
  if (per % 4 == 0 && top - per >= 0) {
    // The run's 16-byte groups in an order rotated by lane, so that the 8 lanes of a quarter warp
    // (one 128-byte pass) read 8 different bank groups: runs of 32 bins a lane would otherwise all
    // start on one bank group (8 passes each instead of 1).
    // (`per` is a power of two, as bins and team sizes are, and `bottom` a multiple of it.)
    const int groups = per / 4;
    const int first = 4 * (groups >= 8 ? bitmap::lane_id() : bitmap::lane_id() * groups / 8);
    if (groups == 1) {
      const simt::Vec<uint32_t, 4> v = simt::load_vec<4>(hist + bottom);
      sum = v.v[0] + v.v[1] + v.v[2] + v.v[3];
    } else {
      for (int q = 0; q < per; q += 8) {
DROPIT_UNROLL
        for (int u = 0; u < 8; u += 4) {
          const simt::Vec<uint32_t, 4> v = simt::load_vec<4>(hist + (bottom | ((first + q + u) & (per - 1))));
          sum += v.v[0] + v.v[1] + v.v[2] + v.v[3];
        }
      }
    }
  } else {
    for (int b = bottom; b < top; ++b) sum += hist[b];
  }
  return sum;
}

// The bin choose_bin picks: its index, the keys in the bins above it, the keys in it.
struct BinChoice {
  uint32_t bin;
  uint32_t above;
  uint32_t count;
};

// The bin of the `need`-th largest key in the run of bins [bottom, top) of `hist`, walked from the
// top by one thread, `above` keys above the run (the run holds the bin: the walk ends inside it).
// Bin 0 is read as in_bin0 (choose_bin's count of it by difference).
DROPIT_DEVICE BinChoice walk_run(simt::sptr<uint32_t> hist, int top, int bottom, uint32_t in_bin0, uint32_t above,
                                 uint32_t need) {
  BinChoice choice{0, 0, 0};
  for (int b = top - 1; b >= bottom; --b) {
    const uint32_t c = b == 0 ? in_bin0 : static_cast<uint32_t>(hist[b]);
    if (above + c >= need) {
      choice = BinChoice{static_cast<uint32_t>(b), above, c};
      break;
    }
    above += c;
  }
  return choice;
}

// Chooses the bin of the `need`-th largest key from a histogram of `kBins` bins, in which bin 0 was
// left uncounted: it holds the `keys` counted keys less the other bins. (Not counting digit 0
// spares the atomics of the most crowded bin, zeros, and lets keys known only by their number
// count there.) Every thread of the team calls it; thread t sums a run of bins from the top, one
// scan orders the runs, and the thread whose run holds the bin finds it there, sharing the choice
// through sel[0..2] and the `chosen` barrier; in a SoloWarpTeam the whole warp walks that run and
// shares the choice by shuffles (no barrier: every bin a lane read has fed a shuffle before any
// lane goes on).
template <int kBins, typename Team, typename Sync>
DROPIT_DEVICE BinChoice choose_bin(Team team, simt::sptr<uint32_t> hist, uint32_t keys, uint32_t need,
                                   simt::sptr<uint32_t> slots, simt::sptr<uint32_t> sel, const Sync& sync,
                                   int scanned, int chosen) {
  const int tid = team.rank();
  const int per = (kBins + team.size() - 1) / team.size();
  const int top = kBins - tid * per;  // this thread's bins: [bottom, top)
  const int bottom = top - per > 0 ? top - per : 0;
  const uint32_t sum = run_sum<kBins>(hist, tid, per);
  uint32_t counted = 0;
  uint32_t above = team.exclusive_scan(sum, slots, &counted, sync, scanned);
  const uint32_t in_bin0 = keys - counted;
  const uint32_t run_keys = sum + (bottom == 0 && top > 0 ? in_bin0 : 0u);  // the keys in this thread's run
  const bool holds = above < need && above + run_keys >= need;
  if constexpr (std::is_same_v<Team, SoloWarpTeam>) {
    // The first lane whose run holds the bin (from the top); then the warp walks that run at once,
    // lane l on its l-th bin from the top (one scan, one ballot), not the lane bin by bin. Bin 0
    // is read as its stored count plus the uncounted keys, so counts stored there (a first digit's
    // overflow: see WindowDigit) cancel out.
    const int from = simt::ffs(simt::ballot(holds)) - 1;
    // (A count and the keys above it share a shuffle: a warp's chunk has at most 1024 keys.)
    if constexpr (kBins == bitmap::kWarp) {  // a bin a lane
      const uint32_t above_count = simt::shfl(above | (run_keys << 16), from);
      return BinChoice{static_cast<uint32_t>(kBins - 1 - from), above_count & 0xffffu, above_count >> 16};
    } else {
      const uint32_t run_above = simt::shfl(above, from);
      const int run_top = kBins - from * per;
      const int b = run_top - 1 - tid;  // this lane's bin of the run, if tid < per
      const uint32_t c = tid < per ? static_cast<uint32_t>(hist[b]) + (b == 0 ? in_bin0 : 0u) : 0u;
      const uint32_t inc = bitmap::warp_inclusive_scan(c);
      const int at = simt::ffs(simt::ballot(tid < per && run_above + inc >= need)) - 1;
      const uint32_t above_count = simt::shfl((inc - c) | (c << 16), at);
      return BinChoice{static_cast<uint32_t>(run_top - 1 - at), run_above + (above_count & 0xffffu),
                       above_count >> 16};
    }
  } else {
    if (holds) {
      const BinChoice c = walk_run(hist, top, bottom, in_bin0, above, need);
      sel[0] = c.bin;
      sel[1] = c.above;
      sel[2] = c.count;
    }
    team.sync(sync, chosen);
    return BinChoice{sel[0], sel[1], sel[2]};
  }
}

// choose_bin for a whole block, without a block scan (which costs every warp two warp scans):
// threads [0, P) each write the sum of a run of bins to parts[t] (P = the block size, at most
// kMaxParts: `parts` holds that many), and after the barrier warp 0 alone scans the runs' sums
// (lane l a group of consecutive runs); the lane whose group holds the bin walks its runs, then
// the bins of the run that holds it. Writes sel[0..3] = {bin, keys above it, keys in it, 0} (one
// vector, for one vector read).
template <int kBins, int kMaxParts, typename Sync>
DROPIT_DEVICE void choose_bin_by_runs(simt::sptr<uint32_t> hist, uint32_t keys, uint32_t need,
                                      simt::sptr<uint32_t> parts, simt::sptr<uint32_t> sel, const Sync& sync,
                                      int scanned, int chosen) {
  const int tid = simt::thread_idx();
  const int nparts = simt::block_dim() < kMaxParts ? simt::block_dim() : kMaxParts;
  const int per = (kBins + nparts - 1) / nparts;  // run i: bins [max(0, kBins - (i+1) per), kBins - i per)
  if (tid < nparts) parts[tid] = run_sum<kBins>(hist, tid, per);
  sync(scanned);
  if (bitmap::warp_id() == 0) {
    const int lane = bitmap::lane_id();
    const int group = (nparts + bitmap::kWarp - 1) / bitmap::kWarp;
    const int p0 = lane * group < nparts ? lane * group : nparts;  // this lane's runs: [p0, p1)
    const int p1 = p0 + group < nparts ? p0 + group : nparts;
    uint32_t sum = 0;
    for (int i = p0; i < p1; ++i) sum += parts[i];
    const uint32_t inc = bitmap::warp_inclusive_scan(sum);
    const uint32_t in_bin0 = keys - simt::shfl(inc, bitmap::kWarp - 1);
    const int run0 = (kBins - 1) / per;  // the run holding bin 0
    uint32_t above = inc - sum;
    if (above < need && above + sum + (p0 <= run0 && run0 < p1 ? in_bin0 : 0u) >= need) {
      int i = p0;
      for (;; ++i) {
        const uint32_t c = parts[i] + (i == run0 ? in_bin0 : 0u);
        if (above + c >= need) break;
        above += c;
      }
      const int top = kBins - i * per;
      const BinChoice c = walk_run(hist, top, top - per > 0 ? top - per : 0, in_bin0, above, need);
      simt::store_vec(sel, simt::Vec<uint32_t, 4>{{c.bin, c.above, c.count, 0u}});
    }
  }
  sync(chosen);
}

// Applies a choice of choose_bin to a selection narrowed by a digit at `shift`.
template <typename Key>
DROPIT_DEVICE void take_bin(Selection<Key>& s, const BinChoice& c, int shift) {
  s.need -= static_cast<int>(c.above);
  s.count = static_cast<int>(c.count);
  s.prefix = static_cast<Key>(s.prefix | (static_cast<Key>(c.bin) << shift));
  s.shift = shift;
}

// Narrows a selection to a single key (or until its bucket is kept whole), kNarrowBits a step.
// `visit(f)`, called by each thread of the team, calls f(key) for that thread's share of keys
// that hold the bucket's keys (other keys are skipped); keys whose digit is 0 are not counted but
// fall in bin 0 by number, so the keys may leave out those equal to the bucket's lowest key (their
// digits are 0 at every step). Every thread of the team calls it.
template <typename Team, typename Key, typename Visit, typename Sync>
DROPIT_DEVICE void narrow_selection(Team team, Selection<Key>& s, const Visit& visit, simt::sptr<uint32_t> hist,
                                    simt::sptr<uint32_t> slots, simt::sptr<uint32_t> sel, const Sync& sync) {
  const int tid = team.rank();
  const int nthreads = team.size();
  while (s.shift > 0 && !s.whole()) {
    const int high = s.shift;
    const int shift = high > kNarrowBits ? high - kNarrowBits : 0;
    const Key digit_mask = static_cast<Key>((Key(1) << (high - shift)) - 1);
    const Key fixed = static_cast<Key>(s.prefix >> high);
    // A lone warp counts a digit of up to 5 bits in 32 bins, one a lane: the one narrow digit of
    // 16-bit keys after its 10-bit first digit. (Wider keys rarely get that far: no such code.)
    constexpr bool kSolo = std::is_same_v<Team, SoloWarpTeam>;
    const bool lane_bins = kSolo && sizeof(Key) == 2 && high - shift <= 5;
    if constexpr (kSolo) {
      // A lane clears the run of bins it sums in choose_bin; the bins of the run the warp walks
      // there were read before its shuffles, which every lane passes before the next pass's
      // clearing (so no barrier orders the reads before it); kNarrowCleared orders the zeros
      // before every count.
      // Its two 16-byte groups in choose_bin's order: each store then uses every bank.
      static_assert(kNarrowBins == 8 * bitmap::kWarp, "a lane's run is two 16-byte groups");
      if (lane_bins) {
        hist[bitmap::kWarp - 1 - tid] = 0u;
      } else {
        const int first = 4 * ((tid >> 2) & 1);
        simt::store_vec(hist + (kNarrowBins - 8 - 8 * tid + first), simt::Vec<uint32_t, 4>{});
        simt::store_vec(hist + (kNarrowBins - 8 - 8 * tid + (first ^ 4)), simt::Vec<uint32_t, 4>{});
      }
    } else {
      for (int i = tid; i < kNarrowBins; i += nthreads) hist[i] = 0u;
    }
    team.sync(sync, kNarrowCleared);
    visit([&](Key key) {
      const uint32_t d = static_cast<uint32_t>((key >> shift) & digit_mask);
      if (static_cast<Key>(key >> high) == fixed && d != 0) simt::atomic_add_shared(hist + d, 1u);
    });
    team.sync(sync, kNarrowCounted);
    const uint32_t count = static_cast<uint32_t>(s.count), need = static_cast<uint32_t>(s.need);
    constexpr int kScanned = kNarrowScanned, kChosen = kNarrowChosen;
    take_bin(s,
             lane_bins ? choose_bin<bitmap::kWarp>(team, hist, count, need, slots, sel, sync, kScanned, kChosen)
                       : choose_bin<kNarrowBins>(team, hist, count, need, slots, sel, sync, kScanned, kChosen),
             shift);
  }
}

}  // namespace dropit
