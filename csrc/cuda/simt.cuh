// The portability layer of the kernel bodies (csrc/cuda/*.cuh).
//
// Kernel bodies use nothing of CUDA but what is declared here: thread and block
// indices, block barriers, static and dynamic shared memory, shared-memory
// atomics, global and shared memory through gptr/sptr (and 16-byte vector
// accesses), asynchronous global-to-shared copies, and the warp intrinsics
// (ballot, shuffles, popc/ffs/clz). Compiled
// by nvcc they map onto CUDA (gptr<T> and sptr<T> are plain T*); compiled as
// plain C++ with DROPIT_SIMT_HOST defined they call a host SIMT implementation
// (tests/simt/) that runs a block's threads as cooperative fibers and checks
// and counts every memory access, so the very same kernel source runs on the CPU.
//
// Rules for kernel bodies:
//  - warp intrinsics (ballot, match_any, shuffles) are called by all 32 lanes of a warp (full mask), in
//    warp-uniform control flow; block sizes are multiples of 32;
//  - barriers are reached by every thread of the block (warp barriers by every
//    lane of the warp), and are called through the body's barrier policy
//    (BlockSync below) with the barrier's name;
//  - global memory is reached only through gptr<T>, shared memory only through
//    sptr<T>: static shared arrays are declared with DROPIT_SHARED(type, name, count)
//    at function scope (their contents are undefined at block start), dynamic
//    shared memory comes from dynamic_shared<T>();
//  - a subscript (p[i]) is read or written at once: never keep it in an `auto`
//    (on the host it is a reference object that accesses memory when used);
//  - loops of a fixed trip count that nvcc unrolls are marked DROPIT_UNROLL
//    (the host layer's warp-instruction counts pair each copy's lanes), and a
//    statement holds one memory access or warp intrinsic per source line (the
//    cost model matches the host's sites to SASS by source line);
//  - an asynchronous copy (copy_async16) has landed only after its thread's
//    copy_async_wait_all(), called through the barrier policy (BlockSync::copies);
//    no thread touches its destination before then, and other threads only after a
//    barrier that follows that wait;
//  - launch syntax and stream handling live in the .cu launchers only.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace dropit {
namespace simt {

// N elements of T moved by one aligned access (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  static_assert(sizeof(T) * N <= 16 && (N & (N - 1)) == 0, "vector accesses move up to 16 bytes");
  T v[N];
};

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

}  // namespace simt
}  // namespace dropit

#if defined(__CUDACC__)

#define DROPIT_DEVICE __device__ __forceinline__
// A lambda of a kernel body (nvcc inlines them already).
#define DROPIT_INLINE_LAMBDA
// 16-byte aligned, so that any array may take vector accesses.
#define DROPIT_SHARED(type, name, count) __shared__ __align__(16) type name[(count)]
#define DROPIT_UNROLL _Pragma("unroll")

namespace dropit {
namespace simt {

#define DROPIT_PTR __host__ __device__ __forceinline__

// A pointer into global memory: a T* whose vector accesses are global ones (16-byte loads and
// stores that nvcc may not merge on its own). Arithmetic and comparisons as for T*.
template <typename T>
class gptr {
 public:
  gptr() = default;
  DROPIT_PTR gptr(std::nullptr_t) {}
  DROPIT_PTR explicit gptr(T* p) : p_(p) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  DROPIT_PTR gptr(const gptr<U>& o) : p_(o.get()) {}

  DROPIT_PTR T* get() const { return p_; }
  DROPIT_PTR explicit operator bool() const { return p_ != nullptr; }
  DROPIT_PTR T& operator[](int64_t i) const { return p_[i]; }
  DROPIT_PTR T& operator*() const { return *p_; }
  DROPIT_PTR gptr operator+(int64_t i) const { return gptr(p_ + i); }
  DROPIT_PTR gptr operator-(int64_t i) const { return gptr(p_ - i); }
  DROPIT_PTR gptr& operator+=(int64_t i) {
    p_ += i;
    return *this;
  }
  DROPIT_PTR bool operator==(const gptr& o) const { return p_ == o.p_; }
  DROPIT_PTR bool operator!=(const gptr& o) const { return p_ != o.p_; }

