// The Python module (`dropit_cuda._C`, or the just-in-time build's module): importing it loads the
// ops, and it binds the eager products directly. `torch.ops.dropit_cuda.linear_dropit(...)`
// boxes its arguments into a stack checked against the schema, behind a Python frame; these
// bindings call the same dispatcher entries unboxed, which takes a few microseconds off every
// eager DropIT product (see benchmarks/bench_overhead.py). CMake builds a plain library for C++
// users and leaves this file out (DROPIT_PYTHON_MODULE undefined).
#ifdef DROPIT_PYTHON_MODULE
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace {

using Products = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Products linear_dropit(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const OptTensor& values,
                       const OptTensor& index, double gamma, int64_t chunk, bool bitmap, int64_t memory_order,
                       std::optional<int64_t> seed, std::optional<at::ScalarType> cast, bool weight_t) {
  static const auto op =
      find_op<Products(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                       double, int64_t, bool, int64_t, std::optional<int64_t>, std::optional<at::ScalarType>,
                       bool)>("dropit_cuda::linear_dropit");
  return op.call(x, weight, bias, values, index, gamma, chunk, bitmap, memory_order, seed, cast, weight_t);
}

Products conv_dropit(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const OptTensor& values,
                     const OptTensor& index, double gamma, int64_t chunk, bool bitmap, int64_t memory_order,
                     std::optional<int64_t> seed, std::optional<at::ScalarType> cast, const std::vector<int64_t>& stride,
                     const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, bool transposed,
                     const std::vector<int64_t>& output_padding, int64_t groups) {
  static const auto op =
      find_op<Products(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                       double, int64_t, bool, int64_t, std::optional<int64_t>, std::optional<at::ScalarType>,
                       at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, at::IntArrayRef, int64_t)>(
          "dropit_cuda::conv_dropit");
  return op.call(x, weight, bias, values, index, gamma, chunk, bitmap, memory_order, seed, cast, stride, padding,
                 dilation, transposed, output_padding, groups);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // As torch's own bindings: the GIL released while the op runs.
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("linear_dropit", &linear_dropit, "torch.ops.dropit_cuda.linear_dropit, unboxed (schema in ops.cpp)",
        no_gil);
  m.def("conv_dropit", &conv_dropit, "torch.ops.dropit_cuda.conv_dropit, unboxed (schema in ops.cpp)", no_gil);
}
#endif
