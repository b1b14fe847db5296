"""DropIT versions of the weighted products: ``F.linear``, ``F.conv*d`` and ``F.conv_transpose*d``.

The forward output is exactly ``torch.nn.functional``'s. What differs is the cache: instead of the
input, the autograd function saves (through ``ctx.save_for_backward``) its compressed form, as
chosen by the strategy (see :mod:`dropit_cuda.strategies`), and the backward pass computes the
weight gradient from the unpacked copy, in which the dropped elements are zero. The input and bias
gradients are computed the way autograd computes them for the plain op (the same kernels on the
same operands), so they are exact, and at ``gamma = 0`` every gradient equals the plain op's bit for
bit. When the weight does not require grad nothing of the input is cached.

Under ``torch.autocast`` the input and bias are cast the way autocast casts them, and the weight is
cast inside the function: its low-precision copy is not kept for backward (the backward pass casts
the weight again, which gives the same bits), so a DropIT layer keeps neither the dense input nor
a weight copy alive.

DTensor inputs and weights (tensor and sequence parallelism) run torch's DTensor ops; what is
packed is each rank's local input (see :mod:`dropit_cuda.dtensor`).

These functions support a single backward pass (``retain_graph=True`` allows repeating it);
double backward (``create_graph=True``) raises a RuntimeError.

The products of a model converted by :func:`dropit_cuda.convert` are routed to
:func:`linear_with` / :func:`conv_with` (also used for ``addmm``/``mm``/``matmul`` against a
weight: ``x @ W`` is ``linear(x, W.t())``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import dtensor, strategies
from .ops import dense_input
from .settings import DEFAULT_CHUNK, DEFAULT_GAMMA, DEFAULT_STRATEGY, Settings

__all__ = [
    "conv",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "conv_with",
    "linear",
    "linear_with",
]

_IntOrTuple = Union[int, Sequence[int]]
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

_DOUBLE_BACKWARD = (
    "DropIT layers do not support double backward (create_graph=True): their backward pass "
    "uses a compressed copy of the input and is not itself differentiable"
)


# --- shared pieces ------------------------------------------------------------------------------


def _record(layer: Any, op: str, x: torch.Tensor, cached: Optional[strategies.Cached]) -> None:
    """Tells ``layer`` (the conversion's record of this weight, if any) what was cached."""
    if layer is not None and not torch.compiler.is_compiling():
        layer.record(op, x.nbytes, 0 if cached is None else cached.nbytes)


def _needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cast_dtype(*tensors: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype autocast casts a linear/conv op's operands to here, or None when it is off."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """``t`` as autocast casts it for a linear/conv op (floating, not float64, on its device)."""
    if dtype is None or t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    if not torch.is_autocast_enabled(t.device.type):
        return t
    return t.to(dtype)


def _save_input(ctx, x: torch.Tensor, weight: torch.Tensor, settings: Settings, channel_dim: int,
                layer: Any, op: str) -> None:
    """Saves the weight (the master copy, never autocast's) and, when the weight gradient is
    needed, the compressed input (of a DTensor, this rank's local tensor: see
    :mod:`dropit_cuda.dtensor`)."""
    cached = None
    x_local, ctx.x_layout = dtensor.local(x)
    if ctx.needs_input_grad[1]:
        x_local = dense_input(x_local)
        cached = strategies.get(settings.strategy).cache(x_local, settings, channel_dim)
        ctx.cache_meta = cached.with_tensors(())
        ctx.save_for_backward(weight, *cached.tensors)
    else:
        ctx.cache_meta = None
        ctx.save_for_backward(weight)
    _record(layer, op, x_local, cached)
    _keep_exact_input(ctx, x, layer, channel_dim)


def _restore(ctx, cast: Optional[torch.dtype]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight as the forward used it and the unpacked input (None when not cached), a
    DTensor laid out as the input was where the input was one."""
    weight, *tensors = ctx.saved_tensors
    x_hat = None
    if ctx.cache_meta is not None:
        x_hat = dtensor.rewrap(ctx.x_layout, ctx.cache_meta.with_tensors(tensors).unpack())
    return (weight if cast is None else weight.to(cast)), x_hat


# The hook of dc.fidelity: while it records, ``layer.watch`` is set (see dropit_cuda/fidelity.py),
# and the functions also keep the dense input to compute the exact weight gradient beside the
# DropIT one. ``weight_grad(input)`` is the very code that computes the DropIT gradient from the
# unpacked copy, so at gamma = 0 both are equal bit for bit.


def _keep_exact_input(ctx, x: torch.Tensor, layer: Any, channel_dim: int) -> None:
    watch = getattr(layer, "watch", None)
    ctx.watch = None
    if watch is None or not ctx.needs_input_grad[1] or torch.compiler.is_compiling():
        return
    # a reference, not a copy (memory as in the plain model); its version tells if it changed
    ctx.watch, ctx.exact_input, ctx.exact_version = watch, x.detach(), x._version
    watch.saw(dtensor.local_of(x), channel_dim)


def _give_exact_grad(ctx, grad_w: torch.Tensor, weight_grad: Callable[[torch.Tensor], torch.Tensor]) -> None:
    if ctx.watch is None:
        return
    x = ctx.exact_input
    if x._version != ctx.exact_version:
        raise RuntimeError(
            "dropit_cuda.fidelity: the input of a DropIT layer was modified in place after the "
            "layer used it, so its exact weight gradient cannot be computed (a plain model would "
            "fail the same way)")
    # this rank's gradients (of a DTensor weight: its shard, or its share of a partial sum)
    ctx.watch.add(dtensor.local_of(grad_w), dtensor.local_of(weight_grad(x)))
    ctx.exact_input = None


def _sum_to(grad: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Autograd's reduction of a broadcast operand's gradient (``at::sum_to``), mirrored so that
    bias gradients match the plain op's bit for bit."""
    shape = tuple(shape)
    if not shape:
        return grad.sum()
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [
        i for i in range(lead, grad.dim()) if shape[i - lead] == 1 and grad.shape[i] != 1
    ]
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad.view(shape) if lead > 0 else grad


def _column_major(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    return strides[0] == 1 and strides[1] == sizes[0]


# --- linear (and addmm / mm / matmul against a weight) ------------------------------------------


@dataclass(frozen=True)
class _MatmulPlan:
    """How ATen's ``linear`` computes ``x @ w.t() + b`` for these operands, which decides how
    autograd differentiates it: ``mat1`` is ``x`` as a matrix (its sizes and strides), and the
    bias is either fused into ``addmm`` (its gradient reduced from the 2-D gradient) or added to
    the N-D ``matmul`` output (reduced from the N-D gradient)."""

    x_shape: tuple
    mat1_sizes: tuple
    mat1_strides: tuple
    w_sizes: tuple
    w_strides: tuple
    bias_shape: Optional[tuple]
    bias_fused: bool


def _plan_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> _MatmulPlan:
    nd = x.dim()
    if nd == 2:
        mat1_sizes, mat1_strides = tuple(x.shape), tuple(x.stride())
    else:  # folded by reshape: a view of a contiguous x, else a fresh row-major copy
        rows = 1
        for s in x.shape[:-1]:
            rows *= s
        mat1_sizes = (rows, x.shape[-1])
        mat1_strides = (x.shape[-1], 1)
    bias_fused = b is not None and (nd == 2 or (x.is_contiguous() and (nd == 3 or b.dim() == 1)))
    return _MatmulPlan(tuple(x.shape), mat1_sizes, mat1_strides, tuple(w.shape), tuple(w.stride()),
                       None if b is None else tuple(b.shape), bias_fused)


class _DropITLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, settings, cast, layer, op):
        w = weight if cast is None else weight.to(cast)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x, w, bias)
        ctx.plan = _plan_linear(x, w, bias)
        ctx.cast = cast
        _save_input(ctx, x, weight, settings, -1, layer, op)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        plan: _MatmulPlan = ctx.plan
        w, x_hat = _restore(ctx, ctx.cast)
        grad_x = grad_w = grad_b = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1]) if grad_out.dim() != 2 else grad_out
        # ATen's mm_mat1_backward / mm_mat2_backward with mat2 = w.t()
        if ctx.needs_input_grad[0]:
            if _column_major(plan.mat1_sizes, plan.mat1_strides):
                grad_x = w.t().mm(g2.t()).t()
            else:
                grad_x = g2.mm(w)
            grad_x = grad_x.view(plan.x_shape) if len(plan.x_shape) != 2 else grad_x
        if ctx.needs_input_grad[1]:
            def weight_grad(inp: torch.Tensor) -> torch.Tensor:
                mat1 = inp if inp.dim() == 2 else inp.reshape(plan.mat1_sizes)
                if _column_major(plan.mat1_sizes, plan.mat1_strides) and mat1.stride() != plan.mat1_strides:
                    mat1 = mat1.t().contiguous().t()  # read column-major, as ATen's product read x
                if _column_major(plan.w_sizes[::-1], plan.w_strides[::-1]):
                    grad = g2.t().mm(mat1)
                else:
                    grad = mat1.t().mm(g2).t()
                return grad if ctx.cast is None else grad.to(ctx.saved_tensors[0].dtype)

            grad_w = weight_grad(x_hat)
            _give_exact_grad(ctx, grad_w, weight_grad)
        if plan.bias_shape is not None and ctx.needs_input_grad[2]:
            grad_b = _sum_to(g2 if plan.bias_fused else grad_out, plan.bias_shape)
        return grad_x, grad_w, grad_b, None, None, None, None


