// CPU kernels of ReLU with a 1-bit mask: the reference the CUDA kernels are
// compared against. Work is split over mask words (32 elements each).
#include <algorithm>
#include <array>
#include <bit>
#include <cstring>

#include "../relu_mask.h"
#include "parallel_cpu.h"

namespace dropit {
namespace {

// Bit j of a word, as a table so that whole words compile to vector ANDs and
// compares (no per-lane variable shifts, which baseline x86-64 lacks). Every
// select below is branch-free: mask bits are data, a branch on them is a coin
// flip for the predictor.
constexpr auto kBit = [] {
  std::array<uint32_t, 32> t{};
  for (int j = 0; j < 32; ++j) t[j] = 1u << j;
  return t;
}();

// The 32 flags (0 or 1 bytes) as a word, bit j = flags[j]. On little-endian
// machines eight flags at a time: byte i of u sits at bit 8i, and the multiply
// moves it to bit 56 + i; the partial products land on distinct bits, so no
// carries mix them.
inline uint32_t pack_flags(const uint8_t* flags) {
  uint32_t word = 0;
  if constexpr (std::endian::native == std::endian::little) {
    for (int k = 0; k < 4; ++k) {
      uint64_t u;
      std::memcpy(&u, flags + 8 * k, 8);
      word |= static_cast<uint32_t>((u * 0x0102040810204080ull) >> 56) << (8 * k);
    }
  } else {
    for (int j = 0; j < 32; ++j) word |= static_cast<uint32_t>(flags[j]) << j;
  }
  return word;
}

// One word of `len` elements (len == 32 but for the last word). Two passes
// over the (L1-resident) elements: a pure map for y, then the bits of y (the
// same as x's: relu keeps the sign class), which also serves y == x.
template <typename Bits, int Len>
inline uint32_t forward_word(const Bits* x, Bits* y, int len, FloatBits<Bits> f) {
  const int n = Len > 0 ? Len : len;
  for (int j = 0; j < n; ++j) y[j] = relu_value(x[j], f.sign, f.inf);
  uint8_t flags[32] = {};
  for (int j = 0; j < n; ++j) flags[j] = relu_mask_bit(y[j], f.sign, f.inf);
  return pack_flags(flags);
}

// out = bit ? grad : +0, as grad AND (all ones or all zeros).
template <typename Bits, int Len>
inline void backward_word(const Bits* grad, uint32_t word, Bits* out, int len) {
  const int n = Len > 0 ? Len : len;
  for (int j = 0; j < n; ++j) {
    out[j] = grad[j] & static_cast<Bits>(Bits{0} - static_cast<Bits>((word & kBit[j]) != 0));
  }
}

template <typename Bits>
void forward_words(const Bits* x, Bits* y, uint32_t* mask, int64_t n, FloatBits<Bits> f) {
  const int64_t full = n / 32;  // words of 32 elements
  at::parallel_for(0, relu_mask_words(n), grain_items(32), [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t base = 32 * w;
      mask[w] = w < full ? forward_word<Bits, 32>(x + base, y + base, 32, f)
                         : forward_word<Bits, 0>(x + base, y + base, static_cast<int>(n - base), f);
    }
  });
}

template <typename Bits>
void backward_words(const Bits* grad, const uint32_t* mask, Bits* out, int64_t n) {
  const int64_t full = n / 32;
  at::parallel_for(0, relu_mask_words(n), grain_items(32), [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t base = 32 * w;
      if (w < full) {
        backward_word<Bits, 32>(grad + base, mask[w], out + base, 32);
      } else {
        backward_word<Bits, 0>(grad + base, mask[w], out + base, static_cast<int>(n - base));
      }
    }
  });
}

template <typename Bits>
FloatBits<Bits> float_bits(at::ScalarType t) {
  return {static_cast<Bits>(static_cast<Bits>(1) << (sizeof(Bits) * 8 - 1)),
          static_cast<Bits>(float_inf_bits(t))};
}

}  // namespace

void relu_mask_forward_cpu_into(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mask) {
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_bits(x.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    forward_words<Bits>(static_cast<const Bits*>(x.const_data_ptr()), static_cast<Bits*>(y.data_ptr()),
                        static_cast<uint32_t*>(mask.data_ptr()), n, float_bits<Bits>(x.scalar_type()));
  });
}

at::Tensor relu_mask_backward_cpu(const at::Tensor& grad_in, const at::Tensor& mask) {
  check_relu_mask_backward_args(grad_in, mask);
  const at::Tensor grad = dense_layout(grad_in);
  at::Tensor out = at::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return out;
  dispatch_bits(grad.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    backward_words<Bits>(static_cast<const Bits*>(grad.const_data_ptr()),
                         static_cast<const uint32_t*>(mask.const_data_ptr()),
                         static_cast<Bits*>(out.data_ptr()), n);
  });
  return out;
}

}  // namespace dropit
