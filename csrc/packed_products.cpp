// The native autograd nodes of DropIT's eager products: the ops `linear_dropit` and `conv_dropit`.
//
// Forward runs torch's own op and packs the input (or takes the pack an earlier product of the
// forward made of the same tensor, or the input as it is where something else keeps it alive);
// the backward node is C++: it unpacks the input and computes the gradients with the ATen calls of
// torch's derivative formulas, exactly as the autograd Functions of dropit_cuda/functional.py do
// (they serve torch.compile, forward AD, torch.func, DTensors and the fidelity hook). One native
// call per direction instead of a Python Function's apply, pack and backward: the host cost of a
// product, which sets the step time of an eager model on a fast GPU.
#include <ATen/ExpandUtils.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "ops.h"

namespace dropit {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// The layout the input was packed in: its memory order (dropit_cuda.ops.memory_format_of).
enum class MemoryOrder : int64_t { kContiguous = 0, kChannelsLast = 1, kChannelsLast3d = 2 };

constexpr const char* kDoubleBackward =
    "DropIT layers do not support double backward: their backward pass uses a compressed copy of "
    "the input and is not itself differentiable (dropit_cuda.revert(model), or "
    "convert(..., exclude=[...]) for the layers a double backward goes through)";

// How the forward kept its input, read back by the backward node.
struct PackedInput {
  std::vector<int64_t> shape;
  double gamma;
  int64_t chunk;
  bool bitmap;
  MemoryOrder order;
};

static const auto& pack_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dropit_cuda::pack", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, int64_t, bool,
                                                                 std::optional<int64_t>)>();
  return op;
}

// The input in its memory order as one 1-D tensor (dropit_cuda.ops._memory_order).
at::Tensor memory_ordered(const at::Tensor& x, MemoryOrder order) {
  switch (order) {
    case MemoryOrder::kChannelsLast: return x.permute({0, 2, 3, 1}).reshape(-1);
    case MemoryOrder::kChannelsLast3d: return x.permute({0, 2, 3, 4, 1}).reshape(-1);
    default: return x.contiguous().view(-1);
  }
}

// The tensors saved for the input: its pack, given or made here (then also returned, for the
// forward's pack cache), or the input itself (values given, index not).
struct InputCache {
  at::Tensor values, index;
};

InputCache cache_input(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& values,
                       const std::optional<at::Tensor>& index, double gamma, int64_t chunk, bool bitmap,
                       int64_t order, std::optional<int64_t> seed) {
  TORCH_CHECK_VALUE(order >= 0 && order <= 2, "memory_order must be 0, 1 or 2, got ", order);
  ctx->saved_data["x_shape"] = x.sizes();
  ctx->saved_data["gamma"] = gamma;
  ctx->saved_data["chunk"] = chunk;
  ctx->saved_data["bitmap"] = bitmap;
  ctx->saved_data["order"] = order;
  InputCache c;
  if (values.has_value() && values->defined()) {
    c.values = *values;
    if (index.has_value()) c.index = *index;
    return c;
  }
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain tensors in, no graph to record
    std::tie(c.values, c.index) = pack_op().call(memory_ordered(x, static_cast<MemoryOrder>(order)), gamma,
                                                 chunk, bitmap, seed);
  }
  return c;
}

PackedInput packed_input(AutogradContext* ctx) {
  return {ctx->saved_data["x_shape"].toIntVector(), ctx->saved_data["gamma"].toDouble(),
          ctx->saved_data["chunk"].toInt(), ctx->saved_data["bitmap"].toBool(),
          static_cast<MemoryOrder>(ctx->saved_data["order"].toInt())};
}

// The op's outputs: the product, and the pack made here (outputs must be defined: a given pack
// or input comes back as empty tensors), which is not differentiable.
variable_list outputs_of(AutogradContext* ctx, const at::Tensor& out, const InputCache& c,
                         const std::optional<at::Tensor>& given) {
  variable_list result = {out, c.values, c.index};
  if (given.has_value() && given->defined()) result[1] = result[2] = at::empty({0}, out.options());
  ctx->mark_non_differentiable({result[1], result[2]});
  // their gradients stay undefined (not tensors of zeros, made for nothing on every backward)
  ctx->set_materialize_grads(false);
  return result;
}