def linear_with(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], settings: Settings,
                layer: Any = None, op: str = "linear") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` caching the input as ``settings`` say (settings already
    validated; ``layer`` receives what was cached)."""
    cast = _cast_dtype(x, weight, bias)
    x, bias = _cast(x, cast), _cast(bias, cast)
    w_cast = cast if weight.is_floating_point() and weight.dtype not in (torch.float64, cast) else None
    if not _needs_autograd(x, weight, bias):
        return F.linear(x, weight, bias)
    return _DropITLinear.apply(x, weight, bias, settings, w_cast, layer, op)


def linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    gamma: float = DEFAULT_GAMMA,
    strategy: str = DEFAULT_STRATEGY,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` that caches a DropIT-compressed input for backward.

    Args:
        input: ``(*, in_features)``, any rank.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        gamma: dropping rate in ``[0, 1)``.
        strategy: one of :data:`dropit_cuda.strategies.STRATEGIES`. The channel strategies drop
            whole features (the last dimension of ``input``).
        chunk: chunk size of the chunked strategies, ``[1, 65536]``.
    """
    settings = Settings(gamma, strategy, chunk)
    _check_tensors(input=input, weight=weight)
    return linear_with(input, weight, bias, settings)


# --- convolutions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvParams:
    """The arguments of ``aten.convolution`` (what ``F.conv*d`` and ``F.conv_transpose*d`` call)."""

    stride: tuple
    padding: tuple
    dilation: tuple
    transposed: bool
    output_padding: tuple
    groups: int

    def args(self) -> tuple:
        return (list(self.stride), list(self.padding), list(self.dilation), self.transposed,
                list(self.output_padding), self.groups)


class _DropITConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, params, settings, cast, layer, op):
        w = weight if cast is None else weight.to(cast)
        with torch.autocast(x.device.type, enabled=False):
            out = torch.ops.aten.convolution(x, w, bias, *params.args())
        ctx.params = params
        ctx.cast = cast
        ctx.x_shape = tuple(x.shape)
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        _save_input(ctx, x, weight, settings, 1, layer, op)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        w, x_hat = _restore(ctx, ctx.cast)
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        if x_hat is None:  # the input gradient needs its shape only
            x_hat = dtensor.rewrap(ctx.x_layout, dtensor.local_of(grad_out).new_empty(1).expand(
                ctx.x_shape if ctx.x_layout is None else ctx.x_layout.local_shape))
        def grads(inp: torch.Tensor) -> tuple:
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out, inp, w, ctx.bias_sizes, *ctx.params.args(), need)
            if need[1] and ctx.cast is not None:
                grad_w = grad_w.to(ctx.saved_tensors[0].dtype)
            return grad_x, grad_w, grad_b

        grad_x, grad_w, grad_b = grads(x_hat)
        if need[1]:  # the same call (same mask), so that gamma = 0 gives the same bits
            _give_exact_grad(ctx, grad_w, lambda inp: grads(inp)[1])
        return grad_x, grad_w, grad_b if need[2] else None, None, None, None, None, None


def _tuple(value: _IntOrTuple, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (tuple, list, torch.Size)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        if len(value) == n:
            return tuple(value)
        if len(value) == 1:
            return tuple(value) * n
    raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")


def conv_with(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: _IntOrTuple,
              padding: Union[str, _IntOrTuple], dilation: _IntOrTuple, groups: int, settings: Settings,
              transposed: bool = False, output_padding: _IntOrTuple = 0, layer: Any = None,
              op: Optional[str] = None) -> torch.Tensor:
    """``F.conv{n}d`` (``F.conv_transpose{n}d`` with ``transposed``) caching the input as ``settings``
    say; ``n`` comes from ``weight`` (3-D, 4-D or 5-D). Arguments as in torch, unbatched inputs and
    ``padding="same"/"valid"`` included."""
    nd = weight.dim() - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"weight must be 3-D, 4-D or 5-D, got {weight.dim()}-D")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride = _tuple(stride, nd, "stride")
    dilation = _tuple(dilation, nd, "dilation")
    if x.dim() not in (nd + 1, nd + 2):
        raise RuntimeError(  # the type F.conv*d raises
            f"input must be {nd + 1}-D (unbatched) or {nd + 2}-D (batched) for a {nd}-D convolution, "
            f"got {x.dim()}-D"
        )
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    if isinstance(padding, str):
        if transposed:
            raise ValueError(f"padding must be an int or a tuple of {nd} ints for a transposed convolution")
        if padding == "valid":
            padding = (0,) * nd
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(nd)]
            padding = tuple(t // 2 for t in total)
            extra = [t - 2 * (t // 2) for t in total]
            if any(extra):  # an even kernel: the extra element goes on the right, as in ATen
                x = F.pad(x, [p for e in reversed(extra) for p in (0, e)])
        else:
            raise ValueError(f"padding must be 'same', 'valid', an int or a tuple of {nd} ints, got {padding!r}")
    else:
        padding = _tuple(padding, nd, "padding")
    output_padding = _tuple(output_padding, nd, "output_padding") if transposed else (0,) * nd
    params = ConvParams(stride, padding, dilation, transposed, output_padding, groups)

    cast = _cast_dtype(x, weight, bias)
    x, bias = _cast(x, cast), _cast(bias, cast)
    w_cast = cast if weight.is_floating_point() and weight.dtype not in (torch.float64, cast) else None
    if _needs_autograd(x, weight, bias):
        op = op or f"conv{'_transpose' if transposed else ''}{nd}d"
        out = _DropITConv.apply(x, weight, bias, params, settings, w_cast, layer, op)
    else:
        out = torch.ops.aten.convolution(x, _cast(weight, cast), bias, *params.args())
    return out.squeeze(0) if unbatched else out


# --- padding that keeps no input ---------------------------------------------------------------

_PAD_BACKWARD = {
    "reflect": {1: torch.ops.aten.reflection_pad1d_backward, 2: torch.ops.aten.reflection_pad2d_backward,
                3: torch.ops.aten.reflection_pad3d_backward},
    "replicate": {1: torch.ops.aten.replication_pad1d_backward, 2: torch.ops.aten.replication_pad2d_backward,
                  3: torch.ops.aten.replication_pad3d_backward},
}


class _ShapeOnlyPad(torch.autograd.Function):
    """``F.pad`` in "reflect"/"replicate" mode whose backward keeps the input's shape only (autograd's
    own node keeps the whole input, which would keep a DropIT conv's dense input alive)."""

    @staticmethod
    def forward(ctx, x, pads, mode):
        ctx.x_shape, ctx.pads, ctx.mode = tuple(x.shape), list(pads), mode
        return F.pad(x, pads, mode=mode)

    @staticmethod
    def backward(ctx, grad):
        nd = len(ctx.pads) // 2
        dummy = grad.new_empty(1).expand(ctx.x_shape)
        return _PAD_BACKWARD[ctx.mode][nd](grad, dummy, ctx.pads), None, None


