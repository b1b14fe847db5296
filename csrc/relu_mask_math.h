// Per-element math of ReLU with a 1-bit mask, on bit patterns. Plain C++ with
// DROPIT_HD, so CPU kernels, CUDA kernels and the host SIMT layer share it;
// see relu_mask.h for the semantics and the mask layout.
#pragma once

#include <cstdint>

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

}  // namespace dropit
