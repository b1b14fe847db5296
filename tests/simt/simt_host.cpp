// Host SIMT layer: the implementation behind csrc/cuda/simt.cuh's host branch.
#include "simt_host.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <unordered_map>
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

// One access of a lane, recorded for the profile.
struct AccessRecord {
  uint32_t site;
  uint8_t space;
  uint8_t kind;  // an Access, or kAsyncCopyRecord
  uint16_t bytes;
  uintptr_t addr;
  uintptr_t to;  // an asynchronous copy's shared destination
};
constexpr uint8_t kAsyncCopyRecord = 3;

// An asynchronous copy issued and not yet waited for.
struct PendingCopy {
  void* dst;
  const void* src;
  size_t bytes;
};

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
  const void* op_site = nullptr;  // profile: where this lane called the warp intrinsic
  std::vector<AccessRecord> log;  // profile only
  std::vector<PendingCopy> pending;  // its asynchronous copies not yet waited for
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
  std::vector<size_t> slot_bytes;      // capacity
  std::vector<size_t> slot_declared;   // bytes declared in this block
  size_t slots_used = 0;
  std::unordered_map<const void*, uint32_t> sites;  // profile: site -> index in stats.sites
  AlignedBuffer dyn;
  size_t dyn_bytes = 0;
  size_t pending_copies = 0;  // the block's asynchronous copies not yet waited for
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
  if (!m.cur->pending.empty()) fail(m, "thread exited with asynchronous copies it never waited for");
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

// The index of a site in the launch's stats (added on first use).
uint32_t site_index(Machine& m, const void* address, LaunchStats::SiteKind kind) {
  auto [it, added] = m.sites.try_emplace(address, static_cast<uint32_t>(m.stats.sites.size()));
  if (added) m.stats.sites.push_back({address, kind, 0});
  return it->second;
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
    case WarpOp::kMatchAny:
      for (int l = 0; l < kWarp; ++l) {
        uint64_t peers = 0;
        for (int q = 0; q < kWarp; ++q) peers |= (lanes[q].in == lanes[l].in ? 1ull : 0ull) << q;
        lanes[l].out = peers;
      }
      break;
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
    case WarpOp::kSync:
      break;
    case WarpOp::kReduceMax: {
      uint32_t top = 0;
      for (int l = 0; l < kWarp; ++l) top = std::max(top, static_cast<uint32_t>(lanes[l].in));
      for (int l = 0; l < kWarp; ++l) lanes[l].out = top;
      break;
    }
    default:
      fail(m, "unknown warp intrinsic");
  }
  for (int l = 0; l < kWarp; ++l) lanes[l].state = State::kRunnable;
  m.warp_arrived[w] = 0;
  ++m.stats.warp_ops;
  if (m.opt.profile) {
    using K = LaunchStats::SiteKind;
    const K kind = op == WarpOp::kBallot ? K::kBallot
                   : op == WarpOp::kMatchAny ? K::kMatch
                   : op == WarpOp::kSync     ? K::kWarpSync
                   : op == WarpOp::kReduceMax ? K::kReduce
                                             : K::kShuffle;
    ++m.stats.sites[site_index(m, lanes[0].op_site, kind)].warp_instructions;
  }
  if (op == WarpOp::kBallot) {
    ++m.stats.ballots;
  } else if (op == WarpOp::kMatchAny) {
    ++m.stats.matches;
  } else if (op == WarpOp::kSync) {
    ++m.stats.warp_syncs;
  } else if (op == WarpOp::kReduceMax) {
    ++m.stats.reductions;
  } else {
    ++m.stats.shuffles;
  }
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

