// The native autograd nodes of DropIT's eager products: the ops `linear_dropit` and `conv_dropit`.
//
// Forward runs torch's own op and packs the input (or takes the pack an earlier product of the
// forward made of the same tensor, or the input as it is where something else keeps it alive);
// the backward node is C++, written as ATen's own nodes are (typed fields, SavedVariables): it
// unpacks the input and computes the gradients with the ATen calls of torch's derivative formulas,
// exactly as the autograd Functions of dropit_cuda/functional.py do (they serve torch.compile,
// forward AD, torch.func, DTensors and the fidelity hook). One native call per direction instead
// of a Python Function's apply, pack and backward: the host cost of a product, which sets the step
// time of an eager model on a fast GPU.
#include <ATen/ExpandUtils.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ops.h"

namespace dropit {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The layout the input was packed in: its memory order (dropit_cuda.ops.MEMORY_ORDERS).
enum class MemoryOrder : int64_t { kContiguous = 0, kChannelsLast = 1, kChannelsLast3d = 2 };

constexpr const char* kDoubleBackward =
    "DropIT layers do not support double backward: their backward pass uses a compressed copy of "
    "the input and is not itself differentiable (dropit_cuda.revert(model), or "
    "convert(..., exclude=[...]) for the layers a double backward goes through)";

// The input in its memory order as one 1-D tensor (dropit_cuda.ops._memory_order).
at::Tensor memory_ordered(const at::Tensor& x, MemoryOrder order) {
  switch (order) {
    case MemoryOrder::kChannelsLast: return x.permute({0, 2, 3, 1}).reshape(-1);
    case MemoryOrder::kChannelsLast3d: return x.permute({0, 2, 3, 4, 1}).reshape(-1);
    default: return x.contiguous().view(-1);
  }
}

// The product's input as backward needs it: its pack (given, or made here), or the input itself
// where `values` is given without `index`.
struct KeptInput {
  SavedVariable values, index;
  std::vector<int64_t> shape;
  double gamma = 0.0;
  int64_t chunk = 1;
  bool bitmap = false;
  MemoryOrder order = MemoryOrder::kContiguous;

  // Keeps x as the op's arguments say (schema in ops.cpp); returns the tensors saved, which the op
  // also returns.
  std::pair<at::Tensor, at::Tensor> keep(const at::Tensor& x, const std::optional<at::Tensor>& given_values,
                                         const std::optional<at::Tensor>& given_index, double gamma_,
                                         int64_t chunk_, bool bitmap_, int64_t order_, std::optional<int64_t> seed) {
    shape = x.sizes().vec();
    gamma = gamma_, chunk = chunk_, bitmap = bitmap_, order = static_cast<MemoryOrder>(order_);
    at::Tensor v, i;
    if (given_values.has_value() && given_values->defined()) {
      v = *given_values;
      if (given_index.has_value()) i = *given_index;
    } else {
      static auto pack_op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("dropit_cuda::pack", "")
                                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, int64_t, bool,
                                                                          std::optional<int64_t>)>();
      std::tie(v, i) = pack_op.call(memory_ordered(x, order), gamma, chunk, bitmap, seed);
    }
    values = SavedVariable(v, false);
    index = SavedVariable(i, false);
    return {v, i};
  }

  // Unpacked (the dropped elements zero) in the input's shape and memory order, or the input.
  at::Tensor restore() const {
    at::Tensor v = values.unpack(), i = index.unpack();  // each read once (checkpointing, hooks)
    if (!i.defined()) return v;
    static auto unpack_op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("dropit_cuda::unpack", "")
                                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, double,
                                                  int64_t, bool)>();
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    at::Tensor flat;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // the pack holds no graph
      flat = unpack_op.call(v, i, c10::SymInt(numel), gamma, chunk, bitmap);
    }
    const auto& s = shape;
    switch (order) {
      case MemoryOrder::kChannelsLast: return flat.view({s[0], s[2], s[3], s[1]}).permute({0, 3, 1, 2});
      case MemoryOrder::kChannelsLast3d:
        return flat.view({s[0], s[2], s[3], s[4], s[1]}).permute({0, 4, 1, 2, 3});
      default: return flat.view(s);
    }
  }

  void release() {
    values.reset_data();
    index.reset_data();
  }
};

// What both nodes share: the weight (the master copy; cast again in backward, which gives the
// bits the forward used), the kept input, and once-differentiable gradients.
struct ProductNode : public Node {
  SavedVariable weight_;
  at::ScalarType weight_dtype_ = at::kFloat;  // the weight gradient's dtype
  std::optional<at::ScalarType> cast_;
  KeptInput input_;

  // The gradients of (input, weight, bias) for grad_out.
  virtual std::array<at::Tensor, 3> gradients(const at::Tensor& grad_out) = 0;

