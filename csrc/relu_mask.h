// ReLU with a 1-bit mask cache: declarations and the per-element math shared
// by the CPU kernels, the CUDA kernels and the host SIMT layer.
//
// Mask layout: int32 words, ceil(n/32) of them; bit j of word w belongs to
// element 32*w + j of the tensor in memory order (the bit convention of the
// packed bitmap). Bits past the last element are 0.
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

namespace dropit {

// Sign bit and the bit pattern of +inf of a floating format.
template <typename Bits>
struct FloatBits {
  Bits sign;
  Bits inf;
};

// Whether the element's mask bit is set: x > 0 or x is NaN.
template <typename Bits>
DROPIT_HD bool relu_mask_bit(Bits x, Bits sign, Bits inf) {
  const Bits mag = x & static_cast<Bits>(~sign);
  return mag > inf || ((x & sign) == 0 && mag != 0);
}

// torch.relu on the bit pattern: +0 for x < 0, x itself otherwise.
template <typename Bits>
DROPIT_HD Bits relu_value(Bits x, Bits sign, Bits inf) {
  const Bits mag = x & static_cast<Bits>(~sign);
  const bool negative = (x & sign) != 0 && mag != 0 && mag <= inf;
  return negative ? static_cast<Bits>(0) : x;
}

// Words of a mask over n elements.
inline int64_t relu_mask_words(int64_t n) { return (n + 31) / 32; }

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

// Kernels per device. `y` may alias `x` (the in-place form).
void relu_mask_forward_cpu_into(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mask);
at::Tensor relu_mask_backward_cpu(const at::Tensor& grad, const at::Tensor& mask);

}  // namespace dropit