// Warp instructions of one site's n-th execution by the lanes of a warp: how many passes
// (sectors, wavefronts) it takes.
void account_instruction(LaunchStats& st, const AccessRecord* recs, size_t n) {
  const auto space = static_cast<Space>(recs[0].space);
  const auto kind = static_cast<Access>(recs[0].kind);
  ++st.sites[recs[0].site].warp_instructions;
  if (recs[0].kind == kAsyncCopyRecord) {
    // One instruction that reads global memory (its sectors) and writes shared memory (its
    // wavefronts): accounted as both, counted once as an asynchronous copy.
    std::vector<AccessRecord> from(recs, recs + n), to(recs, recs + n);
    for (size_t i = 0; i < n; ++i) {
      from[i].kind = static_cast<uint8_t>(Access::kLoad);
      to[i].space = static_cast<uint8_t>(Space::kShared);
      to[i].kind = static_cast<uint8_t>(Access::kStore);
      to[i].addr = recs[i].to;
    }
    const uint64_t loads = st.global_load_instr, stores = st.shared_store_instr;
    account_instruction(st, from.data(), n);
    account_instruction(st, to.data(), n);
    st.global_load_instr = loads;
    st.shared_store_instr = stores;
    st.sites[recs[0].site].warp_instructions -= 2;
    ++st.async_copy_instr;
    return;
  }
  if (space == Space::kGlobal) {
    std::vector<uintptr_t> sectors, bytes;
    for (size_t i = 0; i < n; ++i) {
      for (uintptr_t s = recs[i].addr >> 5; s <= (recs[i].addr + recs[i].bytes - 1) >> 5; ++s) sectors.push_back(s);
      for (uintptr_t b = recs[i].addr; b < recs[i].addr + recs[i].bytes; ++b) bytes.push_back(b);
    }
    std::sort(sectors.begin(), sectors.end());
    std::sort(bytes.begin(), bytes.end());
    const uint64_t distinct = std::unique(sectors.begin(), sectors.end()) - sectors.begin();
    const uint64_t distinct_bytes = std::unique(bytes.begin(), bytes.end()) - bytes.begin();
    if (kind == Access::kLoad) {
      ++st.global_load_instr;
      st.global_load_sectors += distinct;
      st.global_load_distinct_bytes += distinct_bytes;
    } else {
      ++st.global_store_instr;
      st.global_store_sectors += distinct;
      st.global_store_distinct_bytes += distinct_bytes;
    }
    return;
  }
  // Shared memory: 32 banks of 4-byte words.
  std::vector<uintptr_t> words;
  for (size_t i = 0; i < n; ++i)
    for (uintptr_t w = recs[i].addr >> 2; w <= (recs[i].addr + recs[i].bytes - 1) >> 2; ++w) words.push_back(w);
  uint64_t per_bank[32] = {};
  uint64_t passes = 0;
  if (kind == Access::kAtomic) {
    for (uintptr_t w : words) passes = std::max(passes, ++per_bank[w % 32]);
    ++st.shared_atomic_instr;
    st.shared_atomic_wavefronts += passes;
    st.shared_conflict_passes += passes - 1;
    return;
  }
  std::sort(words.begin(), words.end());
  const size_t distinct = std::unique(words.begin(), words.end()) - words.begin();
  for (size_t i = 0; i < distinct; ++i) passes = std::max(passes, ++per_bank[words[i] % 32]);
  const uint64_t ideal = std::max<uint64_t>(1, (distinct + 31) / 32);  // 128 bytes a pass
  passes = std::max(passes, ideal);
  st.shared_conflict_passes += passes - ideal;
  if (kind == Access::kLoad) {
    ++st.shared_load_instr;
    st.shared_load_wavefronts += passes;
  } else {
    ++st.shared_store_instr;
    st.shared_store_wavefronts += passes;
  }
}

// Groups the block's recorded accesses into warp instructions: per warp, the n-th execution of a
// site by each lane is one instruction (lockstep).
void account_block_profile(Machine& m) {
  struct Tagged {
    uint32_t site;
    uint32_t occurrence;
    AccessRecord rec;
  };
  std::vector<Tagged> all;
  std::vector<uint32_t> seen;
  for (int w = 0; w < m.nthreads / kWarp; ++w) {
    all.clear();
    for (int l = 0; l < kWarp; ++l) {
      Fiber& f = m.fibers[static_cast<size_t>(w) * kWarp + l];
      seen.assign(m.sites.size(), 0);
      for (const AccessRecord& r : f.log) all.push_back({r.site, seen[r.site]++, r});
      f.log.clear();
    }
    std::sort(all.begin(), all.end(), [](const Tagged& a, const Tagged& b) {
      return a.site != b.site ? a.site < b.site : a.occurrence < b.occurrence;
    });
    std::vector<AccessRecord> group;
    for (size_t i = 0; i < all.size();) {
      size_t j = i;
      group.clear();
      for (; j < all.size() && all[j].site == all[i].site && all[j].occurrence == all[i].occurrence; ++j)
        group.push_back(all[j].rec);
      account_instruction(m.stats, group.data(), group.size());
      i = j;
    }
  }
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
  for (size_t i = 0; i < m.slots.size(); ++i) {
    std::memset(m.slots[i].data, m.opt.poison, m.slot_bytes[i]);
    m.slot_declared[i] = 0;
  }
  m.dyn.reset(m.dyn_bytes > 0 ? m.dyn_bytes : 1, m.opt.poison);
  m.pending_copies = 0;
  for (int t = 0; t < n; ++t) {
    Fiber& f = m.fibers[t];
    f.state = State::kRunnable;
    f.tid = t;
    f.next_slot = 0;
    f.op = WarpOp::kBallot;
    f.log.clear();
    f.pending.clear();
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
  if (m.opt.profile) account_block_profile(m);
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
    m.stats.barrier_warps += static_cast<uint64_t>(m.nthreads / kWarp);
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
  if (m.opt.profile) f->op_site = __builtin_return_address(0);
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
      m.slot_declared.push_back(0);
    }
    if (m.slot_bytes[slot] < bytes || m.slots[slot].data == nullptr) {
      m.slots[slot].reset(bytes, m.opt.poison);
      m.slot_bytes[slot] = bytes;
    }
    m.slot_declared[slot] = bytes;
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

namespace {

const char* access_name(Space space, Access kind) {
  if (space == Space::kGlobal) return kind == Access::kLoad ? "global load" : "global store";
  return kind == Access::kLoad ? "shared load" : (kind == Access::kStore ? "shared store" : "shared atomic");
}

[[noreturn]] void fail_access(Machine& m, Space space, Access kind, uintptr_t a, size_t bytes, const char* why) {
  std::ostringstream os;
  os << access_name(space, kind) << " of " << bytes << " bytes at 0x" << std::hex << a << std::dec << " " << why;
  fail(m, os.str());
}

bool inside(uintptr_t a, size_t bytes, const void* data, size_t size) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(data);
  return data != nullptr && a >= b && a - b <= size && bytes <= size - (a - b);
}

}  // namespace