  // Run as torch's once_differentiable does: where a graph is recorded (create_graph=True) the
  // gradients are valid, and differentiating them again raises, naming DropIT.
  variable_list apply(variable_list&& grads) override {
    variable_list out(3);
    if (!grads[0].defined()) return out;
    const bool record = at::GradMode::is_enabled() && grads[0].requires_grad();
    {
      at::AutoGradMode no_grad(false);
      auto g = gradients(grads[0]);
      out = {g[0], g[1], g[2]};
    }
    if (!record) return out;
    std::vector<size_t> defined;
    variable_list inputs;
    for (size_t k = 0; k < out.size(); ++k) {
      if (out[k].defined()) defined.push_back(k), inputs.push_back(out[k].detach().requires_grad_());
    }
    auto guarded = torch::autograd::DelayedError(kDoubleBackward, static_cast<int64_t>(inputs.size()))
                       .apply(std::move(inputs));
    for (size_t j = 0; j < defined.size(); ++j) out[defined[j]] = guarded[j];
    return out;
  }

  bool weight_t_ = false;  // the saved weight is W of x @ W: the product's weight is W.t()

  // The weight as the product read it.
  at::Tensor weight() const {
    at::Tensor w = weight_.unpack();
    if (weight_t_) w = w.t();
    return cast_ ? w.to(*cast_) : w;
  }

  void release_variables() override {
    weight_.reset_data();
    input_.release();
  }

  // Compiled autograd traces every node of a backward; dropit_cuda.functional takes its Python
  // Functions (which it can trace) while compiled autograd is on during the forward.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    TORCH_CHECK_NOT_IMPLEMENTED(
        false, "dropit_cuda: ", name(), " (a DropIT product of an eager forward) cannot run under compiled "
        "autograd. Turn compiled autograd on before the forward, or compile the forward too: DropIT then "
        "records nodes compiled autograd can trace");
  }
};

// The product itself: torch's op on operands autocast has already cast (the weight: here, so
// that its low-precision copy is not saved), with autocast off and no graph recorded. Grad mode
// off, not the autograd keys skipped: below autograd, linear can decompose differently (a
// non-contiguous 3-D input gives other bits), and the product must be the plain op's.
struct NoGraph {
  at::AutoGradMode no_grad{false};
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

bool column_major(int64_t size0, int64_t stride0, int64_t stride1) { return stride0 == 1 && stride1 == size0; }

struct DropITLinearBackward : public ProductNode {
  // How ATen's linear computed the product, which decides how autograd differentiates it (see
  // functional._plan_linear): mat1 is x as a matrix, the bias fused into addmm or added to the
  // N-D matmul output.
  bool mat1_column_major = false, weight_column_major = false, bias_fused = false;
  std::vector<int64_t> mat1_strides, bias_shape;
  bool has_bias = false;

  std::string name() const override { return "DropITLinearBackward"; }

  std::array<at::Tensor, 3> gradients(const at::Tensor& grad_out) override {
    const auto& shape = input_.shape;
    const at::Tensor g2 = grad_out.dim() != 2 ? grad_out.reshape({-1, grad_out.size(-1)}) : grad_out;
    at::Tensor grad_x, grad_w, grad_b;
    const bool need_x = task_should_compute_output(0), need_w = task_should_compute_output(1);
    at::Tensor w = need_x || need_w ? weight() : at::Tensor();
    // ATen's mm_mat1_backward / mm_mat2_backward with mat2 = w.t()
    if (need_x) {
      grad_x = mat1_column_major ? w.t().mm(g2.t()).t() : g2.mm(w);
      if (shape.size() != 2) grad_x = grad_x.view(shape);
    }
    if (need_w) {
      at::Tensor mat1 = input_.restore();
      if (shape.size() != 2) {
        int64_t rows = 1;
        for (size_t k = 0; k + 1 < shape.size(); ++k) rows *= shape[k];
        mat1 = mat1.reshape({rows, shape.back()});
      }
      if (mat1_column_major && mat1.strides() != at::IntArrayRef(mat1_strides)) {
        mat1 = mat1.t().contiguous().t();  // read column-major, as ATen's product read x
      }
      grad_w = weight_column_major ? g2.t().mm(mat1) : mat1.t().mm(g2).t();
      if (cast_) grad_w = grad_w.to(weight_dtype_);
      if (weight_t_) grad_w = grad_w.t();  // as the transposed view's own node would give it back
    }
    if (has_bias && task_should_compute_output(2)) grad_b = at::sum_to(bias_fused ? g2 : grad_out, bias_shape);
    return {grad_x, grad_w, grad_b};
  }
};

struct DropITConvBackward : public ProductNode {
  std::vector<int64_t> stride, padding, dilation, output_padding;
  bool transposed = false;
  int64_t groups = 1;
  std::optional<int64_t> bias_size;

  std::string name() const override { return "DropITConvBackward"; }

