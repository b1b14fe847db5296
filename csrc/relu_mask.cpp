// ReLU with a 1-bit mask cache: op schemas, argument checks, CPU registration.
#include <torch/library.h>

#include "relu_mask.h"

namespace dropit {

static bool is_relu_mask_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_relu_mask_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(is_relu_mask_float(x.scalar_type()), name,
                   " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
}

void check_relu_mask_dense(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.is_non_overlapping_and_dense(), name,
                    " must be dense in some dimension order (contiguous, channels_last, a "
                    "transpose...) to be written in place: the kernels walk its storage");
}

at::Tensor dense_layout(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x;
  at::Tensor d = at::empty_like(x);  // a dense layout (the one empty_like picks for x)
  d.copy_(x);
  return d;
}

void check_relu_mask_backward_args(const at::Tensor& grad, const at::Tensor& mask) {
  check_relu_mask_input(grad, "grad");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kInt, "mask must be int32, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 1 && mask.is_contiguous(), "mask must be 1-D and contiguous");
  TORCH_CHECK_VALUE(mask.numel() == relu_mask_words(grad.numel()), "mask holds ", mask.numel(),
                    " words but ", relu_mask_words(grad.numel()), " cover grad's ", grad.numel(),
                    " elements");
  TORCH_CHECK_VALUE(grad.device() == mask.device(), "grad and mask must be on one device, got ",
                    grad.device(), " and ", mask.device());
}

static std::tuple<at::Tensor, at::Tensor> relu_mask_forward_cpu(const at::Tensor& x) {
  check_relu_mask_input(x, "x");
  const at::Tensor src = dense_layout(x);
  at::Tensor y = at::empty_like(src);  // src's strides: the same storage order
  at::Tensor mask = empty_relu_mask(src);
  relu_mask_forward_cpu_into(src, y, mask);
  return {y, mask};
}

static at::Tensor relu_mask_forward_inplace_cpu(at::Tensor& x) {
  check_relu_mask_input(x, "x");
  check_relu_mask_dense(x, "x");
  at::Tensor mask = empty_relu_mask(x);
  relu_mask_forward_cpu_into(x, x, mask);
  return mask;
}

}  // namespace dropit

TORCH_LIBRARY_FRAGMENT(dropit_cuda, m) {
  // y = relu(x), with x's strides where x is dense in some dimension order
  // (else those of empty_like(x)); mask: one bit per element of y in its storage
  // order (int32 words), set where y > 0 or y is NaN.
  m.def("relu_mask_forward(Tensor x) -> (Tensor y, Tensor mask)");
  // The same, writing y into x (which must be dense); returns the mask.
  m.def("relu_mask_forward_inplace(Tensor(a!) x) -> Tensor mask");
  // grad_input = mask ? grad : +0, laid out like grad (dense); grad must have
  // the forward's y strides (the mask follows their storage order).
  m.def("relu_mask_backward(Tensor grad, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(dropit_cuda, CPU, m) {
  m.impl("relu_mask_forward", &dropit::relu_mask_forward_cpu);
  m.impl("relu_mask_forward_inplace", &dropit::relu_mask_forward_inplace_cpu);
  m.impl("relu_mask_backward", &dropit::relu_mask_backward_cpu);
}
