// CPU kernels of ReLU with a 1-bit mask: the reference the CUDA kernels are
// compared against. Work is split over mask words (32 elements each).
#include <ATen/Parallel.h>

#include <algorithm>

#include "../relu_mask.h"

namespace dropit {
namespace {

// Mask words per parallel task: 64K elements.
constexpr int64_t kGrainWords = 2048;

template <typename Bits>
void forward_words(const Bits* x, Bits* y, uint32_t* mask, int64_t n, FloatBits<Bits> f) {
  at::parallel_for(0, relu_mask_words(n), kGrainWords, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t base = 32 * w;
      const int len = static_cast<int>(std::min<int64_t>(32, n - base));
      uint32_t word = 0;
      for (int j = 0; j < len; ++j) {
        const Bits v = x[base + j];
        word |= static_cast<uint32_t>(relu_mask_bit(v, f.sign, f.inf)) << j;
        y[base + j] = relu_value(v, f.sign, f.inf);
      }
      mask[w] = word;
    }
  });
}

template <typename Bits>
void backward_words(const Bits* grad, const uint32_t* mask, Bits* out, int64_t n) {
  at::parallel_for(0, relu_mask_words(n), kGrainWords, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t base = 32 * w;
      const int len = static_cast<int>(std::min<int64_t>(32, n - base));
      const uint32_t word = mask[w];
      for (int j = 0; j < len; ++j) {
        out[base + j] = ((word >> j) & 1u) ? grad[base + j] : static_cast<Bits>(0);
      }
    }
  });
}

template <typename Fn>
void dispatch_width(at::ScalarType t, Fn&& fn) {
  switch (at::elementSize(t)) {
    case 2: fn(uint16_t{}); break;
    case 4: fn(uint32_t{}); break;
    default: fn(uint64_t{}); break;
  }
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
  dispatch_width(x.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    forward_words<Bits>(static_cast<const Bits*>(x.const_data_ptr()), static_cast<Bits*>(y.data_ptr()),
                        static_cast<uint32_t*>(mask.data_ptr()), n, float_bits<Bits>(x.scalar_type()));
  });
}

at::Tensor relu_mask_backward_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  check_relu_mask_backward_args(grad, mask);
  at::Tensor out = at::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return out;
  dispatch_width(grad.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    backward_words<Bits>(static_cast<const Bits*>(grad.const_data_ptr()),
                         static_cast<const uint32_t*>(mask.const_data_ptr()),
                         static_cast<Bits*>(out.data_ptr()), n);
  });
  return out;
}

}  // namespace dropit