// The input as backward uses it: unpacked (the dropped elements zero) in the input's shape and
// memory order, or the input itself where it was saved as it is.
at::Tensor restore_input(const PackedInput& p, const at::Tensor& values, const at::Tensor& index) {
  if (!index.defined()) return values;
  static auto unpack_op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("dropit_cuda::unpack", "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, double,
                                                int64_t, bool)>();
  int64_t numel = 1;
  for (int64_t s : p.shape) numel *= s;
  at::Tensor flat;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the pack holds no graph
    flat = unpack_op.call(values, index, c10::SymInt(numel), p.gamma, p.chunk, p.bitmap);
  }
  const auto& s = p.shape;
  switch (p.order) {
    case MemoryOrder::kChannelsLast:
      return flat.view({s[0], s[2], s[3], s[1]}).permute({0, 3, 1, 2});
    case MemoryOrder::kChannelsLast3d:
      return flat.view({s[0], s[2], s[3], s[4], s[1]}).permute({0, 4, 1, 2, 3});
    default:
      return flat.view(s);
  }
}

// The weight as the product reads it: cast where autocast would have cast it.
at::Tensor weight_operand(const at::Tensor& weight, const c10::IValue& cast) {
  return cast.isNone() ? weight : weight.to(cast.toScalarType());
}

bool column_major(at::IntArrayRef sizes, at::IntArrayRef strides) {
  return strides[0] == 1 && strides[1] == sizes[0];
}

// Runs `grads` (the gradients of one backward) as torch's once_differentiable does: where a graph
// is being recorded (create_graph=True) the gradients are valid, and differentiating them again
// raises, naming DropIT.
template <typename Fn>
variable_list once_differentiable(const variable_list& grad_outputs, Fn&& grads) {
  bool record = at::GradMode::is_enabled();
  if (record) {
    record = false;
    for (const auto& g : grad_outputs) record = record || (g.defined() && g.requires_grad());
  }
  if (!record) return grads();
  variable_list out;
  {
    at::AutoGradMode no_grad(false);
    out = grads();
  }
  std::vector<size_t> defined;
  variable_list inputs;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].defined()) defined.push_back(i), inputs.push_back(out[i].detach().requires_grad_());
  }
  auto guarded = torch::autograd::DelayedError(kDoubleBackward, static_cast<int64_t>(inputs.size()))
                     .apply(std::move(inputs));
  for (size_t j = 0; j < defined.size(); ++j) out[defined[j]] = guarded[j];
  return out;
}

// The product itself: torch's op on operands autocast has already cast (the weight: here, so
// that its low-precision copy is not saved), with autocast off.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace

// (Named for their graph nodes: grad_fn.name() reads "torch::autograd::CppNode<dropit::DropITLinearBackward>".)
struct DropITLinearBackward : public torch::autograd::Function<DropITLinearBackward> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& values,
                               const std::optional<at::Tensor>& index, double gamma, int64_t chunk, bool bitmap,
                               int64_t order, std::optional<int64_t> seed,
                               std::optional<at::ScalarType> cast) {
    at::Tensor out;
    {
      NoAutocast no_autocast;
      out = at::linear(x, cast ? weight.to(*cast) : weight, bias);
    }
    // How ATen's linear computed the product, which decides how autograd differentiates it (see
    // functional._plan_linear): mat1 is x as a matrix (an N-D x folded row-major: column-major
    // only as a 1 x 1 matrix); the bias is fused into addmm or added to the N-D matmul output.
    const int64_t nd = x.dim();
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["mat1_cm"] =
        nd == 2 ? column_major(x.sizes(), x.strides()) : x.numel() == 1 && x.size(-1) == 1;
    ctx->saved_data["mat1_strides"] = nd == 2 ? c10::IValue(x.strides()) : c10::IValue();
    ctx->saved_data["weight_cm"] =
        column_major({weight.size(1), weight.size(0)}, {weight.stride(1), weight.stride(0)});
    ctx->saved_data["bias_shape"] = has_bias ? c10::IValue(bias->sizes()) : c10::IValue();
    ctx->saved_data["bias_fused"] = has_bias && (nd == 2 || (x.is_contiguous() && (nd == 3 || bias->dim() == 1)));
    ctx->saved_data["cast"] = cast ? c10::IValue(*cast) : c10::IValue();
    InputCache c = cache_input(ctx, x, values, index, gamma, chunk, bitmap, order, seed);
    ctx->save_for_backward({weight, c.values, c.index});
    return outputs_of(ctx, out, c, values);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return once_differentiable(grad_outputs, [&]() -> variable_list {
      const auto saved = ctx->get_saved_variables();  // read once (checkpointing, hooks)
      const at::Tensor& weight = saved[0];
      const c10::IValue cast = ctx->saved_data["cast"];
      const at::Tensor w = weight_operand(weight, cast);
      const PackedInput p = packed_input(ctx);
      const at::Tensor& grad_out = grad_outputs[0];
      if (!grad_out.defined()) return variable_list(11);  // (grads are not materialised)
      const bool mat1_cm = ctx->saved_data["mat1_cm"].toBool();
      const at::Tensor g2 = grad_out.dim() != 2 ? grad_out.reshape({-1, grad_out.size(-1)}) : grad_out;
      at::Tensor grad_x, grad_w, grad_b;
      // ATen's mm_mat1_backward / mm_mat2_backward with mat2 = w.t()
      if (ctx->needs_input_grad(0)) {
        grad_x = mat1_cm ? w.t().mm(g2.t()).t() : g2.mm(w);
        if (p.shape.size() != 2) grad_x = grad_x.view(p.shape);
      }
      if (ctx->needs_input_grad(1)) {
        at::Tensor mat1 = restore_input(p, saved[1], saved[2]);
        if (p.shape.size() != 2) {
          int64_t rows = 1;
          for (size_t i = 0; i + 1 < p.shape.size(); ++i) rows *= p.shape[i];
          mat1 = mat1.reshape({rows, p.shape.back()});
        }
        const c10::IValue mat1_strides = ctx->saved_data["mat1_strides"];
        const bool strides_differ = mat1_strides.isNone()
                                        ? mat1.stride(0) != p.shape.back() || mat1.stride(1) != 1
                                        : mat1.strides() != at::IntArrayRef(mat1_strides.toIntVector());
        if (mat1_cm && strides_differ) mat1 = mat1.t().contiguous().t();  // read column-major, as ATen read x
        grad_w = ctx->saved_data["weight_cm"].toBool() ? g2.t().mm(mat1) : mat1.t().mm(g2).t();
        if (!cast.isNone()) grad_w = grad_w.to(weight.scalar_type());
      }
      const c10::IValue bias_shape = ctx->saved_data["bias_shape"];
      if (!bias_shape.isNone() && ctx->needs_input_grad(2)) {
        grad_b = at::sum_to(ctx->saved_data["bias_fused"].toBool() ? g2 : grad_out,
                            at::IntArrayRef(bias_shape.toIntVector()));
      }
      variable_list grads(11);  // one per argument of forward
      grads[0] = grad_x, grads[1] = grad_w, grads[2] = grad_b;
      return grads;
    });
  }
};

