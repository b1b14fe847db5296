// Launch shapes of the CUDA kernels. Plain host C++: the launchers (csrc/cuda/*.cu) and the host
// SIMT tests compute their grids with the same code.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dropit {

struct LaunchPlan {
  int threads = 0;
  int64_t grid = 0;
  size_t dynamic_smem = 0;  // bytes
};

// The largest grid a launch takes (gridDim.x); kernels stride over the work beyond it.
constexpr int64_t kMaxGrid = 2147483647;

// `items` units of work (chunks, mask-word groups), `per_block` of them per block of `threads`;
// at most `max_grid` blocks, which then stride over the rest.
inline LaunchPlan launch_plan(int64_t items, int64_t per_block, int threads, size_t dynamic_smem = 0,
                              int64_t max_grid = kMaxGrid) {
  LaunchPlan plan;
  plan.threads = threads;
  plan.dynamic_smem = dynamic_smem;
  const int64_t blocks = (items + per_block - 1) / per_block;
  plan.grid = blocks < max_grid ? blocks : max_grid;
  return plan;
}

}  // namespace dropit