def pad_keeping_shape(x: torch.Tensor, pads: Sequence[int], mode: str) -> Optional[torch.Tensor]:
    """``F.pad(x, pads, mode)`` through :class:`_ShapeOnlyPad` where that applies (reflect/replicate
    of 1-3 spatial dims, autograd on), else None."""
    if mode not in _PAD_BACKWARD or len(pads) % 2 or not 1 <= len(pads) // 2 <= 3:
        return None
    if not (torch.is_grad_enabled() and x.requires_grad) or x.dim() < len(pads) // 2 + 1:
        return None
    return _ShapeOnlyPad.apply(x, tuple(pads), mode)


# --- the public functional API -----------------------------------------------------------------


def _check_tensors(**tensors: Any) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: _IntOrTuple = 1,
    padding: Union[str, _IntOrTuple] = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    gamma: float = DEFAULT_GAMMA,
    strategy: str = DEFAULT_STRATEGY,
    chunk: int = DEFAULT_CHUNK,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """DropIT convolution of any dimension (taken from ``weight``: 3-D, 4-D or 5-D).

    Same arguments and output as ``F.conv1d/2d/3d`` plus ``padding_mode`` (as in ``nn.Conv*``:
    a mode other than ``"zeros"`` pads the input with ``F.pad`` first, and the padded input is
    what gets cached; "reflect" and "replicate" pads keep only the input's shape for backward, so
    the dense input is not kept alive) and the DropIT settings (see :func:`linear`; the channel
    strategies drop whole input channels, dimension 1).
    """
    settings = Settings(gamma, strategy, chunk)
    _check_tensors(input=input, weight=weight)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if padding_mode != "zeros":
        nd = weight.dim() - 2
        if isinstance(padding, str):
            if padding == "same":
                total = [_tuple(dilation, nd, "dilation")[i] * (weight.shape[2 + i] - 1) for i in range(nd)]
                pads = [(t // 2, t - t // 2) for t in total]
            elif padding == "valid":
                pads = [(0, 0)] * nd
            else:
                raise ValueError(f"padding must be 'same', 'valid', an int or a tuple of {nd} ints, got {padding!r}")
        else:
            pads = [(p, p) for p in _tuple(padding, nd, "padding")]
        flat = [p for lr in reversed(pads) for p in lr]
        padded = pad_keeping_shape(input, flat, padding_mode)
        input = padded if padded is not None else F.pad(input, flat, mode=padding_mode)
        padding = 0
    return conv_with(input, weight, bias, stride, padding, dilation, groups, settings)


def _conv_nd(nd: int, transposed: bool):
    if transposed:
        def fn(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               stride: _IntOrTuple = 1, padding: _IntOrTuple = 0, output_padding: _IntOrTuple = 0,
               groups: int = 1, dilation: _IntOrTuple = 1, gamma: float = DEFAULT_GAMMA,
               strategy: str = DEFAULT_STRATEGY, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
            settings = Settings(gamma, strategy, chunk)
            _check_tensors(input=input, weight=weight)
            if weight.dim() != nd + 2:
                raise ValueError(f"weight must be {nd + 2}-D for conv_transpose{nd}d, got {weight.dim()}-D")
            return conv_with(input, weight, bias, stride, padding, dilation, groups, settings,
                             transposed=True, output_padding=output_padding)
        name = f"conv_transpose{nd}d"
    else:
        def fn(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               stride: _IntOrTuple = 1, padding: Union[str, _IntOrTuple] = 0, dilation: _IntOrTuple = 1,
               groups: int = 1, gamma: float = DEFAULT_GAMMA, strategy: str = DEFAULT_STRATEGY,
               chunk: int = DEFAULT_CHUNK, padding_mode: str = "zeros") -> torch.Tensor:
            if isinstance(weight, torch.Tensor) and weight.dim() != nd + 2:
                raise ValueError(f"weight must be {nd + 2}-D for conv{nd}d, got {weight.dim()}-D")
            return conv(input, weight, bias, stride, padding, dilation, groups, gamma, strategy, chunk,
                        padding_mode)
        name = f"conv{nd}d"
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"``F.{name}`` that caches a DropIT-compressed input for backward; see :func:`conv`."
    return fn


conv1d = _conv_nd(1, False)
conv2d = _conv_nd(2, False)
conv3d = _conv_nd(3, False)
conv_transpose1d = _conv_nd(1, True)
conv_transpose2d = _conv_nd(2, True)
conv_transpose3d = _conv_nd(3, True)
