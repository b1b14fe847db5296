// How the CPU kernels split work over torch's intra-op threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace dropit {

// Items per at::parallel_for task, for items of `elements_per_item` elements each: a task covers
// at least torch's grain (32K elements), so a small tensor stays on the calling thread rather
// than paying for waking the others, and a large one is split over every thread.
inline int64_t grain_items(int64_t elements_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elements_per_item));
}

}  // namespace dropit