 private:
  T* p_ = nullptr;
};

// A pointer into shared memory.
template <typename T>
using sptr = T*;

DROPIT_DEVICE int thread_idx() { return static_cast<int>(threadIdx.x); }
DROPIT_DEVICE int block_dim() { return static_cast<int>(blockDim.x); }
DROPIT_DEVICE int64_t block_idx() { return static_cast<int64_t>(blockIdx.x); }
DROPIT_DEVICE int64_t grid_dim() { return static_cast<int64_t>(gridDim.x); }

DROPIT_DEVICE void sync() { __syncthreads(); }
// Orders the shared-memory accesses of the lanes of a warp (all 32 call it).
DROPIT_DEVICE void syncwarp() { __syncwarp(); }

template <typename T>
DROPIT_DEVICE T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char dropit_dynamic_smem[];
  return reinterpret_cast<T*>(dropit_dynamic_smem);
}

template <typename T>
DROPIT_DEVICE T atomic_add_shared(T* p, T v) {
  return atomicAdd(p, v);
}

// The address of p, for alignment tests.
template <typename T>
DROPIT_DEVICE uintptr_t address(const T* p) {
  return reinterpret_cast<uintptr_t>(p);
}
template <typename T>
DROPIT_DEVICE uintptr_t address(const gptr<T>& p) {
  return reinterpret_cast<uintptr_t>(p.get());
}

// p, computed once: the compiler no longer sees how, so it keeps p in a register instead of
// rebuilding it from the kernel's parameters at every access (as it does for an address that is
// a parameter plus a 64-bit product plus an index, when it has registers to spare).
template <typename T>
DROPIT_DEVICE gptr<T> pinned(const gptr<T>& p) {
  T* q = p.get();
  asm("" : "+l"(q));
  return gptr<T>(q);
}

// The same memory seen as U (a shared array reused for another purpose).
template <typename U, typename T>
DROPIT_DEVICE U* ptr_cast(T* p) {
  return reinterpret_cast<U*>(p);
}

namespace detail {
// The CUDA vector type of a width: accesses through it compile to one wide load or store.
template <int Bytes> struct Wide;
template <> struct Wide<2> { using type = unsigned short; };
template <> struct Wide<4> { using type = unsigned int; };
template <> struct Wide<8> { using type = uint2; };
template <> struct Wide<16> { using type = uint4; };
}  // namespace detail

// N consecutive elements from p, which must be aligned to the access. In shared memory through
// the CUDA vector type; in global memory through __ldg and a PTX store, whose one wide
// instruction the compiler cannot split as it did a plain 16-byte store (global vector loads
// here are of inputs the kernel only reads).
template <int N, typename T>
DROPIT_DEVICE Vec<std::remove_const_t<T>, N> load_vec(T* p) {
  using V = Vec<std::remove_const_t<T>, N>;
  using W = typename detail::Wide<sizeof(V)>::type;
  const W w = *reinterpret_cast<const W*>(p);
  V v;
  memcpy(&v, &w, sizeof(V));
  return v;
}
template <int N, typename T>
DROPIT_DEVICE void store_vec(T* p, const Vec<T, N>& v) {
  using W = typename detail::Wide<sizeof(Vec<T, N>)>::type;
  W w;
  memcpy(&w, &v, sizeof(W));
  *reinterpret_cast<W*>(p) = w;
}
template <int N, typename T>
DROPIT_DEVICE Vec<std::remove_const_t<T>, N> load_vec(const gptr<T>& p) {
  using V = Vec<std::remove_const_t<T>, N>;
  using W = typename detail::Wide<sizeof(V)>::type;
  const W w = __ldg(reinterpret_cast<const W*>(p.get()));
  V v;
  memcpy(&v, &w, sizeof(V));
  return v;
}
template <int N, typename T>
DROPIT_DEVICE void store_vec(const gptr<T>& p, const Vec<T, N>& v) {
  static_assert(sizeof(Vec<T, N>) == 16, "global vector stores move 16 bytes");
  uint4 w;
  memcpy(&w, &v, sizeof(w));
  asm("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p.get()), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
      : "memory");
}

// Whether copy_async16 is a real asynchronous copy (cp.async, sm_80+) on the architecture being
// compiled; below sm_80 it is a plain load and store, and callers keep their fused paths.
DROPIT_DEVICE constexpr bool has_async_copy() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return true;
#else
  return false;
#endif
}

// 16 bytes from global `src` to shared `dst`, both 16-byte aligned, without passing through
// registers (cp.async.cg: L2 only, the data is read once): a thread may have any number in flight.
// They land by this thread's copy_async_wait_all(); see the rules above.
template <typename T>
DROPIT_DEVICE void copy_async16(T* dst, const gptr<const T>& src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(src.get()) : "memory");
#else
  store_vec(dst, load_vec<static_cast<int>(16 / sizeof(T))>(src));
#endif
}
// Waits for every asynchronous copy this thread issued (commit and wait for all groups).
DROPIT_DEVICE void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

