"""DropIT versions of ``F.linear`` and ``F.conv1d/2d/3d``.

The forward output is exactly ``torch.nn.functional``'s. What differs is the cache: instead of the
input, the autograd function saves (through ``ctx.save_for_backward``) its compressed form, as
chosen by ``strategy`` (see :mod:`dropit_cuda.strategies`), and the backward pass computes the
weight gradient from the unpacked copy, in which the dropped elements are zero. The input
gradient comes from the output gradient and the weight only, and the bias gradient is exact.
When the weight does not require grad nothing of the input is cached.

Under ``torch.autocast`` the inputs are cast the way autocast casts them for ``F.linear`` /
``F.conv*`` (floating tensors other than float64 on the autocast device go to the autocast dtype),
so the layer computes in that dtype and caches the low-precision input.

These functions support a single backward pass (``retain_graph=True`` allows repeating it);
double backward (``create_graph=True``) raises a RuntimeError.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .ops import check_chunk, check_gamma, dense_input
from .strategies import _PACK, _UNPACK, check_strategy

__all__ = ["conv1d", "conv2d", "conv3d", "linear", "conv"]

_IntOrTuple = Union[int, Sequence[int]]
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

_DOUBLE_BACKWARD = (
    "DropIT layers do not support double backward (create_graph=True): their backward pass "
    "uses a compressed copy of the input and is not itself differentiable"
)


def _check_settings(gamma: float, strategy: str, chunk: int) -> tuple[float, str, int]:
    return check_gamma(gamma), check_strategy(strategy), check_chunk(chunk)


def _autocast(device_type: str, *tensors: Optional[torch.Tensor]):
    """``tensors`` as autocast would cast them for a linear/conv op (unchanged when it is off)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
            return t
        if t.device.type != device_type:
            return t
        return t.to(dtype)

    return tuple(cast(t) for t in tensors)


def _needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _save(ctx, x: torch.Tensor, weight: torch.Tensor, gamma: float, strategy: str, chunk: int, channel_dim: int):
    ctx.strategy = strategy
    if ctx.needs_input_grad[1]:
        x = dense_input(x)
        tensors, meta = _PACK[strategy](x, gamma, chunk, channel_dim)
        ctx.cache_meta = meta
        ctx.num_cached = len(tensors)
        ctx.save_for_backward(weight, *tensors)
    else:
        ctx.cache_meta = None
        ctx.num_cached = 0
        ctx.save_for_backward(weight)


