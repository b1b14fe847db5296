// CUDA launchers of pack and unpack, registered for the CUDA dispatch key.
//
// The kernel bodies are in pack.cuh / unpack.cuh (portable, also run by the
// host SIMT layer in the tests); this file holds everything CUDA-specific:
// __global__ entry points, launch syntax, streams, device guard and the
// opt-in to more than 48 KB of dynamic shared memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <mutex>
#include <vector>

#include "../ops.h"
#include "pack.cuh"
#include "unpack.cuh"

namespace dropit {
namespace {

template <typename Bits, typename Key, KeySource Src>
__global__ void __launch_bounds__(kPackMaxThreads, 2) pack_kernel(PackParams<Bits> p) {
  kernels::pack_block<Bits, Key, Src>(p);
}

template <typename Bits, typename Key, KeySource Src>
__global__ void __launch_bounds__(kPackMaxThreads, 2) pack_warps_kernel(PackParams<Bits> p) {
  kernels::pack_warps<Bits, Key, Src>(p);
}

template <typename Bits>
__global__ void __launch_bounds__(1024) unpack_bitmap_kernel(UnpackParams<Bits> p) {
  kernels::unpack_bitmap_block<Bits>(p);
}

template <typename Bits>
__global__ void __launch_bounds__(1024) unpack_offsets_kernel(UnpackParams<Bits> p) {
  kernels::unpack_offsets_block<Bits>(p);
}

// Shared memory of a pack kernel on a device: the opt-in maximum per block and the kernel's
// static part.
struct StagedSmem {
  size_t optin = 0;
  size_t static_bytes = 0;
};

// The first call per device raises the kernel's dynamic shared-memory limit to all the device
// allows (a per-device function attribute: setting it once, to one value, leaves no race between
// host threads packing chunks of different sizes); later calls read the cache.
template <auto kernel>
StagedSmem opt_in_smem(int device) {
  static std::mutex mu;
  static std::vector<StagedSmem> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1);
  StagedSmem& s = cache[device];
  if (s.optin == 0) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        optin - static_cast<int>(attr.sharedSizeBytes)));
    s.static_bytes = attr.sharedSizeBytes;
    s.optin = static_cast<size_t>(optin);
  }
  return s;
}

template <typename Bits, typename Key, KeySource Src>
void launch_pack(const PackParams<Bits>& p, const PackPlan& plan, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(plan.grid);
  if (plan.per_warp) {
    pack_warps_kernel<Bits, Key, Src><<<grid, plan.threads, plan.dynamic_smem, stream>>>(p);
  } else {
    pack_kernel<Bits, Key, Src><<<grid, plan.threads, plan.dynamic_smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Bits>
void pack_typed(const at::Tensor& x, at::Tensor& values, at::Tensor& index, const ChunkGeometry& g,
                bool bitmap, std::optional<int64_t> seed, cudaStream_t stream) {
  const int device = x.device().index();
  const StagedSmem smem = opt_in_smem<pack_kernel<Bits, Bits, KeySource::kSharedBits>>(device);
  // Both per-warp kernels get the same limit (neither has static shared memory).
  const StagedSmem warp_smem = seed.has_value() ? opt_in_smem<pack_warps_kernel<Bits, uint32_t, KeySource::kRandom>>(device)
                                                : opt_in_smem<pack_warps_kernel<Bits, Bits, KeySource::kSharedBits>>(device);
  const PackPlan plan = plan_pack(g, sizeof(Bits), seed.has_value(), smem.optin, 0, smem.static_bytes,
                                  warp_smem.optin - warp_smem.static_bytes);
  const PackParams<Bits> p = make_pack_params<Bits>(
      g, static_cast<const Bits*>(x.const_data_ptr()), static_cast<Bits*>(values.data_ptr()),
      bitmap ? static_cast<int32_t*>(index.data_ptr()) : nullptr,
      bitmap ? nullptr : static_cast<uint16_t*>(index.data_ptr()),
      seed.has_value() ? static_cast<uint64_t>(*seed) : 0u);
  switch (plan.source) {
    case KeySource::kSharedBits:
      launch_pack<Bits, Bits, KeySource::kSharedBits>(p, plan, stream);
      break;
    case KeySource::kGlobalBits:
      launch_pack<Bits, Bits, KeySource::kGlobalBits>(p, plan, stream);
      break;
    case KeySource::kRandom:
      launch_pack<Bits, uint32_t, KeySource::kRandom>(p, plan, stream);
      break;
  }
}

std::tuple<at::Tensor, at::Tensor> pack_cuda(const at::Tensor& x, double gamma, int64_t chunk,
                                             bool bitmap, std::optional<int64_t> seed) {
  ChunkGeometry g = check_pack_args(x, gamma, chunk);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [values, index] = allocate_packed(x, g, bitmap);
  if (g.numel == 0) return {values, index};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  dispatch_bits(x.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    pack_typed<Bits>(x, values, index, g, bitmap, seed, stream);
  });
  return {values, index};
}

at::Tensor unpack_cuda(const at::Tensor& values, const at::Tensor& index, int64_t numel,
                       double gamma, int64_t chunk, bool bitmap) {
  ChunkGeometry g = check_unpack_args(values, index, numel, gamma, chunk, bitmap);
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({numel}, values.options());
  if (numel == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(values.device().index()).stream();
  const LaunchPlan plan = plan_unpack(g, bitmap);
  dispatch_bits(values.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    const UnpackParams<Bits> p = make_unpack_params<Bits>(
        g, static_cast<const Bits*>(values.const_data_ptr()),
        bitmap ? static_cast<const int32_t*>(index.const_data_ptr()) : nullptr,
        bitmap ? nullptr : static_cast<const uint16_t*>(index.const_data_ptr()),
        static_cast<Bits*>(out.data_ptr()));
    const unsigned grid = static_cast<unsigned>(plan.grid);
    if (bitmap) {
      unpack_bitmap_kernel<Bits><<<grid, plan.threads, plan.dynamic_smem, stream>>>(p);
    } else {
      unpack_offsets_kernel<Bits><<<grid, plan.threads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace dropit

TORCH_LIBRARY_IMPL(dropit_cuda, CUDA, m) {
  m.impl("pack", &dropit::pack_cuda);
  m.impl("unpack", &dropit::unpack_cuda);
}
