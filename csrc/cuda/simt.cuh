// The portability layer of the kernel bodies (csrc/cuda/*.cuh).
//
// Kernel bodies use nothing of CUDA but what is declared here: thread and block
// indices, block barriers, static and dynamic shared memory, shared-memory
// atomics, and the warp intrinsics (ballot, shuffles, popc/ffs/clz). Compiled
// by nvcc they map onto CUDA; compiled as plain C++ with DROPIT_SIMT_HOST
// defined they call a host SIMT implementation (tests/simt/) that runs a
// block's threads as cooperative fibers, so the very same kernel source runs
// on the CPU.
//
// Rules for kernel bodies:
//  - warp intrinsics are called by all 32 lanes of a warp (full mask), in
//    warp-uniform control flow; block sizes are multiples of 32;
//  - barriers are reached by every thread of the block;
//  - static shared arrays are declared with DROPIT_SHARED(type, name, count)
//    at function scope (their contents are undefined at block start);
//  - launch syntax and stream handling live in the .cu launchers only.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)

#define DROPIT_DEVICE __device__ __forceinline__
#define DROPIT_SHARED(type, name, count) __shared__ type name[(count)]

namespace dropit {
namespace simt {

DROPIT_DEVICE int thread_idx() { return static_cast<int>(threadIdx.x); }
DROPIT_DEVICE int block_dim() { return static_cast<int>(blockDim.x); }
DROPIT_DEVICE int64_t block_idx() { return static_cast<int64_t>(blockIdx.x); }
DROPIT_DEVICE int64_t grid_dim() { return static_cast<int64_t>(gridDim.x); }

DROPIT_DEVICE void sync() { __syncthreads(); }

template <typename T>
DROPIT_DEVICE T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char dropit_dynamic_smem[];
  return reinterpret_cast<T*>(dropit_dynamic_smem);
}

template <typename T>
DROPIT_DEVICE T atomic_add_shared(T* p, T v) {
  return atomicAdd(p, v);
}

DROPIT_DEVICE uint32_t ballot(bool pred) { return __ballot_sync(0xffffffffu, pred); }

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

}  // namespace simt
}  // namespace dropit

#elif defined(DROPIT_SIMT_HOST)

#define DROPIT_DEVICE inline
#define DROPIT_SHARED(type, name, count)                                                   \
  type* name = static_cast<type*>(                                                         \
      ::dropit::simt::host::static_shared(sizeof(type) * static_cast<size_t>(count), alignof(type)))

namespace dropit {
namespace simt {
namespace host {
// Implemented by the host SIMT layer (tests/simt/simt_host.cpp).
enum class WarpOp : int { kBallot = 1, kShfl, kShflUp, kShflDown, kShflXor };
int thread_idx();
int block_dim();
int64_t block_idx();
int64_t grid_dim();
void sync();
void* static_shared(size_t bytes, size_t align);
void* dynamic_shared();
// One warp-wide exchange: every lane passes its value (and argument); returns
// this lane's result once all 32 lanes have arrived.
uint64_t warp_op(WarpOp op, uint64_t value, int arg);
}  // namespace host

inline int thread_idx() { return host::thread_idx(); }
inline int block_dim() { return host::block_dim(); }
inline int64_t block_idx() { return host::block_idx(); }
inline int64_t grid_dim() { return host::grid_dim(); }
inline void sync() { host::sync(); }

template <typename T>
inline T* dynamic_shared() {
  return static_cast<T*>(host::dynamic_shared());
}

// Fibers of a block never run at the same time: a plain read-modify-write is atomic.
template <typename T>
inline T atomic_add_shared(T* p, T v) {
  T old = *p;
  *p = static_cast<T>(old + v);
  return old;
}

inline uint32_t ballot(bool pred) {
  return static_cast<uint32_t>(host::warp_op(host::WarpOp::kBallot, pred ? 1u : 0u, 0));
}

namespace detail {
template <typename T>
inline T exchange(host::WarpOp op, T v, int arg) {
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
inline T shfl(T v, int src_lane) { return detail::exchange(host::WarpOp::kShfl, v, src_lane); }
template <typename T>
inline T shfl_up(T v, int delta) { return detail::exchange(host::WarpOp::kShflUp, v, delta); }
template <typename T>
inline T shfl_down(T v, int delta) { return detail::exchange(host::WarpOp::kShflDown, v, delta); }
template <typename T>
inline T shfl_xor(T v, int lane_mask) { return detail::exchange(host::WarpOp::kShflXor, v, lane_mask); }

inline int popc(uint32_t v) { return __builtin_popcount(v); }
inline int ffs(uint32_t v) { return v == 0 ? 0 : __builtin_ctz(v) + 1; }
inline int clz(uint32_t v) { return v == 0 ? 32 : __builtin_clz(v); }

}  // namespace simt
}  // namespace dropit

#else
#error "csrc/cuda/simt.cuh: compile with nvcc, or define DROPIT_SIMT_HOST and link the host SIMT layer"
#endif
