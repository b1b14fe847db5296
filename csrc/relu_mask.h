// ReLU with a 1-bit mask cache: declarations and the per-element math shared
// by the CPU kernels, the CUDA kernels and the host SIMT layer.
//
// Mask layout: int32 words, ceil(n/32) of them; bit j of word w belongs to
// element 32*w + j of the tensor in storage order (the tensor is dense in some
// dimension order; the bit convention of the packed bitmap). Bits past the
// last element are 0.
//
// Semantics, matching torch.relu and its autograd formula exactly:
//   forward   y = (x < 0) ? +0 : x        (so -0 stays -0 and NaN passes through)
//   mask bit  = !(y <= 0)                 (set for y > 0 and for NaN)
//   backward  dx = bit ? dy : +0          (threshold_backward(dy, y, 0))
// Everything is computed on the bit pattern, so one kernel serves each width.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "dropit.h"
#include "ops.h"
#include "relu_mask_math.h"

namespace dropit {

// Words of a mask over n elements.
inline int64_t relu_mask_words(int64_t n) { return (n + 31) / 32; }

// An uninitialised mask for x, on x's device; shared by every backend.
inline at::Tensor empty_relu_mask(const at::Tensor& x) {
  return at::empty({relu_mask_words(x.numel())}, x.options().dtype(at::kInt));
}

// The +inf pattern of a floating dtype, as the unsigned integer of its width.
inline uint64_t float_inf_bits(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return 0x7C00u;
    case at::kBFloat16: return 0x7F80u;
    case at::kFloat: return 0x7F800000u;
    default: return 0x7FF0000000000000ull;  // double
  }
}

// Argument checks shared by every backend.
void check_relu_mask_input(const at::Tensor& x, const char* name);
void check_relu_mask_backward_args(const at::Tensor& grad, const at::Tensor& mask);
void check_relu_mask_dense(const at::Tensor& x, const char* name);
// x itself if it is dense in some dimension order, else a copy in empty_like(x)'s layout.
at::Tensor dense_layout(const at::Tensor& x);

// Kernels per device. `y` has x's strides and may be x (the in-place form).
void relu_mask_forward_cpu_into(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mask);
at::Tensor relu_mask_backward_cpu(const at::Tensor& grad, const at::Tensor& mask);

}  // namespace dropit
