// Host SIMT layer: runs kernel bodies written against csrc/cuda/simt.cuh on the CPU.
//
// A block's threads are cooperative fibers (a small assembly context switch on x86-64,
// ucontext elsewhere) on the calling OS thread.
// A fiber runs until it reaches a barrier or a warp intrinsic, then yields:
//  - sync() returns only when every thread of the block has reached it;
//  - a warp intrinsic (and a warp barrier) returns only when all 32 lanes of
//    the warp have called the same intrinsic; the results are computed from all
//    32 lanes' values;
//  - static shared memory (DROPIT_SHARED) and dynamic shared memory are per
//    block and filled with a poison byte at the start of every block;
//  - an asynchronous copy (copy_async16) is checked when issued but moves its
//    bytes only at its thread's copy_async_wait_all(); any access to its
//    destination before then, or a thread exiting with copies pending, fails;
//  - every global access (through simt::gptr) must lie inside one of the
//    buffers the launch registers (stores: a writable one), every shared
//    access inside the block's shared arrays, and every access must be aligned
//    to its size; each is counted (bytes, lane accesses);
//  - with `profile`, accesses are also grouped into warp instructions (see
//    LaunchStats) to give a cost model of the kernel;
//  - blocks run one after another.
// Misuse (a warp whose lanes call different intrinsics, a barrier that not all
// threads reach, a thread that exits while others wait, an access out of
// bounds or misaligned) raises an error naming it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

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
  // Run only blocks first_block..grid-1 (block_idx and grid_dim are as in the
  // full launch): lets a test run the last chunks of a huge tensor.
  int64_t first_block = 0;
  unsigned char poison = 0xA5;     // fill byte of shared memory at block start
  // The global memory the kernel may touch; any other global access fails the launch.
  struct Buffer {
    const void* data = nullptr;
    size_t bytes = 0;
    bool writable = false;
    const char* name = "";
  };
  std::vector<Buffer> buffers;
  // Group the accesses of a warp's lanes into warp instructions (slower; for cost models).
  bool profile = false;
};

// Counters of one launch. Warp-level figures assume the lanes of a warp run in
// lockstep: the n-th execution of an access site by each lane of a warp is one
// warp instruction (the site is the call's return address in the kernel body,
// so each unrolled or inlined copy is a site of its own, as on the GPU).
struct LaunchStats {
  uint64_t blocks = 0;
  uint64_t switches = 0;      // fiber resumptions
  uint64_t barriers = 0;      // block barriers completed
  uint64_t barrier_warps = 0;  // barrier instructions issued (one per warp and barrier)
  uint64_t warp_ops = 0;      // warp-wide exchanges completed (= the five below)
  uint64_t ballots = 0;
  uint64_t shuffles = 0;
  uint64_t matches = 0;
  uint64_t warp_syncs = 0;    // warp barriers
  uint64_t reductions = 0;    // warp reductions (reduce_max)
  // Lane-level accesses and the bytes they move (always counted).
  uint64_t global_loads = 0, global_stores = 0;
  uint64_t global_load_bytes = 0, global_store_bytes = 0;
  uint64_t shared_loads = 0, shared_stores = 0, shared_atomics = 0;
  uint64_t shared_load_bytes = 0, shared_store_bytes = 0;
  // Warp instructions (profile only). Global: the 32-byte sectors each touches, and its
  // distinct bytes (lanes reading the same word count it once).
  // Shared: wavefronts, i.e. the passes a bank conflict makes it take (for a
  // load or store the most distinct 4-byte words any bank serves, at least one
  // per 128 bytes; for an atomic the most lanes on any bank: each lane's
  // read-modify-write is its own pass, same address or not).
  uint64_t global_load_instr = 0, global_store_instr = 0;
  uint64_t global_load_sectors = 0, global_store_sectors = 0;
  uint64_t global_load_distinct_bytes = 0, global_store_distinct_bytes = 0;
  uint64_t shared_load_instr = 0, shared_store_instr = 0, shared_atomic_instr = 0;
  uint64_t shared_load_wavefronts = 0, shared_store_wavefronts = 0, shared_atomic_wavefronts = 0;
  // The passes bank conflicts add: wavefronts beyond one per 128 bytes the instruction moves.
  uint64_t shared_conflict_passes = 0;
  // Asynchronous global-to-shared copies: lane-level (also counted above as a global load and a
  // shared store each) and warp instructions (profile only; their sectors and wavefronts are
  // counted above, their instructions only here).
  uint64_t async_copies = 0, async_copy_instr = 0;
  // Warp instructions per site (profile only): the call's return address in the kernel body and
  // what it does (a memory access's space and kind, or a warp intrinsic).
  enum class SiteKind : int {
    kGlobalLoad, kGlobalStore, kSharedLoad, kSharedStore, kSharedAtomic, kBallot, kShuffle, kMatch, kWarpSync,
    kAsyncCopy, kReduce
  };
  struct Site {
    const void* address;
    SiteKind kind;
    uint64_t warp_instructions;
  };
  std::vector<Site> sites;
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
