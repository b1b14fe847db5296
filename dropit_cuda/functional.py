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

These functions support a single backward pass (``retain_graph=True`` allows repeating it).
Under ``create_graph=True`` (and ``torch.func.grad``, which uses it) the gradients are computed as
usual; differentiating them again raises a RuntimeError naming DropIT. Forward-mode AD
(``torch.autograd.forward_ad``, ``torch.func.jvp``) is exact: the tangent needs the dense operands
only during the forward. ``torch.func.vmap`` raises: a cache packed over the whole batch has no
per-sample meaning.

The products of a model converted by :func:`dropit_cuda.convert` are routed to
:func:`linear_with` / :func:`conv_with` (also used for ``addmm``/``mm``/``matmul`` against a
weight: ``x @ W`` is ``linear(x, W.t())``).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _native, dtensor, ops, pack_cache, strategies
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
    b"DropIT layers do not support double backward: their backward pass uses a compressed copy "
    b"of the input and is not itself differentiable (dropit_cuda.revert(model), or "
    b"convert(..., exclude=[...]) for the layers a double backward goes through)"
)


def _differentiating_transforms() -> int:
    """How many ``torch.func`` grad/jvp transforms are active on this thread."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return sum(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


def _once_differentiable(backward: Callable) -> Callable:
    """Runs ``backward`` without recording a graph. Under ``create_graph=True`` (which
    ``torch.func.grad`` always uses) the gradients it returns are valid; only differentiating
    them again raises, naming DropIT (torch's ``once_differentiable``, with our message)."""

    def wrapper(ctx, *grads):
        if torch.compiler.is_compiling():  # a traced backward is differentiated by AOTAutograd's rules
            return backward(ctx, *grads)
        if not torch.is_grad_enabled() and torch._C._functorch.peek_interpreter_stack() is None:
            return backward(ctx, *grads)  # no graph to record, nothing to guard (the common case)
        with torch.no_grad():
            out = backward(ctx, *grads)
        if torch._C._functorch.peek_interpreter_stack() is not None:
            # torch.func: tensors of a transform cannot be marked; a second derivative is
            # possible only if another grad/jvp transform encloses this one
            if _differentiating_transforms() > 1:
                raise RuntimeError(_DOUBLE_BACKWARD.decode())
            return out
        if not (torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads)):
            return out
        tensors = [i for i, t in enumerate(out) if isinstance(t, torch.Tensor)]
        guarded = torch._C._functions.DelayedError(_DOUBLE_BACKWARD, len(tensors))(
            *[out[i].detach().requires_grad_() for i in tensors])
        out = list(out)
        for i, t in zip(tensors, guarded if isinstance(guarded, tuple) else (guarded,)):
            out[i] = t
        return tuple(out)

    wrapper.__name__, wrapper.__doc__ = backward.__name__, backward.__doc__
    return wrapper


# --- shared pieces ------------------------------------------------------------------------------


def _eager_twin(cls: type) -> type:
    """``cls`` (``forward`` + ``setup_context``) as a classic ``forward(ctx, ...)`` Function with
    the same code, for plain eager calls: torch binds the arguments of a ``setup_context``
    Function with ``inspect.signature`` on every call (about 100 microseconds of host time), a
    classic one's not. ``torch.func`` transforms and ``torch.compile`` need the original."""

    def forward(ctx, *args):
        out = cls.forward(*args)
        cls.setup_context(ctx, args, out)
        return out

    # the same name: its graph nodes read as the original's (_DropITLinearBackward ...)
    return type(cls.__name__, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(cls.backward),
                 "__doc__": _eager_twin.__doc__})


def _function(cls: type, jvp_cls: type, eager_cls: type) -> type:
    """Which of a product's autograd Functions this call takes (see :func:`_eager_twin`)."""
    if _forward_ad():
        return jvp_cls
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return cls
    return eager_cls


# --- the native path of plain eager calls -------------------------------------------------------

#: The ops of csrc/packed_products.cpp as the Python module binds them (unboxed: cheaper to call
#: than ``torch.ops.dropit_cuda.*``).
_PRODUCTS = _native.module()
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CHUNKED = {name: s for name, s in strategies.REGISTRY.items() if s.chunked}


