// Host launchers of the kernel bodies (csrc/cuda/pack.cuh, unpack.cuh) under the host SIMT layer.
#define DROPIT_SIMT_HOST 1

#include "simt_kernels.h"

#include <set>
#include <stdexcept>

#include "cuda/pack.cuh"
#include "cuda/unpack.cuh"

namespace dropit {
namespace simt_test {
namespace {

thread_local std::set<int> g_barrier_ids;

// The barrier policy of the tests: syncs at every barrier but `skip` (block or warp barrier, or the
// wait for asynchronous copies), and records the ids called.
struct TestSync {
  int skip = 0;
  void operator()(int id) const {
    g_barrier_ids.insert(id);
    if (id != skip) simt::sync();
  }
  void warp(int id) const {
    g_barrier_ids.insert(id);
    if (id != skip) simt::syncwarp();
  }
  void copies(int id) const {  // the wait for this thread's asynchronous copies
    g_barrier_ids.insert(id);
    if (id != skip) simt::copy_async_wait_all();
  }
};

template <typename Bits, typename Key, KeySource Src>
void run_pack(const PackJob& j, const PackPlan& plan) {
  const PackParams<Bits> p = make_pack_params<Bits>(
      j.geometry, static_cast<const Bits*>(j.x), static_cast<Bits*>(j.values), j.bitmap, j.offsets, j.seed);
  const TestSync sync{j.drop_barrier};
  const int64_t grid = j.grid > 0 ? j.grid : plan.grid;
  if (plan.per_warp) {
    simt::host::launch(grid, plan.threads, plan.dynamic_smem, [&] { kernels::pack_warps<Bits, Key, Src>(p, sync); },
                       j.options);
  } else {
    simt::host::launch(grid, plan.threads, plan.dynamic_smem, [&] { kernels::pack_block<Bits, Key, Src>(p, sync); },
                       j.options);
  }
}

// The production plan, but for a forced key source: 0 (shared memory) keeps a per-warp plan;
// 1 (global memory) is pack_block's alone (the per-warp plan is ruled out by a zero limit).
PackPlan plan_of(const PackJob& j) {
  PackPlan plan = plan_pack(j.geometry, j.elem_bytes, j.random, j.smem_limit, j.threads, kPackStaticSmem,
                            !j.random && j.source == 1 ? 0 : SIZE_MAX);
  if (plan.per_warp) return plan;
  if (!j.random && j.source == 0) {
    plan.source = KeySource::kSharedBits;
    plan.dynamic_smem = staged_bytes(j.geometry.chunk, j.elem_bytes);
  } else if (!j.random && j.source == 1) {
    plan.source = KeySource::kGlobalBits;
    plan.dynamic_smem = 0;
  }
  return plan;
}

template <typename Bits>
void pack_typed(const PackJob& j) {
  const PackPlan plan = plan_of(j);
  if (plan.threads > kPackMaxThreads) throw std::invalid_argument("pack takes at most kPackMaxThreads (512) threads");
  switch (plan.source) {
    case KeySource::kSharedBits: run_pack<Bits, Bits, KeySource::kSharedBits>(j, plan); break;
    case KeySource::kGlobalBits: run_pack<Bits, Bits, KeySource::kGlobalBits>(j, plan); break;
    case KeySource::kRandom: run_pack<Bits, uint32_t, KeySource::kRandom>(j, plan); break;
  }
}

template <typename Bits>
void unpack_typed(const UnpackJob& j) {
  const UnpackParams<Bits> p = make_unpack_params<Bits>(
      j.geometry, static_cast<const Bits*>(j.values), j.bitmap, j.offsets, static_cast<Bits*>(j.out));
  const LaunchPlan plan = plan_unpack(j.geometry, j.bitmap != nullptr, j.threads);
  const int64_t grid = j.grid > 0 ? j.grid : plan.grid;
  const TestSync sync{j.drop_barrier};
  if (j.bitmap) {
    simt::host::launch(grid, plan.threads, plan.dynamic_smem, [&] { kernels::unpack_bitmap_block<Bits>(p, sync); },
                       j.options);
  } else {
    simt::host::launch(grid, plan.threads, 0, [&] { kernels::unpack_offsets_block<Bits>(p, sync); }, j.options);
  }
}

template <typename Fn>
void by_width(int elem_bytes, Fn&& fn) {
  switch (elem_bytes) {
    case 2: fn(uint16_t{}); break;
    case 4: fn(uint32_t{}); break;
    case 8: fn(uint64_t{}); break;
    default: throw std::invalid_argument("elem_bytes must be 2, 4 or 8");
  }
}

}  // namespace

PackPlanInfo pack_plan_of(const PackJob& j) {
  const PackPlan plan = plan_of(j);
  return {plan.threads, static_cast<int>(plan.source), plan.dynamic_smem, plan.per_warp};
}

void pack_kernels(const PackJob& j) {
  g_barrier_ids.clear();
  if (j.geometry.numel == 0) return;
  by_width(j.elem_bytes, [&](auto tag) { pack_typed<decltype(tag)>(j); });
}

void unpack_kernels(const UnpackJob& j) {
  g_barrier_ids.clear();
  if (j.geometry.numel == 0) return;
  by_width(j.elem_bytes, [&](auto tag) { unpack_typed<decltype(tag)>(j); });
}

std::vector<int> last_barrier_ids() { return {g_barrier_ids.begin(), g_barrier_ids.end()}; }

}  // namespace simt_test
}  // namespace dropit
