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
  TORCH_CHECK_VALUE(x.dim() == 1 && x.is_contiguous(), name, " must be 1-D and contiguous");
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

static at::Tensor empty_mask(const at::Tensor& x) {
  return at::empty({relu_mask_words(x.numel())}, x.options().dtype(at::kInt));
}

static std::tuple<at::Tensor, at::Tensor> relu_mask_forward_cpu(const at::Tensor& x) {
  check_relu_mask_input(x, "x");
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = empty_mask(x);
  relu_mask_forward_cpu_into(x, y, mask);
  return {y, mask};
}

static at::Tensor relu_mask_forward_inplace_cpu(at::Tensor& x) {
  check_relu_mask_input(x, "x");
  at::Tensor mask = empty_mask(x);
  relu_mask_forward_cpu_into(x, x, mask);
  return mask;
}

}  // namespace dropit

TORCH_LIBRARY_FRAGMENT(dropit_cuda, m) {
  // x: 1-D, in the memory order of the user's tensor. y = relu(x); mask: one
  // bit per element (int32 words), set where y > 0 or y is NaN.
  m.def("relu_mask_forward(Tensor x) -> (Tensor y, Tensor mask)");
  // The same, writing y into x; returns the mask.
  m.def("relu_mask_forward_inplace(Tensor(a!) x) -> Tensor mask");
  // grad_input = mask ? grad : +0, element for element (grad in the mask's order).
  m.def("relu_mask_backward(Tensor grad, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(dropit_cuda, CPU, m) {
  m.impl("relu_mask_forward", &dropit::relu_mask_forward_cpu);
  m.impl("relu_mask_forward_inplace", &dropit::relu_mask_forward_inplace_cpu);
  m.impl("relu_mask_backward", &dropit::relu_mask_backward_cpu);
}