namespace {

// Fails the launch if [a, a + bytes) overlaps the destination of an asynchronous copy some thread
// has not waited for (on a GPU: a race with the copy).
void check_not_pending(Machine& m, Space space, Access kind, uintptr_t a, size_t bytes) {
  for (const Fiber& f : m.fibers) {
    for (const PendingCopy& c : f.pending) {
      const uintptr_t d = reinterpret_cast<uintptr_t>(c.dst);
      if (a < d + c.bytes && d < a + bytes) {
        std::ostringstream os;
        os << "touches shared memory that thread " << f.tid
           << "'s asynchronous copy has not landed in (before its wait and a barrier)";
        fail_access(m, space, kind, a, bytes, os.str().c_str());
      }
    }
  }
}

// Checks one access (see access()) and counts it at lane level.
void check_and_count(Machine& m, Space space, Access kind, uintptr_t a, size_t bytes, size_t align) {
  if (align > 1 && a % align != 0) fail_access(m, space, kind, a, bytes, "is misaligned");
  LaunchStats& st = m.stats;
  if (space == Space::kGlobal) {
    const LaunchOptions::Buffer* buf = nullptr;
    for (const auto& b : m.opt.buffers) {
      if (inside(a, bytes, b.data, b.bytes)) {
        buf = &b;
        break;
      }
    }
    if (buf == nullptr) fail_access(m, space, kind, a, bytes, "is outside every buffer of the launch");
    if (kind != Access::kLoad && !buf->writable) {
      fail_access(m, space, kind, a, bytes, (std::string("writes the read-only buffer ") + buf->name).c_str());
    }
    if (kind == Access::kLoad) {
      ++st.global_loads;
      st.global_load_bytes += bytes;
    } else {
      ++st.global_stores;
      st.global_store_bytes += bytes;
    }
  } else {
    bool ok = inside(a, bytes, m.dyn.data, m.dyn_bytes);
    for (size_t i = 0; !ok && i < m.slots_used; ++i) ok = inside(a, bytes, m.slots[i].data, m.slot_declared[i]);
    if (!ok) fail_access(m, space, kind, a, bytes, "is outside the block's shared memory");
    if (m.pending_copies > 0) check_not_pending(m, space, kind, a, bytes);
    if (kind == Access::kLoad) {
      ++st.shared_loads;
      st.shared_load_bytes += bytes;
    } else if (kind == Access::kStore) {
      ++st.shared_stores;
      st.shared_store_bytes += bytes;
    } else {
      ++st.shared_atomics;
    }
  }
}

}  // namespace

void access(Space space, Access kind, const void* p, size_t bytes, size_t align) {
  Machine& m = machine();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  check_and_count(m, space, kind, a, bytes, align);
  if (m.opt.profile) {
    using K = LaunchStats::SiteKind;
    const K site_kind = space == Space::kGlobal ? (kind == Access::kLoad ? K::kGlobalLoad : K::kGlobalStore)
                        : kind == Access::kLoad  ? K::kSharedLoad
                        : kind == Access::kStore ? K::kSharedStore
                                                 : K::kSharedAtomic;
    m.cur->log.push_back({site_index(m, __builtin_return_address(0), site_kind), static_cast<uint8_t>(space),
                          static_cast<uint8_t>(kind), static_cast<uint16_t>(bytes), a, 0});
  }
}

void copy_async(void* dst, const void* src, size_t bytes) {
  Machine& m = machine();
  const uintptr_t from = reinterpret_cast<uintptr_t>(src), to = reinterpret_cast<uintptr_t>(dst);
  check_and_count(m, Space::kGlobal, Access::kLoad, from, bytes, bytes);
  check_and_count(m, Space::kShared, Access::kStore, to, bytes, bytes);
  ++m.stats.async_copies;
  m.cur->pending.push_back({dst, src, bytes});
  ++m.pending_copies;
  if (m.opt.profile) {
    m.cur->log.push_back({site_index(m, __builtin_return_address(0), LaunchStats::SiteKind::kAsyncCopy),
                          static_cast<uint8_t>(Space::kGlobal), kAsyncCopyRecord, static_cast<uint16_t>(bytes), from,
                          to});
  }
}

void copy_async_wait_all() {
  Machine& m = machine();
  std::vector<PendingCopy>& pending = m.cur->pending;
  m.pending_copies -= pending.size();
  for (const PendingCopy& c : pending) std::memcpy(c.dst, c.src, c.bytes);
  pending.clear();
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
  m.sites.clear();
  g_machine = &m;
  try {
    for (int64_t b = options.first_block; b < grid; ++b) {
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