struct DropITConvBackward : public torch::autograd::Function<DropITConvBackward> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& values,
                               const std::optional<at::Tensor>& index, double gamma, int64_t chunk, bool bitmap,
                               int64_t order, std::optional<int64_t> seed,
                               std::optional<at::ScalarType> cast, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                               int64_t groups) {
    at::Tensor out;
    {
      NoAutocast no_autocast;
      out = at::convolution(x, cast ? weight.to(*cast) : weight, bias, stride, padding, dilation, transposed,
                            output_padding, groups);
    }
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["bias_size"] = has_bias ? c10::IValue(bias->size(0)) : c10::IValue();
    ctx->saved_data["cast"] = cast ? c10::IValue(*cast) : c10::IValue();
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["out_padding"] = output_padding;
    ctx->saved_data["groups"] = groups;
    InputCache c = cache_input(ctx, x, values, index, gamma, chunk, bitmap, order, seed);
    ctx->save_for_backward({weight, c.values, c.index});
    return outputs_of(ctx, out, c, values);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return once_differentiable(grad_outputs, [&]() -> variable_list {
      const auto saved = ctx->get_saved_variables();  // read once (checkpointing, hooks)
      const at::Tensor& weight = saved[0];
      const c10::IValue cast = ctx->saved_data["cast"];
      const at::Tensor w = weight_operand(weight, cast);
      const PackedInput p = packed_input(ctx);
      const at::Tensor& grad_out = grad_outputs[0];
      if (!grad_out.defined()) return variable_list(17);  // (grads are not materialised)
      const c10::IValue bias_size = ctx->saved_data["bias_size"];
      const std::array<bool, 3> need = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                        !bias_size.isNone() && ctx->needs_input_grad(2)};
      // the input gradient needs the input's shape only
      const at::Tensor x_hat =
          need[1] ? restore_input(p, saved[1], saved[2]) : grad_out.new_empty({1}).expand(p.shape);
      const std::vector<int64_t> bias_sizes = {bias_size.isNone() ? 0 : bias_size.toInt()};
      auto [grad_x, grad_w, grad_b] = at::convolution_backward(
          grad_out, x_hat, w, bias_size.isNone() ? at::OptionalIntArrayRef() : at::OptionalIntArrayRef(bias_sizes),
          ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["transposed"].toBool(),
          ctx->saved_data["out_padding"].toIntVector(), ctx->saved_data["groups"].toInt(), need);
      if (need[1] && !cast.isNone()) grad_w = grad_w.to(weight.scalar_type());
      variable_list grads(17);  // one per argument of forward
      grads[0] = grad_x, grads[1] = grad_w, grads[2] = need[2] ? grad_b : at::Tensor();
      return grads;
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs(variable_list out) {
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_dropit(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& index, double gamma, int64_t chunk,
    bool bitmap, int64_t memory_order, std::optional<int64_t> seed,
    std::optional<at::ScalarType> cast) {
  return outputs(DropITLinearBackward::apply(x, weight, bias, values, index, gamma, chunk, bitmap, memory_order,
                                             seed, cast));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_dropit(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& index, double gamma, int64_t chunk,
    bool bitmap, int64_t memory_order, std::optional<int64_t> seed,
    std::optional<at::ScalarType> cast, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool transposed, at::IntArrayRef output_padding, int64_t groups) {
  return outputs(DropITConvBackward::apply(x, weight, bias, values, index, gamma, chunk, bitmap, memory_order, seed,
                                           cast, stride, padding, dilation, transposed, output_padding,
                                           groups));
}

}  // namespace dropit

// Autograd kernels only: dropit_cuda.functional calls these ops in eager mode, with a weight that
// requires grad and autograd on (its Python Functions serve every other case). The input is kept
// as `values` and `index` say: both given, a pack of it; `values` alone, the input itself; neither,
// packed here in its memory order (0 contiguous, 1 channels_last, 2 channels_last_3d), with the
// random strategy's key where `seed` is given, and returned beside the output (for the forward's
// pack cache; empty tensors where the input was given).
TORCH_LIBRARY_FRAGMENT(dropit_cuda, m) {
  m.def("linear_dropit(Tensor x, Tensor weight, Tensor? bias, Tensor? values, Tensor? index, float gamma, "
        "int chunk, bool bitmap, int memory_order, int? seed, ScalarType? cast) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("conv_dropit(Tensor x, Tensor weight, Tensor? bias, Tensor? values, Tensor? index, float gamma, "
        "int chunk, bool bitmap, int memory_order, int? seed, ScalarType? cast, int[] stride, "
        "int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dropit_cuda, Autograd, m) {
  m.impl("linear_dropit", &dropit::linear_dropit);
  m.impl("conv_dropit", &dropit::conv_dropit);
}
