// Host SIMT layer: the implementation behind csrc/cuda/simt.cuh's host branch.
#include "simt_host.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#define DROPIT_SIMT_HOST 1
#include "cuda/simt.cuh"

namespace dropit {
namespace simt {
namespace host {
namespace {

constexpr int kWarp = 32;

enum class State { kRunnable, kBarrier, kWarp, kDone };

#if defined(__x86_64__)
// A minimal context switch (the signal mask is left alone: ucontext's
// swapcontext makes two system calls per switch). Saves the callee-saved
// registers, MXCSR and the x87 control word on the old stack, stores its stack
// pointer in *save and continues on the stack `to`.
extern "C" void dropit_simt_switch(void** save, void* to);
asm(R"(
  .text
  .p2align 4
  .globl dropit_simt_switch
  .hidden dropit_simt_switch
  .type dropit_simt_switch,@function
dropit_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dropit_simt_switch,.-dropit_simt_switch
)");
#endif

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  State state = State::kRunnable;
  int tid = 0;
  size_t next_slot = 0;  // static shared arrays declared so far in this block
  WarpOp op = WarpOp::kBallot;
  uint64_t in = 0, out = 0;
  int arg = 0;
};

struct AlignedBuffer {
  std::unique_ptr<unsigned char[]> raw;
  unsigned char* data = nullptr;
  size_t bytes = 0;
  void reset(size_t n, unsigned char fill) {
    if (n > bytes || !raw) {
      raw.reset(new unsigned char[n + 64]);
      data = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t(63));
      bytes = n;
    }
    std::memset(data, fill, n);
  }
};

struct Machine {
  // launch
  int64_t grid = 0;
  int64_t block = 0;
  int nthreads = 0;
  const std::function<void()>* body = nullptr;
  LaunchOptions opt;
  LaunchStats stats;
  // block state
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  size_t stack_bytes = 0;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  Fiber* cur = nullptr;
  int at_barrier = 0;
  int done = 0;
  std::vector<int> warp_arrived;
  std::vector<AlignedBuffer> slots;
  std::vector<size_t> slot_bytes;
  size_t slots_used = 0;
  AlignedBuffer dyn;
  size_t dyn_bytes = 0;
  std::string error;
};

thread_local Machine* g_machine = nullptr;
thread_local LaunchStats g_last;

Machine& machine() {
  if (g_machine == nullptr || g_machine->cur == nullptr) {
    // Called outside a launch: no way to continue meaningfully.
    std::fprintf(stderr, "simt host layer: kernel primitive called outside simt::host::launch\n");
    std::abort();
  }
  return *g_machine;
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield(Machine& m) {
  Fiber* f = m.cur;
#if defined(__x86_64__)
  dropit_simt_switch(&f->sp, m.sched_sp);
#else
  swapcontext(&f->ctx, &m.sched);
#endif
}

// From the scheduler into fiber f, until it yields.
void resume(Machine& m, Fiber& f) {
#if defined(__x86_64__)
  dropit_simt_switch(&m.sched_sp, f.sp);
#else
  swapcontext(&m.sched, &f.ctx);
#endif
}

// Records a misuse and parks the fiber for good: the scheduler stops the launch.
[[noreturn]] void fail(Machine& m, const std::string& what) {
  if (m.error.empty()) {
    std::ostringstream os;
    os << "simt host layer: " << what << " (block " << m.block << ", thread " << m.cur->tid << ")";
    m.error = os.str();
  }
  for (;;) {
    m.cur->state = State::kWarp;  // never runnable again
    yield(m);
  }
}

void fiber_entry() {
  Machine& m = *g_machine;
  try {
    (*m.body)();
  } catch (const std::exception& e) {
    fail(m, std::string("kernel body threw: ") + e.what());
  } catch (...) {
    fail(m, "kernel body threw");
  }
  m.cur->state = State::kDone;
  ++m.done;
  if (m.at_barrier > 0) fail(m, "thread exited while others wait at a barrier");
#if defined(__x86_64__)
  yield(m);  // never resumed: done fibers are not runnable
  std::abort();
#endif
  // (ucontext) returning resumes uc_link: the scheduler
}

void init_fiber(Machine& m, Fiber& f, char* stack, size_t bytes) {
#if defined(__x86_64__)
  // The initial frame, as dropit_simt_switch leaves it: control words, six
  // registers, then the "return address" fiber_entry. At fiber_entry's first
  // instruction rsp must be 8 mod 16, as after a call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  top -= 8;  // fiber_entry's own (never used) return address slot
  uint64_t* p = reinterpret_cast<uint64_t*>(top);
  *--p = reinterpret_cast<uint64_t>(&fiber_entry);
  for (int r = 0; r < 6; ++r) *--p = 0;
  *--p = 0x037F00001F80ull;  // x87 control word (high half) and MXCSR (low half): the defaults
  f.sp = p;
  (void)m;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = bytes;
  f.ctx.uc_link = &m.sched;
  makecontext(&f.ctx, fiber_entry, 0);
#endif
}

void complete_warp(Machine& m, int w) {
  Fiber* lanes = &m.fibers[static_cast<size_t>(w) * kWarp];
  const WarpOp op = lanes[0].op;
  for (int l = 1; l < kWarp; ++l) {
    if (lanes[l].op != op) fail(m, "lanes of one warp called different warp intrinsics");
  }
  switch (op) {
    case WarpOp::kBallot: {
      uint64_t word = 0;
      for (int l = 0; l < kWarp; ++l) word |= (lanes[l].in != 0 ? 1ull : 0ull) << l;
      for (int l = 0; l < kWarp; ++l) lanes[l].out = word;
      break;
    }
    case WarpOp::kShfl:
      for (int l = 0; l < kWarp; ++l) lanes[l].out = lanes[lanes[l].arg & (kWarp - 1)].in;
      break;
    case WarpOp::kShflUp:
      for (int l = 0; l < kWarp; ++l) {
        const int src = l - lanes[l].arg;
        lanes[l].out = src >= 0 ? lanes[src].in : lanes[l].in;
      }
      break;
    case WarpOp::kShflDown:
      for (int l = 0; l < kWarp; ++l) {
        const int src = l + lanes[l].arg;
        lanes[l].out = src < kWarp ? lanes[src].in : lanes[l].in;
      }
      break;
    case WarpOp::kShflXor:
      for (int l = 0; l < kWarp; ++l) lanes[l].out = lanes[(l ^ lanes[l].arg) & (kWarp - 1)].in;
      break;
    default:
      fail(m, "unknown warp intrinsic");
  }
  for (int l = 0; l < kWarp; ++l) lanes[l].state = State::kRunnable;
  m.warp_arrived[w] = 0;
  ++m.stats.warp_ops;
}

std::string describe_states(const Machine& m) {
  int runnable = 0, barrier = 0, warp = 0, done = 0;
  for (const Fiber& f : m.fibers) {
    switch (f.state) {
      case State::kRunnable: ++runnable; break;
      case State::kBarrier: ++barrier; break;
      case State::kWarp: ++warp; break;
      case State::kDone: ++done; break;
    }
  }
  std::ostringstream os;
  os << barrier << " threads at a barrier, " << warp << " in a warp intrinsic, " << done
     << " exited";
  return os.str();
}

void run_block(Machine& m) {
  const int n = m.nthreads;
  if (m.fibers.size() != static_cast<size_t>(n)) m.fibers = std::vector<Fiber>(n);
  if (m.stacks.size() < static_cast<size_t>(n) || m.stack_bytes != m.opt.stack_bytes) {
    m.stacks.clear();
    for (int t = 0; t < n; ++t) m.stacks.emplace_back(new char[m.opt.stack_bytes]);
    m.stack_bytes = m.opt.stack_bytes;
  }
  m.warp_arrived.assign(n / kWarp, 0);
  m.at_barrier = 0;
  m.done = 0;
  m.slots_used = 0;
  for (size_t i = 0; i < m.slots.size(); ++i) std::memset(m.slots[i].data, m.opt.poison, m.slot_bytes[i]);
  m.dyn.reset(m.dyn_bytes > 0 ? m.dyn_bytes : 1, m.opt.poison);
  for (int t = 0; t < n; ++t) {
    Fiber& f = m.fibers[t];
    f.state = State::kRunnable;
    f.tid = t;
    f.next_slot = 0;
    f.op = WarpOp::kBallot;
    init_fiber(m, f, m.stacks[t].get(), m.opt.stack_bytes);
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (m.opt.order == LaunchOptions::Order::kReverse) std::reverse(order.begin(), order.end());
  std::mt19937_64 rng(m.opt.shuffle_seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(m.block));
  while (m.done < n) {
    bool progressed = false;
    if (m.opt.order == LaunchOptions::Order::kShuffled) std::shuffle(order.begin(), order.end(), rng);
    for (int i = 0; i < n && m.error.empty(); ++i) {
      Fiber& f = m.fibers[order[i]];
      if (f.state != State::kRunnable) continue;
      m.cur = &f;
      ++m.stats.switches;
      resume(m, f);
      m.cur = nullptr;
      progressed = true;
    }
    if (!m.error.empty()) throw std::runtime_error(m.error);
    if (!progressed && m.done < n) {
      std::ostringstream os;
      os << "simt host layer: deadlock in block " << m.block << ": " << describe_states(m);
      throw std::runtime_error(os.str());
    }
  }
}

}  // namespace

int thread_idx() { return machine().cur->tid; }
int block_dim() { return machine().nthreads; }
int64_t block_idx() { return machine().block; }
int64_t grid_dim() { return machine().grid; }

void sync() {
  Machine& m = machine();
  m.cur->state = State::kBarrier;
  if (++m.at_barrier == m.nthreads) {
    for (Fiber& f : m.fibers) f.state = State::kRunnable;
    m.at_barrier = 0;
    ++m.stats.barriers;
  } else if (m.done > 0) {
    fail(m, "barrier reached after some threads exited");
  }
  yield(m);  // even the last to arrive lets the others run first
}

uint64_t warp_op(WarpOp op, uint64_t value, int arg) {
  Machine& m = machine();
  Fiber* f = m.cur;
  f->state = State::kWarp;
  f->op = op;
  f->in = value;
  f->arg = arg;
  const int w = f->tid / kWarp;
  if (++m.warp_arrived[w] == kWarp) complete_warp(m, w);
  yield(m);
  return f->out;
}

void* static_shared(size_t bytes, size_t align) {
  Machine& m = machine();
  if (align > 64) fail(m, "static shared alignment above 64 bytes");
  const size_t slot = m.cur->next_slot++;
  if (slot == m.slots_used) {  // first thread to declare it in this block
    if (slot == m.slots.size()) {
      m.slots.emplace_back();
      m.slot_bytes.push_back(0);
    }
    if (m.slot_bytes[slot] < bytes || m.slots[slot].data == nullptr) {
      m.slots[slot].reset(bytes, m.opt.poison);
      m.slot_bytes[slot] = bytes;
    }
    ++m.slots_used;
  } else if (slot > m.slots_used) {
    fail(m, "static shared arrays declared in a different order by different threads");
  }
  return m.slots[slot].data;
}

void* dynamic_shared() {
  Machine& m = machine();
  return m.dyn_bytes > 0 ? m.dyn.data : nullptr;
}

void launch(int64_t grid, int block_threads, size_t dynamic_smem, const std::function<void()>& body,
            const LaunchOptions& options) {
  if (g_machine != nullptr) throw std::runtime_error("simt host layer: nested launch");
  if (block_threads <= 0 || block_threads > 1024 || block_threads % kWarp != 0)
    throw std::invalid_argument("simt host layer: block_threads must be a multiple of 32 in [32, 1024]");
  if (grid < 0) throw std::invalid_argument("simt host layer: grid must be >= 0");
  static thread_local std::unique_ptr<Machine> keep;  // reuse stacks between launches
  if (!keep) keep.reset(new Machine());
  Machine& m = *keep;
  m.grid = grid;
  m.nthreads = block_threads;
  m.body = &body;
  m.opt = options;
  m.stats = LaunchStats();
  m.dyn_bytes = dynamic_smem;
  m.error.clear();
  g_machine = &m;
  try {
    for (int64_t b = 0; b < grid; ++b) {
      m.block = b;
      run_block(m);
      ++m.stats.blocks;
    }
  } catch (...) {
    g_machine = nullptr;
    g_last = m.stats;
    keep.reset();  // fibers may be parked mid-body: drop them with their stacks
    throw;
  }
  g_machine = nullptr;
  g_last = m.stats;
}

LaunchStats last_stats() { return g_last; }

}  // namespace host
}  // namespace simt
}  // namespace dropit