DROPIT_DEVICE uint32_t ballot(bool pred) { return __ballot_sync(0xffffffffu, pred); }
// The lanes whose v equals this lane's (sm_70+).
DROPIT_DEVICE uint32_t match_any(uint32_t v) { return __match_any_sync(0xffffffffu, v); }
// The largest v of the warp's lanes: one instruction on sm_80+, five shuffles below.
DROPIT_DEVICE uint32_t reduce_max(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, v);
#else
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = v > other ? v : other;
  }
  return v;
#endif
}

template <typename T>
DROPIT_DEVICE T shfl(T v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
template <typename T>
DROPIT_DEVICE T shfl_up(T v, int delta) { return __shfl_up_sync(0xffffffffu, v, delta); }
template <typename T>
DROPIT_DEVICE T shfl_down(T v, int delta) { return __shfl_down_sync(0xffffffffu, v, delta); }
template <typename T>
DROPIT_DEVICE T shfl_xor(T v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

DROPIT_DEVICE int popc(uint32_t v) { return __popc(v); }
DROPIT_DEVICE int ffs(uint32_t v) { return __ffs(static_cast<int>(v)); }  // 1-based, 0 if v == 0
DROPIT_DEVICE int clz(uint32_t v) { return __clz(static_cast<int>(v)); }  // 32 if v == 0

// Per signed 16-bit half: min(a + b, c), the add wrapping (sm_90: one DPX instruction); max(a, b).
DROPIT_DEVICE uint32_t add_min_s16x2(uint32_t a, uint32_t b, uint32_t c) { return __viaddmin_s16x2(a, b, c); }
DROPIT_DEVICE uint32_t max_s16x2(uint32_t a, uint32_t b) { return __vmaxs2(a, b); }

}  // namespace simt
}  // namespace dropit

#elif defined(DROPIT_SIMT_HOST)

// Everything is inlined into the kernel body, as nvcc does: the host layer's
// hooks then see the kernel's own code as their caller (one site per memory
// instruction or warp intrinsic), with the same chain of inlined source lines.
#define DROPIT_DEVICE inline __attribute__((always_inline))
#define DROPIT_SIMT_INLINE inline __attribute__((always_inline))
// A lambda of a kernel body: after its parameter list (gcc left some out of line).
#define DROPIT_INLINE_LAMBDA __attribute__((always_inline))
// Unrolled on the host too, so that each copy of an access is a site of its own, as on the GPU.
#define DROPIT_UNROLL _Pragma("GCC unroll 16")
#define DROPIT_SHARED(type, name, count)                                                   \
  ::dropit::simt::sptr<type> name(static_cast<type*>(                                      \
      ::dropit::simt::host::static_shared(sizeof(type) * static_cast<size_t>(count), 16)))

namespace dropit {
namespace simt {
namespace host {
// Implemented by the host SIMT layer (tests/simt/simt_host.cpp).
enum class WarpOp : int { kBallot = 1, kShfl, kShflUp, kShflDown, kShflXor, kMatchAny, kSync, kReduceMax };
enum class Space : int { kGlobal = 0, kShared = 1 };
enum class Access : int { kLoad = 0, kStore = 1, kAtomic = 2 };
int thread_idx();
int block_dim();
int64_t block_idx();
int64_t grid_dim();
void sync();
void* static_shared(size_t bytes, size_t align);
void* dynamic_shared();
// One warp-wide exchange: every lane passes its value (and argument); returns
// this lane's result once all 32 lanes have arrived. Never inlined: its return
// address tells the call sites apart.
__attribute__((noinline)) uint64_t warp_op(WarpOp op, uint64_t value, int arg);
// Checks one access of `bytes` at p (inside a registered global buffer, or
// inside the block's shared memory; aligned to `align`; a store needs a
// writable buffer) and counts it. A failed check stops the launch with an
// error. Never inlined: its return address tells the access sites apart.
__attribute__((noinline)) void access(Space space, Access kind, const void* p, size_t bytes, size_t align);
// An asynchronous copy of `bytes` from global `src` to shared `dst`: both checked (bounds, and
// alignment to `bytes`) and counted now, as one access site; the bytes move only at this thread's
// copy_async_wait_all(). Until then any access to `dst` by any thread fails the launch, and a
// thread that exits with copies pending fails it too. Never inlined (its return address is the
// site).
__attribute__((noinline)) void copy_async(void* dst, const void* src, size_t bytes);
void copy_async_wait_all();
}  // namespace host

template <typename T, host::Space S>
class Ptr;

// What p[i] gives on the host: reading it loads, assigning to it stores, both
// through the layer's checks.
template <typename T, host::Space S>
class Ref {
 public:
  using Value = std::remove_const_t<T>;
  DROPIT_SIMT_INLINE explicit Ref(T* p) : p_(p) {}
  DROPIT_SIMT_INLINE operator Value() const {
    host::access(S, host::Access::kLoad, p_, sizeof(T), alignof(T));
    return *p_;
  }
  DROPIT_SIMT_INLINE const Ref& operator=(Value v) const {
    static_assert(!std::is_const_v<T>, "store through a pointer to const");
    host::access(S, host::Access::kStore, p_, sizeof(T), alignof(T));
    *p_ = v;
    return *this;
  }
  DROPIT_SIMT_INLINE const Ref& operator=(const Ref& r) const { return *this = static_cast<Value>(r); }
  DROPIT_SIMT_INLINE Ptr<T, S> operator&() const { return Ptr<T, S>(p_); }

