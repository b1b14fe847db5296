// Per-element math of ReLU with a 1-bit mask, on bit patterns. Plain C++ with
// DROPIT_HD, so CPU kernels, CUDA kernels and the host SIMT layer share it;
// see relu_mask.h for the semantics and the mask layout.
#pragma once

#include <cstdint>
#include <type_traits>

#include "dropit.h"

namespace dropit {

// Sign bit and the bit pattern of +inf of a floating format.
template <typename Bits>
struct FloatBits {
  Bits sign;
  Bits inf;
};

// Both functions compare in the signed integer of the width: the magnitude
// (sign cleared) and +inf are non-negative there, and a set sign bit reads as
// a negative number. Plain signed compares and bitwise logic let compilers
// vectorise the CPU loops.

// Whether the element's mask bit is set: x > 0 or x is NaN.
template <typename Bits>
DROPIT_HD bool relu_mask_bit(Bits x, Bits sign, Bits inf) {
  using S = std::make_signed_t<Bits>;
  const S v = static_cast<S>(x);
  const S mag = static_cast<S>(x & static_cast<Bits>(~sign));
  return (v > 0) | (mag > static_cast<S>(inf));  // sign clear and not +0, or NaN
}

// torch.relu on the bit pattern: +0 for x < 0, x itself otherwise.
template <typename Bits>
DROPIT_HD Bits relu_value(Bits x, Bits sign, Bits inf) {
  using S = std::make_signed_t<Bits>;
  const S v = static_cast<S>(x);
  const S mag = static_cast<S>(x & static_cast<Bits>(~sign));
  const bool negative = (v < 0) & (mag != 0) & (mag <= static_cast<S>(inf));
  return x & static_cast<Bits>(static_cast<Bits>(negative) - Bits{1});  // branch-free select
}

}  // namespace dropit
