// Host runs of the kernel bodies in csrc/cuda/*.cuh under the host SIMT layer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "dropit.h"
#include "simt_host.h"

namespace dropit {
namespace simt_test {

struct PackJob {
  int elem_bytes = 4;
  const void* x = nullptr;
  void* values = nullptr;
  int32_t* bitmap = nullptr;    // one of bitmap / offsets
  uint16_t* offsets = nullptr;
  ChunkGeometry geometry;
  bool random = false;
  uint64_t seed = 0;
  int threads = 0;              // 0: the launcher's choice
  int source = -1;              // -1: the launcher's choice, 0: shared memory, 1: global memory
  size_t smem_limit = 227 * 1024;  // the device's opt-in shared memory per block
  int64_t grid = 0;             // 0: the launcher's choice
  int drop_barrier = 0;         // > 0: leave out the barrier with this id (PackBarrier)
  simt::host::LaunchOptions options;
};

struct UnpackJob {
  int elem_bytes = 4;
  const void* values = nullptr;
  const int32_t* bitmap = nullptr;
  const uint16_t* offsets = nullptr;
  void* out = nullptr;
  ChunkGeometry geometry;
  int threads = 0;
  int64_t grid = 0;
  int drop_barrier = 0;         // > 0: leave out the barrier with this id (UnpackBarrier)
  simt::host::LaunchOptions options;
};

// The launch plan of pack for a job: threads, key source (0 shared, 1 global, 2 random).
struct PackPlanInfo {
  int threads;
  int source;
  size_t dynamic_smem;
  bool per_warp;  // pack_warps (a chunk per warp) rather than pack_block
};
PackPlanInfo pack_plan_of(const PackJob& job);

// The kernel bodies, with every barrier unless the job drops one.
void pack_kernels(const PackJob& job);
void unpack_kernels(const UnpackJob& job);

// The barrier ids the bodies called during the last run on this thread, sorted.
std::vector<int> last_barrier_ids();

}  // namespace simt_test
}  // namespace dropit
