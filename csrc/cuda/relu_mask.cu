// Launchers and CUDA registration of ReLU with a 1-bit mask.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../relu_mask.h"
#include "relu_mask.cuh"

namespace dropit {
namespace {

using relu_kernels::kThreads;
using relu_kernels::plan_relu_mask;

template <typename Bits>
__global__ void __launch_bounds__(kThreads)
relu_mask_forward_kernel(const Bits* x, Bits* y, uint32_t* mask, int64_t n, Bits sign, Bits inf) {
  relu_kernels::relu_mask_forward_body<Bits>(simt::gptr<const Bits>(x), simt::gptr<Bits>(y),
                                             simt::gptr<uint32_t>(mask), n, sign, inf);
}

template <typename Bits>
__global__ void __launch_bounds__(kThreads)
relu_mask_backward_kernel(const Bits* grad, const uint32_t* mask, Bits* out, int64_t n) {
  relu_kernels::relu_mask_backward_body<Bits>(simt::gptr<const Bits>(grad), simt::gptr<const uint32_t>(mask),
                                              simt::gptr<Bits>(out), n);
}

void forward_into(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mask) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_bits(x.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    const Bits sign = static_cast<Bits>(static_cast<Bits>(1) << (sizeof(Bits) * 8 - 1));
    const Bits inf = static_cast<Bits>(float_inf_bits(x.scalar_type()));
    relu_mask_forward_kernel<Bits><<<static_cast<unsigned>(plan_relu_mask(n).grid), kThreads, 0, stream>>>(
        static_cast<const Bits*>(x.const_data_ptr()), static_cast<Bits*>(y.data_ptr()),
        static_cast<uint32_t*>(mask.data_ptr()), n, sign, inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> relu_mask_forward_cuda(const at::Tensor& x) {
  check_relu_mask_input(x, "x");
  const at::Tensor src = dense_layout(x);
  at::Tensor y = at::empty_like(src);  // src's strides: the same storage order
  at::Tensor mask = empty_relu_mask(src);
  forward_into(src, y, mask);
  return {y, mask};
}

at::Tensor relu_mask_forward_inplace_cuda(at::Tensor& x) {
  check_relu_mask_input(x, "x");
  check_relu_mask_dense(x, "x");
  at::Tensor mask = empty_relu_mask(x);
  forward_into(x, x, mask);
  return mask;
}

at::Tensor relu_mask_backward_cuda(const at::Tensor& grad_in, const at::Tensor& mask) {
  check_relu_mask_backward_args(grad_in, mask);
  const at::Tensor grad = dense_layout(grad_in);
  at::Tensor out = at::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_bits(grad.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    relu_mask_backward_kernel<Bits><<<static_cast<unsigned>(plan_relu_mask(n).grid), kThreads, 0, stream>>>(
        static_cast<const Bits*>(grad.const_data_ptr()),
        static_cast<const uint32_t*>(mask.const_data_ptr()), static_cast<Bits*>(out.data_ptr()), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace dropit

TORCH_LIBRARY_IMPL(dropit_cuda, CUDA, m) {
  m.impl("relu_mask_forward", &dropit::relu_mask_forward_cuda);
  m.impl("relu_mask_forward_inplace", &dropit::relu_mask_forward_inplace_cuda);
  m.impl("relu_mask_backward", &dropit::relu_mask_backward_cuda);
}
