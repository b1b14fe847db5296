// Small kernels that exercise the host SIMT layer's primitives and the bitmap
// helpers directly, for tests/test_simt_layer.py.
#define DROPIT_SIMT_HOST 1
#include "simt_selftest.h"

#include "cuda/bitmap.cuh"
#include "cuda/simt.cuh"

namespace dropit {
namespace simt_test {

std::vector<uint64_t> exchange(const std::string& op, int threads, int arg, int64_t grid) {
  std::vector<uint64_t> out(static_cast<size_t>(threads * grid), 0);
  simt::host::launch(grid, threads, 0, [&] {
    const int t = simt::thread_idx();
    const uint64_t v = 1000u * static_cast<uint64_t>(simt::block_idx()) + 7u * t + 1u;
    uint64_t r = 0;
    if (op == "ballot") {
      r = simt::ballot(t % 3 == 0 || t % 32 == arg);
    } else if (op == "match_any") {
      r = simt::match_any(static_cast<uint32_t>((t % 32) % (arg > 0 ? arg : 1)));
    } else if (op == "shfl") {
      r = simt::shfl(v, (t * 5 + arg) % 32);
    } else if (op == "shfl_up") {
      r = simt::shfl_up(v, arg);
    } else if (op == "shfl_down") {
      r = simt::shfl_down(v, arg);
    } else if (op == "shfl_xor") {
      r = simt::shfl_xor(v, arg);
    } else if (op == "scan") {
      r = bitmap::warp_inclusive_scan(static_cast<uint32_t>(t % 32 + arg));
    } else if (op == "block_scan") {
      DROPIT_SHARED(uint32_t, slots, 32);
      uint32_t total = 0;
      const uint32_t before = bitmap::block_exclusive_scan_warp_counts(
          static_cast<uint32_t>(bitmap::warp_id() + arg), slots, &total);
      r = (static_cast<uint64_t>(total) << 32) | before;
    } else if (op == "shared") {
      // Each thread writes its slot, a barrier, then reads its neighbour's.
      DROPIT_SHARED(uint64_t, cells, 1024);
      cells[t] = v;
      simt::sync();
      r = cells[(t + arg) % simt::block_dim()];
    } else if (op == "dims") {
      r = (static_cast<uint64_t>(simt::grid_dim()) << 48) | (static_cast<uint64_t>(simt::block_idx()) << 32) |
          (static_cast<uint64_t>(simt::block_dim()) << 16) | static_cast<uint64_t>(t);
    }
    out[static_cast<size_t>(simt::block_idx() * threads + t)] = r;
  });
  return out;
}

void misuse(const std::string& what) {
  simt::host::launch(1, 64, 0, [&] {
    const int t = simt::thread_idx();
    if (what == "divergent_barrier") {
      if (t < 32) simt::sync();  // the second warp never arrives
    } else if (what == "divergent_warp_op") {
      if (t % 32 < 16) {
        simt::ballot(true);
      } else {
        simt::shfl(1u, 0);
      }
    } else if (what == "partial_warp") {
      if (t % 32 != 5) simt::ballot(true);  // lane 5 never joins
    }
  });
}

}  // namespace simt_test
}  // namespace dropit
