// Host SIMT layer: runs kernel bodies written against csrc/cuda/simt.cuh on the CPU.
//
// A block's threads are cooperative fibers (a small assembly context switch on x86-64,
// ucontext elsewhere) on the calling OS thread.
// A fiber runs until it reaches a barrier or a warp intrinsic, then yields:
//  - sync() returns only when every thread of the block has reached it;
//  - a warp intrinsic returns only when all 32 lanes of the warp have called
//    the same intrinsic; the results are computed from all 32 lanes' values;
//  - static shared memory (DROPIT_SHARED) and dynamic shared memory are per
//    block and filled with a poison byte at the start of every block;
//  - blocks run one after another.
// Misuse (a warp whose lanes call different intrinsics, a barrier that not all
// threads reach, a thread that exits while others wait) raises an error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace dropit {
namespace simt {
namespace host {

struct LaunchOptions {
  size_t stack_bytes = 64 * 1024;  // per fiber
  // Order in which the scheduler resumes runnable fibers in each sweep: by thread index up,
  // down, or a fresh pseudo-random permutation per sweep (from shuffle_seed).
  enum class Order { kForward, kReverse, kShuffled };
  Order order = Order::kForward;
  uint64_t shuffle_seed = 0;
  unsigned char poison = 0xA5;     // fill byte of shared memory at block start
};

struct LaunchStats {
  uint64_t blocks = 0;
  uint64_t switches = 0;   // fiber resumptions
  uint64_t barriers = 0;   // block barriers completed
  uint64_t warp_ops = 0;   // warp-wide exchanges completed
};

// Runs `body` as `grid` blocks of `block_threads` threads (a multiple of 32,
// at most 1024) with `dynamic_smem` bytes of dynamic shared memory.
// Throws std::runtime_error on misuse or deadlock. Not reentrant.
void launch(int64_t grid, int block_threads, size_t dynamic_smem, const std::function<void()>& body,
            const LaunchOptions& options = LaunchOptions());

// Counters of the most recent launch on this OS thread.
LaunchStats last_stats();

}  // namespace host
}  // namespace simt
}  // namespace dropit