def _restore(ctx) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight and the unpacked input (None when the weight needs no gradient)."""
    saved = ctx.saved_tensors
    weight = saved[0]
    if ctx.num_cached == 0:
        return weight, None
    return weight, _UNPACK[ctx.strategy](tuple(saved[1:]), ctx.cache_meta)


class _DropITLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gamma, strategy, chunk):
        out = F.linear(x, weight, bias)
        ctx.has_bias = bias is not None
        _save(ctx, x, weight, gamma, strategy, chunk, -1)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        with torch.autocast(grad_out.device.type, enabled=False):
            weight, x_hat = _restore(ctx)
            grad_x = grad_w = grad_b = None
            g2 = grad_out.reshape(-1, grad_out.shape[-1]) if grad_out.dim() > 0 else grad_out
            if ctx.needs_input_grad[0]:
                grad_x = grad_out.matmul(weight)
            if ctx.needs_input_grad[1]:
                grad_w = g2.t().mm(x_hat.reshape(-1, x_hat.shape[-1]))
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    gamma: float = 0.9,
    strategy: str = "parallel_min_k",
    chunk: int = 16384,
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
    gamma, strategy, chunk = _check_settings(gamma, strategy, chunk)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    input, weight, bias = _autocast(input.device.type, input, weight, bias)
    if not _needs_autograd(input, weight, bias):
        return F.linear(input, weight, bias)
    return _DropITLinear.apply(input, weight, bias, gamma, strategy, chunk)


_PAD_BACKWARD = {
    "reflect": {1: torch.ops.aten.reflection_pad1d_backward, 2: torch.ops.aten.reflection_pad2d_backward,
                3: torch.ops.aten.reflection_pad3d_backward},
    "replicate": {1: torch.ops.aten.replication_pad1d_backward, 2: torch.ops.aten.replication_pad2d_backward,
                  3: torch.ops.aten.replication_pad3d_backward},
}


class _DropITConv(torch.autograd.Function):
    # pad_mode "reflect"/"replicate" pads inside the function: F.pad's own autograd node would
    # save the dense input; here only the padded input's compressed form is cached.
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, gamma, strategy, chunk, pad_mode, pads):
        nd = weight.dim() - 2
        ctx.pad = None
        if pad_mode is not None:
            ctx.pad = (pad_mode, pads, tuple(x.shape))
            x = F.pad(x, pads, mode=pad_mode)
        out = _CONV_FN[nd](x, weight, bias, stride, padding, dilation, groups)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.x_shape = tuple(x.shape)
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        _save(ctx, x, weight, gamma, strategy, chunk, 1)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        stride, padding, dilation, groups = ctx.conv_args
        with torch.autocast(grad_out.device.type, enabled=False):
            weight, x_hat = _restore(ctx)
            need_x = ctx.needs_input_grad[0]
            need_w = ctx.needs_input_grad[1]
            need_b = ctx.bias_sizes is not None and ctx.needs_input_grad[2]
            if x_hat is None:
                # the input gradient needs only the input's shape
                x_hat = grad_out.new_empty(1).expand(ctx.x_shape)
            nd = weight.dim() - 2
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x_hat, weight, ctx.bias_sizes, list(stride), list(padding), list(dilation),
                False, [0] * nd, groups, [need_x, need_w, need_b],
            )
            if need_x and ctx.pad is not None:
                mode, pads, shape = ctx.pad
                grad_x = _PAD_BACKWARD[mode][nd](grad_x, grad_x.new_empty(1).expand(shape), list(pads))
        return (grad_x, grad_w, grad_b if need_b else None) + (None,) * 9


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


def conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: _IntOrTuple = 1,
    padding: Union[str, _IntOrTuple] = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    gamma: float = 0.9,
    strategy: str = "parallel_min_k",
    chunk: int = 16384,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """DropIT convolution of any dimension (taken from ``weight``: 3-D, 4-D or 5-D).

    Same arguments and output as ``F.conv1d/2d/3d`` plus ``padding_mode`` (as in ``nn.Conv*``:
    a mode other than ``"zeros"`` pads the input with ``F.pad`` first, and the padded input is
    what gets cached; "reflect" and "replicate" pad inside the autograd function, so that the
    pad's own backward does not keep the dense input alive) and the DropIT settings (see
    :func:`linear`; the channel strategies drop whole input channels, dimension 1).
    """
    gamma, strategy, chunk = _check_settings(gamma, strategy, chunk)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    nd = weight.dim() - 2
    if nd not in _CONV_FN:
        raise ValueError(f"weight must be 3-D, 4-D or 5-D, got {weight.dim()}-D")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride = _tuple(stride, nd, "stride")
    dilation = _tuple(dilation, nd, "dilation")
    unbatched = input.dim() == nd + 1
    if input.dim() not in (nd + 1, nd + 2):
        raise RuntimeError(  # the type F.conv*d raises
            f"input must be {nd + 1}-D (unbatched) or {nd + 2}-D (batched) for a {nd}-D convolution, "
            f"got {input.dim()}-D"
        )
    x = input.unsqueeze(0) if unbatched else input

    # per spatial dim: (left, right) padding
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * nd
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            pads = []
            for i in range(nd):
                total = dilation[i] * (weight.shape[2 + i] - 1)
                pads.append((total // 2, total - total // 2))
        else:
            raise ValueError(f"padding must be 'same', 'valid', an int or a tuple of {nd} ints, got {padding!r}")
    else:
        pads = [(p, p) for p in _tuple(padding, nd, "padding")]
    pad_mode, pad_list = None, None
    if padding_mode in _PAD_BACKWARD:
        pad_mode, pad_list = padding_mode, [p for lr in reversed(pads) for p in lr]
        conv_padding = (0,) * nd
    elif padding_mode != "zeros":
        x = F.pad(x, [p for lr in reversed(pads) for p in lr], mode=padding_mode)  # saves no input
        conv_padding = (0,) * nd
    elif any(left != right for left, right in pads):
        # 'same' with an even kernel: the extra element goes on the right, as in ATen
        x = F.pad(x, [p for left, right in reversed(pads) for p in (0, right - left)])
        conv_padding = tuple(left for left, _ in pads)
    else:
        conv_padding = tuple(left for left, _ in pads)

    x, weight, bias = _autocast(x.device.type, x, weight, bias)
    if _needs_autograd(x, weight, bias):
        out = _DropITConv.apply(x, weight, bias, stride, conv_padding, dilation, groups, gamma, strategy, chunk,
                                pad_mode, pad_list)
    else:
        if pad_mode is not None:
            x = F.pad(x, pad_list, mode=pad_mode)
        out = _CONV_FN[nd](x, weight, bias, stride, conv_padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


def _conv_nd(nd: int):
    def fn(
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride: _IntOrTuple = 1,
        padding: Union[str, _IntOrTuple] = 0,
        dilation: _IntOrTuple = 1,
        groups: int = 1,
        gamma: float = 0.9,
        strategy: str = "parallel_min_k",
        chunk: int = 16384,
        padding_mode: str = "zeros",
    ) -> torch.Tensor:
        if isinstance(weight, torch.Tensor) and weight.dim() != nd + 2:
            raise ValueError(f"weight must be {nd + 2}-D for conv{nd}d, got {weight.dim()}-D")
        return conv(input, weight, bias, stride, padding, dilation, groups, gamma, strategy, chunk, padding_mode)

    fn.__name__ = fn.__qualname__ = f"conv{nd}d"
    fn.__doc__ = (
        f"``F.conv{nd}d`` that caches a DropIT-compressed input for backward; see :func:`conv`."
    )
    return fn


conv1d = _conv_nd(1)
conv2d = _conv_nd(2)
conv3d = _conv_nd(3)