def _native_strategy(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], settings: Settings,
                     layer: Any) -> Optional[strategies.Strategy]:
    """The strategy of this product when it takes a native autograd node
    (``csrc/packed_products.cpp``), else None: an eager call on plain tensors of the dtypes the
    kernels take, with a chunked strategy, outside forward AD, ``torch.func``, ``torch.compile``
    and compiled autograd, without the fidelity hook. The node computes what this module's
    Functions compute, with the same ATen calls, in one native call per direction; every other
    case takes the Functions. (Runs on every eager product: the cheap, decisive tests first.)"""
    strategy = _CHUNKED.get(settings.strategy)
    if (strategy is None or type(x) is not torch.Tensor or type(weight) not in _PLAIN
            or (bias is not None and type(bias) not in _PLAIN) or x.dtype not in _NATIVE_DTYPES or x.is_nested
            or (layer is not None and layer.watch is not None) or _forward_ad() or torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None or _compiled_autograd()):
        return None
    return strategy


def _compiled_autograd() -> bool:
    """Whether compiled autograd is on (``torch._dynamo.compiled_autograd``): it traces each node
    of the backward, which the Python Functions support and the native nodes do not."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    return module is not None and bool(getattr(module, "compiled_autograd_enabled", False))


def _native_product(product: Callable, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    settings: Settings, strategy: strategies.Strategy, cast: Optional[torch.dtype], layer: Any,
                    op: str, channel_dim: int, *args: Any) -> torch.Tensor:
    """``product`` (``linear_dropit`` or ``conv_dropit`` of :data:`_PRODUCTS`; ``args``: the
    convolution's) keeping the input as :func:`save_packed` keeps it: as it is where the layer says
    it is kept alive anyway, else packed once per forward (the pack cache's copy, or packed by the
    op and handed to the cache)."""
    if layer is not None and layer.keep_input:
        out = product(x, weight, bias, x, None, 0.0, 1, False, 0, None, cast, *args)[0]
        layer.record(op, x.nbytes, 0, x)
        return out
    where, shared = pack_cache.find_eager(x, settings, channel_dim)
    if shared is not None:
        shared = strategies.as_native(shared)  # (a Python Function may have made it)
        out = product(x, weight, bias, shared.values, shared.index, shared.gamma, shared.chunk, shared.bitmap,
                      shared.memory_order, None, cast, *args)[0]
        if layer is not None:
            layer.record(op, 0, 0, x)
        return out
    gamma, chunk = settings.gamma, settings.chunk
    bitmap = ops.auto_index(x.numel(), chunk, gamma) == "bitmap"
    order = 0 if x.is_contiguous() else ops.MEMORY_ORDERS.index(ops.memory_format_of(x))
    out, values, index = product(x, weight, bias, None, None, gamma, chunk, bitmap, order, strategy.seed(), cast,
                                 *args)
    if where is not None:
        pack_cache.keep(where, x, strategies.NativePack(strategy, values, index, bitmap, order, x.shape, gamma,
                                                        chunk))
    if layer is not None:
        layer.record(op, x.nbytes, values.nbytes + index.nbytes, x)
    return out


def _no_autocast(device_type: str):
    """Autocast off for the product itself (its operands are cast already); a no-op context where
    autocast is off anyway, which costs nothing to enter."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _record(layer: Any, op: str, x: torch.Tensor, cached: Optional[strategies.Cached], shared: bool = False) -> None:
    """Tells ``layer`` (the conversion's record of this weight, if any) what was cached; a pack
    shared with an earlier product of the forward adds no bytes."""
    if layer is not None and not torch.compiler.is_compiling():
        layer.record(op, 0 if shared else x.nbytes, 0 if cached is None or shared else cached.nbytes, x)


def _caches(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether DropIT has anything to cache: a weight gradient to compute, from a dense input it
    can pack. Everywhere else the product is torch's own call (exact by construction on every
    machine, whatever BLAS kernel it picks): a frozen weight, no autograd, a sparse input."""
    # (nested inputs go on: dense_input refuses them by name)
    return torch.is_grad_enabled() and weight.requires_grad and (x.layout == torch.strided or x.is_nested)


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
    out = t.to(dtype)
    pack_cache.alias(t, out)  # the casts of one tensor share one pack
    return out


def weight_operand(w: torch.Tensor, cast: Optional[torch.dtype]) -> torch.Tensor:
    """The weight (or its tangent) as the product reads it: cast as autocast casts it."""
    return w if cast is None else w.to(cast)


def _autocast_operands(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.dtype]]:
    """``x`` and ``bias`` as autocast casts them for a linear/conv op, and the dtype the weight is
    cast to inside the autograd function (None: used as it is)."""
    if not torch._C._is_any_autocast_enabled():  # the common case, checked cheaply
        return x, bias, None
    cast = _cast_dtype(x, weight, bias)
    if cast is None:  # autocast off on this device: nothing to cast
        return x, bias, None
    x, bias = _cast(x, cast), _cast(bias, cast)
    return x, bias, (cast if weight.is_floating_point() and weight.dtype not in (torch.float64, cast) else None)


def _save_input(ctx, x: torch.Tensor, weight: torch.Tensor, settings: Settings, channel_dim: int,
                layer: Any, op: str) -> None:
    """Saves the weight (the master copy, never autocast's) and, when the weight gradient is
    needed, the compressed input (called from ``setup_context``; of a DTensor, this rank's local
    tensor: see :mod:`dropit_cuda.dtensor`)."""
    ctx.weight_dtype = weight.dtype
    save_packed(ctx, x, (weight,), settings, channel_dim, layer, op, ctx.needs_input_grad[1])


def save_packed(ctx, x: torch.Tensor, kept: tuple, settings: Settings, channel_dim: int, layer: Any, op: str,
                need_weight_grad: bool) -> None:
    """Saves ``kept`` (tensors backward needs as they are: the weight, indices) and, when the
    weight gradient is needed, ``x`` packed (of a DTensor, this rank's local tensor; one packed
    copy per distinct input in a converted model's forward: see :mod:`dropit_cuda.pack_cache`);
    :func:`restore_packed` gives both back."""
    cached, shared = None, False
    x_local, ctx.x_layout = dtensor.local(x)
    ctx.raw_input = need_weight_grad and getattr(layer, "keep_input", False)
    if ctx.raw_input:  # kept alive elsewhere anyway: saved as it is, no copy (see routing._KeptProbe)
        ctx.cache_meta = None
        ctx.save_for_backward(*kept, x)
    elif need_weight_grad:
        x_local = dense_input(x_local)
        cached, shared = pack_cache.cache(x_local, settings, channel_dim)
        ctx.cache_meta = cached.with_tensors(())
        ctx.save_for_backward(*kept, *cached.tensors)
    else:
        ctx.cache_meta = None
        ctx.save_for_backward(*kept)
    ctx.n_kept = len(kept)
    _record(layer, op, x_local, cached, shared)
    _keep_exact_input(ctx, x, layer, channel_dim, need_weight_grad)


def restore_packed(ctx) -> tuple[tuple, Optional[torch.Tensor]]:
    """What :func:`save_packed` kept, and the unpacked input (None when not cached), a DTensor
    laid out as the input was where the input was one.

    ``ctx.saved_tensors`` is read here and nowhere else, once per backward: a second read fails
    under non-reentrant checkpointing and any ``saved_tensors_hooks`` whose unpack may run once."""
    saved = ctx.saved_tensors
    kept, tensors = saved[:ctx.n_kept], saved[ctx.n_kept:]
    if ctx.raw_input:
        return tuple(kept), tensors[0]
    x_hat = None
    if ctx.cache_meta is not None:
        x_hat = dtensor.rewrap(ctx.x_layout, ctx.cache_meta.restore(tensors))
    return tuple(kept), x_hat


def _restore(ctx, cast: Optional[torch.dtype]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight as the forward used it and the unpacked input (None when not cached)."""
    (weight,), x_hat = restore_packed(ctx)
    return weight_operand(weight, cast), x_hat


def _forward_ad() -> bool:
    """Whether forward-mode AD is on (``torch.autograd.forward_ad`` or ``torch.func.jvp``)."""
    return torch.autograd.forward_ad._current_level >= 0


def _save_for_jvp(ctx, x: torch.Tensor, weight: torch.Tensor, output: torch.Tensor) -> None:
    """Forward AD needs the dense operands, and only during the forward itself: ``jvp`` runs right
    after ``setup_context``, so nothing is kept for the backward pass."""
    if _forward_ad():
        ctx.save_for_forward(x, weight)
        ctx.out_shape = tuple(output.shape)


def _add_bias_tangent(ctx, out_t: Optional[torch.Tensor], bias_t: Optional[torch.Tensor],
                      channel_dim: int) -> Optional[torch.Tensor]:
    """The output tangent plus the bias tangent broadcast along ``channel_dim`` of the output."""
    if bias_t is None:
        return out_t
    shape = [1] * len(ctx.out_shape)
    shape[channel_dim] = -1
    bias_t = bias_t.reshape(shape)
    return bias_t.expand(ctx.out_shape) if out_t is None else out_t + bias_t


def _unsupported_vmap(info, in_dims, *args):
    raise RuntimeError(
        "dropit_cuda: torch.func.vmap is not supported through a DropIT product (its cache is "
        "packed per chunk of the whole batch, so per-sample gradients have no DropIT meaning). "
        "Run vmap on the plain model: dropit_cuda.revert(model), or leave these layers out with "
        "convert(..., exclude=[...])")


# The hook of dc.fidelity: while it records, ``layer.watch`` is set (see dropit_cuda/fidelity.py),
# and the functions also keep the dense input to compute the exact weight gradient beside the
# DropIT one. ``weight_grad(input)`` is the very code that computes the DropIT gradient from the
# unpacked copy, so at gamma = 0 both are equal bit for bit.


def _keep_exact_input(ctx, x: torch.Tensor, layer: Any, channel_dim: int, need_weight_grad: bool) -> None:
    watch = getattr(layer, "watch", None)
    ctx.watch = None
    if watch is None or not need_weight_grad or torch.compiler.is_compiling():
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
    def forward(x, weight, bias, settings, cast, layer, op):
        w = weight_operand(weight, cast)
        with _no_autocast(x.device.type):
            return F.linear(x, w, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, settings, cast, layer, op = inputs
        ctx.plan = _plan_linear(x, weight, bias)
        ctx.cast = cast
        _save_input(ctx, x, weight, settings, -1, layer, op)
        _save_for_jvp(ctx, x, weight, output)

    vmap = staticmethod(_unsupported_vmap)

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_out):
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
                return grad if ctx.cast is None else grad.to(ctx.weight_dtype)

            grad_w = weight_grad(x_hat)
            _give_exact_grad(ctx, grad_w, weight_grad)
        if plan.bias_shape is not None and ctx.needs_input_grad[2]:
            grad_b = _sum_to(g2 if plan.bias_fused else grad_out, plan.bias_shape)
        return grad_x, grad_w, grad_b, None, None, None, None


class _Recast:
    """A saved low-precision copy of a frozen weight, kept as the master weight and the view."""

    __slots__ = ("weight", "dtype", "size", "stride", "offset")

    def __init__(self, weight: torch.Tensor, copy: torch.Tensor) -> None:
        self.weight, self.dtype = weight, copy.dtype
        self.size, self.stride, self.offset = copy.size(), copy.stride(), copy.storage_offset()

    def tensor(self) -> torch.Tensor:
        # the same cast of the same weight gives the same bits
        return self.weight.to(self.dtype).as_strided(self.size, self.stride, self.offset)


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """torch's own ``F.linear``. Under autocast, with a weight that needs no gradient (LoRA's base
    weights), its low-precision copy is not kept for backward: the weight is cast here, as autocast
    casts it (autocast leaves a tensor already in its dtype as it is), and the one tensor the
    product saves, that copy, is cast again from the master weight when backward needs it."""
    cast = _cast_dtype(x, weight, bias)
    if (cast is None or weight.requires_grad or not x.requires_grad or not torch.is_grad_enabled()
            or not weight.is_floating_point() or weight.dtype in (torch.float64, cast)
            or torch.compiler.is_compiling()):
        return F.linear(x, weight, bias)
    low = weight.to(cast)
    if type(low) is not torch.Tensor:  # a tensor subclass (DTensor...): its storage is not ours to read
        return F.linear(x, low, bias)
    storage = low.untyped_storage().data_ptr()

    def pack(t: torch.Tensor) -> Any:
        if (type(t) is torch.Tensor and t.dtype == cast and t.device == low.device
                and t.untyped_storage().data_ptr() == storage):
            return _Recast(weight, t)
        return t

    def unpack(saved: Any) -> torch.Tensor:
        return saved.tensor() if isinstance(saved, _Recast) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return F.linear(x, low, bias)


class _DropITLinearJvp(_DropITLinear):
    """With forward-mode AD (dynamo cannot trace a Function that defines ``jvp``, so only forward
    AD uses this one)."""

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        x, weight = ctx.saved_for_forward
        cast = ctx.cast
        with torch.autocast(x.device.type, enabled=False):
            out_t = None if x_t is None else F.linear(x_t, weight_operand(weight, cast))
            if weight_t is not None:
                term = F.linear(x, weight_operand(weight_t, cast))
                out_t = term if out_t is None else out_t + term
        return _add_bias_tangent(ctx, out_t, bias_t, -1)


_DropITLinearEager = _eager_twin(_DropITLinear)


def linear_with(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], settings: Settings,
                layer: Any = None, op: str = "linear", transposed: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` caching the input as ``settings`` say (settings already
    validated; ``layer`` receives what was cached). With ``transposed``, ``weight`` is ``W`` of
    ``x @ W`` (``addmm``, ``mm``, ``matmul`` against a weight) and the product is
    ``F.linear(x, W.t(), bias)``; the native op takes ``W`` as it is (no transposed view and its
    autograd node)."""
    if not _caches(x, weight):
        return _torch_linear(x, weight.t() if transposed else weight, bias)
    x, bias, w_cast = _autocast_operands(x, weight, bias)
    strategy = _native_strategy(x, weight, bias, settings, layer)
    if strategy is not None:
        return _native_product(_PRODUCTS.linear_dropit, x, weight, bias, settings, strategy, w_cast, layer, op, -1,
                               transposed)
    if transposed:
        weight = weight.t()
    fn = _function(_DropITLinear, _DropITLinearJvp, _DropITLinearEager)
    return fn.apply(x, weight, bias, settings, w_cast, layer, op)


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
    settings = Settings.of(gamma, strategy, chunk)
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
    def forward(x, weight, bias, params, settings, cast, layer, op):
        w = weight_operand(weight, cast)
        with _no_autocast(x.device.type):
            return torch.ops.aten.convolution(x, w, bias, *params.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, params, settings, cast, layer, op = inputs
        ctx.params = params
        ctx.cast = cast
        ctx.x_shape = tuple(x.shape)
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        _save_input(ctx, x, weight, settings, 1, layer, op)
        _save_for_jvp(ctx, x, weight, output)

    vmap = staticmethod(_unsupported_vmap)

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_out):
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
                grad_w = grad_w.to(ctx.weight_dtype)
            return grad_x, grad_w, grad_b

        grad_x, grad_w, grad_b = grads(x_hat)
        if need[1]:  # the same call (same mask), so that gamma = 0 gives the same bits
            _give_exact_grad(ctx, grad_w, lambda inp: grads(inp)[1])
        return grad_x, grad_w, grad_b if need[2] else None, None, None, None, None, None


class _DropITConvJvp(_DropITConv):
    """With forward-mode AD (see :class:`_DropITLinearJvp`)."""

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        x, weight = ctx.saved_for_forward
        cast, args = ctx.cast, ctx.params.args()
        with torch.autocast(x.device.type, enabled=False):
            parts = []
            if x_t is not None:
                parts.append(torch.ops.aten.convolution(x_t, weight_operand(weight, cast), None, *args))
            if weight_t is not None:
                parts.append(torch.ops.aten.convolution(x, weight_operand(weight_t, cast), None, *args))
            out_t = parts[0] + parts[1] if len(parts) == 2 else (parts[0] if parts else None)
        return _add_bias_tangent(ctx, out_t, bias_t, 1)


_DropITConvEager = _eager_twin(_DropITConv)


_TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TORCH_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


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
    torch_args = (x, weight, bias, stride, padding, output_padding, groups, dilation) if transposed \
        else (x, weight, bias, stride, padding, dilation, groups)
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
    if not _caches(x, weight):  # after the checks above, so that errors do not depend on it
        return (_TORCH_CONV_TRANSPOSE if transposed else _TORCH_CONV)[nd](*torch_args)
    params = ConvParams(stride, padding, dilation, transposed, output_padding, groups)

    x, bias, w_cast = _autocast_operands(x, weight, bias)
    op = op or f"conv{'_transpose' if transposed else ''}{nd}d"
    strategy = _native_strategy(x, weight, bias, settings, layer)
    if strategy is not None:
        out = _native_product(_PRODUCTS.conv_dropit, x, weight, bias, settings, strategy, w_cast, layer, op, 1,
                              stride, padding, dilation, transposed, output_padding, groups)
        return out.squeeze(0) if unbatched else out
    fn = _function(_DropITConv, _DropITConvJvp, _DropITConvEager)
    out = fn.apply(x, weight, bias, params, settings, w_cast, layer, op)
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
    settings = Settings.of(gamma, strategy, chunk)
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
            settings = Settings.of(gamma, strategy, chunk)
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
