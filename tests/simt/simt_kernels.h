// Host runs of the kernel bodies in csrc/cuda/*.cuh under the host SIMT layer.
#pragma once

#include <cstddef>
#include <cstdint>

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
  int64_t grid = 0;             // 0: one block per chunk
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
  simt::host::LaunchOptions options;
};

// The launch plan of pack for a job: threads, key source (0 shared, 1 global, 2 random).
struct PackPlanInfo {
  int threads;
  int source;
  size_t dynamic_smem;
};
PackPlanInfo pack_plan_of(const PackJob& job);

// The kernels as compiled for production.
void pack_kernels(const PackJob& job);
void unpack_kernels(const UnpackJob& job);
// Test-only variants of pack with one barrier left out: after the histogram
// (drop_hist) or in the digit scan (drop_scan).
void pack_drop_hist(const PackJob& job);
void pack_drop_scan(const PackJob& job);

}  // namespace simt_test
}  // namespace dropit
