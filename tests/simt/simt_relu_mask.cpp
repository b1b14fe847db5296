// The ReLU-mask kernel bodies (csrc/cuda/relu_mask.cuh) under the host SIMT
// layer, on CPU tensors. Exposed as torch ops in a test-only namespace
// (torch.ops.dropit_simt_relu.*), registered when the test extension loads.
#define DROPIT_SIMT_HOST 1

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/relu_mask.cuh"
#include "relu_mask.h"
#include "simt_host.h"

namespace {

using dropit::simt::host::LaunchOptions;

struct Shape {
  int threads;
  int64_t grid;
  LaunchOptions options;
};

// order: 0 resumes fibers by thread index up, 1 down, 2 in a shuffled order per sweep (seed).
Shape launch_shape(int64_t n, int64_t threads, int64_t grid, int64_t order, int64_t seed) {
  Shape s;
  s.threads = threads > 0 ? static_cast<int>(threads) : dropit::relu_kernels::kThreads;
  TORCH_CHECK(s.threads % 32 == 0 && s.threads <= 1024, "threads must be a multiple of 32 up to 1024");
  s.grid = grid > 0 ? grid : dropit::relu_kernels::plan_relu_mask(n, s.threads).grid;
  TORCH_CHECK(order >= 0 && order <= 2, "order must be 0 (forward), 1 (reverse) or 2 (shuffled)");
  s.options.order = order == 0 ? LaunchOptions::Order::kForward
                               : (order == 1 ? LaunchOptions::Order::kReverse : LaunchOptions::Order::kShuffled);
  s.options.shuffle_seed = static_cast<uint64_t>(seed);
  s.options.stack_bytes = 32 * 1024;
  return s;
}

// y = relu(x) and the mask, by the kernel body. With `inplace` the kernel
// writes into (a copy of) x itself, as the in-place op does.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, bool inplace, int64_t threads,
                                           int64_t grid, int64_t order, int64_t seed) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 1 && x.is_contiguous() && dropit::is_supported_float(x.scalar_type()),
              "x must be a 1-D contiguous floating CPU tensor");
  const int64_t n = x.numel();
  at::Tensor y = inplace ? x.clone() : at::empty_like(x);
  at::Tensor mask = dropit::empty_relu_mask(x);
  // Poison the outputs: every byte must be written by the kernel.
  if (!inplace && n > 0) y.view(at::kByte).fill_(0xCD);
  if (mask.numel() > 0) mask.view(at::kByte).fill_(0xCD);
  if (n == 0) return {y, mask};
  const Shape s = launch_shape(n, threads, grid, order, seed);
  dropit::dispatch_bits(x.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    const Bits sign = static_cast<Bits>(static_cast<Bits>(1) << (sizeof(Bits) * 8 - 1));
    const Bits inf = static_cast<Bits>(dropit::float_inf_bits(x.scalar_type()));
    using dropit::simt::gptr;
    const gptr<const Bits> xp(static_cast<const Bits*>(inplace ? y.const_data_ptr() : x.const_data_ptr()));
    const gptr<Bits> yp(static_cast<Bits*>(y.data_ptr()));
    const gptr<uint32_t> mp(static_cast<uint32_t*>(mask.data_ptr()));
    LaunchOptions o = s.options;
    o.buffers = {{x.const_data_ptr(), static_cast<size_t>(x.nbytes()), false, "x"},
                 {y.data_ptr(), static_cast<size_t>(y.nbytes()), true, "y"},
                 {mask.data_ptr(), static_cast<size_t>(mask.nbytes()), true, "mask"}};
    dropit::simt::host::launch(
        s.grid, s.threads, 0,
        [&] { dropit::relu_kernels::relu_mask_forward_body<Bits>(xp, yp, mp, n, sign, inf); }, o);
  });
  return {y, mask};
}

at::Tensor backward(const at::Tensor& grad, const at::Tensor& mask, int64_t threads, int64_t grid,
                    int64_t order, int64_t seed) {
  TORCH_CHECK(grad.device().is_cpu() && grad.dim() == 1 && grad.is_contiguous() &&
                  dropit::is_supported_float(grad.scalar_type()),
              "grad must be a 1-D contiguous floating CPU tensor");
  const int64_t n = grad.numel();
  TORCH_CHECK(mask.scalar_type() == at::kInt && mask.is_contiguous() &&
                  mask.numel() == dropit::relu_mask_words(n),
              "mask must be int32 with ceil(n/32) words");
  at::Tensor out = at::empty_like(grad);
  if (n == 0) return out;
  out.view(at::kByte).fill_(0xCD);
  const Shape s = launch_shape(n, threads, grid, order, seed);
  dropit::dispatch_bits(grad.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    using dropit::simt::gptr;
    const gptr<const Bits> gp(static_cast<const Bits*>(grad.const_data_ptr()));
    const gptr<const uint32_t> mp(static_cast<const uint32_t*>(mask.const_data_ptr()));
    const gptr<Bits> op(static_cast<Bits*>(out.data_ptr()));
    LaunchOptions o = s.options;
    o.buffers = {{grad.const_data_ptr(), static_cast<size_t>(grad.nbytes()), false, "grad"},
                 {mask.const_data_ptr(), static_cast<size_t>(mask.nbytes()), false, "mask"},
                 {out.data_ptr(), static_cast<size_t>(out.nbytes()), true, "out"}};
    dropit::simt::host::launch(
        s.grid, s.threads, 0, [&] { dropit::relu_kernels::relu_mask_backward_body<Bits>(gp, mp, op, n); }, o);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(dropit_simt_relu, m) {
  m.def("forward(Tensor x, bool inplace=False, int threads=0, int grid=0, int order=0, int seed=0) -> (Tensor, Tensor)",
        &forward);
  m.def("backward(Tensor grad, Tensor mask, int threads=0, int grid=0, int order=0, int seed=0) -> Tensor",
        &backward);
}