  std::array<at::Tensor, 3> gradients(const at::Tensor& grad_out) override {
    const std::array<bool, 3> need = {task_should_compute_output(0), task_should_compute_output(1),
                                      bias_size.has_value() && task_should_compute_output(2)};
    // the input gradient needs the input's shape only
    const at::Tensor x_hat = need[1] ? input_.restore() : grad_out.new_empty({1}).expand(input_.shape);
    const std::vector<int64_t> bias_sizes = {bias_size.value_or(0)};
    auto [grad_x, grad_w, grad_b] = at::convolution_backward(
        grad_out, x_hat, weight(), bias_size ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(),
        stride, padding, dilation, transposed, output_padding, groups, need);
    if (need[1] && cast_) grad_w = grad_w.to(weight_dtype_);
    return {grad_x, grad_w, need[2] ? grad_b : at::Tensor()};
  }
};

// Makes the node of a product (when a gradient is needed) and the op's outputs: the product, and
// the pack made here (outputs must be defined: a given pack or input comes back as empty tensors).
template <typename NodeT, typename Setup>
std::tuple<at::Tensor, at::Tensor, at::Tensor> record(
    at::Tensor out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& index, double gamma, int64_t chunk,
    bool bitmap, int64_t order, std::optional<int64_t> seed, std::optional<at::ScalarType> cast, Setup&& setup) {
  TORCH_CHECK_VALUE(order >= 0 && order <= 2, "memory_order must be 0, 1 or 2, got ", order);
  const bool given = values.has_value() && values->defined();
  auto node = c10::make_intrusive<NodeT>();
  std::pair<at::Tensor, at::Tensor> kept;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    kept = node->input_.keep(x, values, index, gamma, chunk, bitmap, order, seed);
  }
  if (torch::autograd::compute_requires_grad(x, weight, bias)) {
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
    node->weight_ = SavedVariable(weight, false);
    node->weight_dtype_ = weight.scalar_type();
    node->cast_ = cast;
    setup(*node);
    torch::autograd::set_history(out, node);
  }
  if (given) return {out, at::empty({0}, out.options()), at::empty({0}, out.options())};
  return {out, kept.first, kept.second};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_dropit(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& index, double gamma, int64_t chunk,
    bool bitmap, int64_t memory_order, std::optional<int64_t> seed, std::optional<at::ScalarType> cast,
    bool weight_t) {
  at::Tensor out;
  const at::Tensor w = weight_t ? weight.t() : weight;  // (a view with no autograd node)
  {
    NoGraph no_graph;
    out = at::linear(x, cast ? w.to(*cast) : w, bias);
  }
  return record<DropITLinearBackward>(
      out, x, weight, bias, values, index, gamma, chunk, bitmap, memory_order, seed, cast,
      [&](DropITLinearBackward& n) {
        n.weight_t_ = weight_t;
        const int64_t nd = x.dim();
        // an N-D x is folded row-major: column-major only as a 1 x 1 matrix
        n.mat1_column_major = nd == 2 ? column_major(x.size(0), x.stride(0), x.stride(1))
                                      : x.numel() == 1 && x.size(-1) == 1;
        n.mat1_strides = nd == 2 ? x.strides().vec() : std::vector<int64_t>{x.size(-1), 1};
        n.weight_column_major = column_major(w.size(1), w.stride(1), w.stride(0));
        n.has_bias = bias.has_value() && bias->defined();
        if (n.has_bias) {
          n.bias_shape = bias->sizes().vec();
          n.bias_fused = nd == 2 || (x.is_contiguous() && (nd == 3 || bias->dim() == 1));
        }
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_dropit(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& index, double gamma, int64_t chunk,
    bool bitmap, int64_t memory_order, std::optional<int64_t> seed, std::optional<at::ScalarType> cast,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
    at::IntArrayRef output_padding, int64_t groups) {
  at::Tensor out;
  {
    NoGraph no_graph;
    out = at::convolution(x, cast ? weight.to(*cast) : weight, bias, stride, padding, dilation, transposed,
                          output_padding, groups);
  }
  return record<DropITConvBackward>(
      out, x, weight, bias, values, index, gamma, chunk, bitmap, memory_order, seed, cast,
      [&](DropITConvBackward& n) {
        n.stride = stride.vec(), n.padding = padding.vec(), n.dilation = dilation.vec();
        n.output_padding = output_padding.vec();
        n.transposed = transposed, n.groups = groups;
        if (bias.has_value() && bias->defined()) n.bias_size = bias->size(0);
      });
}

}  // namespace
}  // namespace dropit

// Autograd kernels only (schemas in ops.cpp): dropit_cuda.functional calls these ops in eager
// mode, with a weight that requires grad and autograd on; its Python Functions serve every other
// case.
TORCH_LIBRARY_IMPL(dropit_cuda, Autograd, m) {
  m.impl("linear_dropit", &dropit::linear_dropit);
  m.impl("conv_dropit", &dropit::conv_dropit);
}