 private:
  T* p_;
};

// A pointer into global (S = kGlobal) or shared memory whose accesses go
// through the layer. Arithmetic and comparisons as for T*.
template <typename T, host::Space S>
class Ptr {
 public:
  DROPIT_SIMT_INLINE Ptr() = default;
  DROPIT_SIMT_INLINE Ptr(std::nullptr_t) {}
  DROPIT_SIMT_INLINE explicit Ptr(T* p) : p_(p) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  DROPIT_SIMT_INLINE Ptr(const Ptr<U, S>& o) : p_(o.get()) {}

  DROPIT_SIMT_INLINE T* get() const { return p_; }
  DROPIT_SIMT_INLINE explicit operator bool() const { return p_ != nullptr; }
  DROPIT_SIMT_INLINE Ref<T, S> operator[](int64_t i) const { return Ref<T, S>(p_ + i); }
  DROPIT_SIMT_INLINE Ref<T, S> operator*() const { return Ref<T, S>(p_); }
  DROPIT_SIMT_INLINE Ptr operator+(int64_t i) const { return Ptr(p_ + i); }
  DROPIT_SIMT_INLINE Ptr operator-(int64_t i) const { return Ptr(p_ - i); }
  DROPIT_SIMT_INLINE Ptr& operator+=(int64_t i) {
    p_ += i;
    return *this;
  }
  DROPIT_SIMT_INLINE int64_t operator-(const Ptr& o) const { return p_ - o.p_; }
  DROPIT_SIMT_INLINE bool operator==(const Ptr& o) const { return p_ == o.p_; }
  DROPIT_SIMT_INLINE bool operator!=(const Ptr& o) const { return p_ != o.p_; }

 private:
  T* p_ = nullptr;
};

template <typename T>
using gptr = Ptr<T, host::Space::kGlobal>;
template <typename T>
using sptr = Ptr<T, host::Space::kShared>;

inline int thread_idx() { return host::thread_idx(); }
inline int block_dim() { return host::block_dim(); }
inline int64_t block_idx() { return host::block_idx(); }
inline int64_t grid_dim() { return host::grid_dim(); }
inline void sync() { host::sync(); }
DROPIT_SIMT_INLINE void syncwarp() { host::warp_op(host::WarpOp::kSync, 0, 0); }

template <typename T>
inline sptr<T> dynamic_shared() {
  return sptr<T>(static_cast<T*>(host::dynamic_shared()));
}

// Fibers of a block never run at the same time: a plain read-modify-write is atomic.
template <typename T>
DROPIT_SIMT_INLINE T atomic_add_shared(sptr<T> p, T v) {
  host::access(host::Space::kShared, host::Access::kAtomic, p.get(), sizeof(T), alignof(T));
  T old = *p.get();
  *p.get() = static_cast<T>(old + v);
  return old;
}

template <typename T, host::Space S>
DROPIT_SIMT_INLINE uintptr_t address(const Ptr<T, S>& p) {
  return reinterpret_cast<uintptr_t>(p.get());
}

template <typename T>
DROPIT_SIMT_INLINE gptr<T> pinned(const gptr<T>& p) {
  return p;
}

template <typename U, typename T, host::Space S>
DROPIT_SIMT_INLINE Ptr<U, S> ptr_cast(const Ptr<T, S>& p) {
  return Ptr<U, S>(reinterpret_cast<U*>(p.get()));
}

template <int N, typename T, host::Space S>
DROPIT_SIMT_INLINE Vec<std::remove_const_t<T>, N> load_vec(const Ptr<T, S>& p) {
  using V = Vec<std::remove_const_t<T>, N>;
  host::access(S, host::Access::kLoad, p.get(), sizeof(V), alignof(V));
  V v;
  std::memcpy(&v, p.get(), sizeof(V));
  return v;
}
template <int N, typename T, host::Space S>
DROPIT_SIMT_INLINE void store_vec(const Ptr<T, S>& p, const Vec<T, N>& v) {
  host::access(S, host::Access::kStore, p.get(), sizeof(v), alignof(Vec<T, N>));
  std::memcpy(p.get(), &v, sizeof(v));
}

// The host layer emulates sm_80+: copies land at the wait (see host::copy_async).
constexpr bool has_async_copy() { return true; }
template <typename T>
DROPIT_SIMT_INLINE void copy_async16(const sptr<T>& dst, const gptr<const T>& src) {
  host::copy_async(dst.get(), src.get(), 16);
}
inline void copy_async_wait_all() { host::copy_async_wait_all(); }

DROPIT_SIMT_INLINE uint32_t ballot(bool pred) {
  return static_cast<uint32_t>(host::warp_op(host::WarpOp::kBallot, pred ? 1u : 0u, 0));
}

DROPIT_SIMT_INLINE uint32_t match_any(uint32_t v) {
  return static_cast<uint32_t>(host::warp_op(host::WarpOp::kMatchAny, v, 0));
}

// As on sm_80+: one warp instruction.
DROPIT_SIMT_INLINE uint32_t reduce_max(uint32_t v) {
  return static_cast<uint32_t>(host::warp_op(host::WarpOp::kReduceMax, v, 0));
}

namespace detail {
template <typename T>
DROPIT_SIMT_INLINE T exchange(host::WarpOp op, T v, int arg) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  u = host::warp_op(op, u, arg);
  T r;
  std::memcpy(&r, &u, sizeof(T));
  return r;
}
}  // namespace detail

template <typename T>
DROPIT_SIMT_INLINE T shfl(T v, int src_lane) { return detail::exchange(host::WarpOp::kShfl, v, src_lane); }
template <typename T>
DROPIT_SIMT_INLINE T shfl_up(T v, int delta) { return detail::exchange(host::WarpOp::kShflUp, v, delta); }
template <typename T>
DROPIT_SIMT_INLINE T shfl_down(T v, int delta) { return detail::exchange(host::WarpOp::kShflDown, v, delta); }
template <typename T>
DROPIT_SIMT_INLINE T shfl_xor(T v, int lane_mask) { return detail::exchange(host::WarpOp::kShflXor, v, lane_mask); }

inline int popc(uint32_t v) { return __builtin_popcount(v); }
inline int ffs(uint32_t v) { return v == 0 ? 0 : __builtin_ctz(v) + 1; }
inline int clz(uint32_t v) { return v == 0 ? 32 : __builtin_clz(v); }

namespace detail {
// The signed 16-bit half of v at bit `at` (0 or 16), and v with that half replaced by h.
inline int16_t half(uint32_t v, int at) { return static_cast<int16_t>(static_cast<uint16_t>(v >> at)); }
inline uint32_t with_half(uint32_t v, int at, int h) {
  return (v & ~(0xffffu << at)) | (static_cast<uint32_t>(static_cast<uint16_t>(h)) << at);
}
}  // namespace detail
inline uint32_t add_min_s16x2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r = 0;
  for (int at : {0, 16}) {
    const int16_t sum = static_cast<int16_t>(static_cast<uint16_t>(detail::half(a, at) + detail::half(b, at)));
    r = detail::with_half(r, at, std::min<int>(sum, detail::half(c, at)));
  }
  return r;
}
inline uint32_t max_s16x2(uint32_t a, uint32_t b) {
  uint32_t r = 0;
  for (int at : {0, 16}) r = detail::with_half(r, at, std::max<int>(detail::half(a, at), detail::half(b, at)));
  return r;
}

}  // namespace simt
}  // namespace dropit

#else
#error "csrc/cuda/simt.cuh: compile with nvcc, or define DROPIT_SIMT_HOST and link the host SIMT layer"
#endif

namespace dropit {
namespace simt {

// The barrier policy of the kernel bodies: each barrier call names the barrier
// (an id from the kernel's own enum): a block barrier, or a warp's when one
// warp works alone. Production code syncs at every one; the tests pass a
// policy that leaves one out, to check that each is needed.
struct BlockSync {
  DROPIT_DEVICE void operator()(int /*barrier*/) const { sync(); }
  DROPIT_DEVICE void warp(int /*barrier*/) const { syncwarp(); }
  // The wait for this thread's asynchronous copies (named like a barrier, so that the tests can
  // leave it out too).
  DROPIT_DEVICE void copies(int /*wait*/) const { copy_async_wait_all(); }
};

}  // namespace simt
}  // namespace dropit
