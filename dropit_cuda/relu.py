"""ReLU whose backward cache is a 1-bit mask instead of its output.

``nn.ReLU`` saves its output for the backward pass. In a conv -> BatchNorm -> ReLU -> conv stack
that output is also the next conv's input, so a DropIT conv that caches only a packed copy of its
input frees nothing: the ReLU still holds the dense tensor. ReLU's backward needs only where its
output was positive, one bit per element; :class:`MaskedReLU` caches exactly that, so the
tensor is held by the conv alone and DropIT's packing frees it.

The forward output equals ``torch.relu`` (``-0`` stays ``-0``, NaN passes through) and the
input gradient equals ``nn.ReLU``'s bit for bit: ``grad`` where the output is positive or NaN,
``+0`` elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _native

_native.load()

_MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = ["MaskedReLU", "masked_relu", "relu_mask", "relu_mask_backward"]


def _layout(x: torch.Tensor) -> tuple[torch.memory_format, bool]:
    """The memory order the mask follows for ``x``, and whether ``x`` is dense in it."""
    if x.is_contiguous():
        return torch.contiguous_format, True
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last, True
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d, True
    return torch.contiguous_format, False


def _flatten(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``x`` as a 1-D tensor in the memory order ``fmt`` (a view when ``x`` is dense in it)."""
    if fmt == torch.channels_last:
        return x.contiguous(memory_format=fmt).permute(0, 2, 3, 1).reshape(-1)
    if fmt == torch.channels_last_3d:
        return x.contiguous(memory_format=fmt).permute(0, 2, 3, 4, 1).reshape(-1)
    return x.contiguous().view(-1)


def _unflatten(flat: torch.Tensor, shape: torch.Size, fmt: torch.memory_format) -> torch.Tensor:
    """Inverse of :func:`_flatten`: a tensor of ``shape`` laid out in ``fmt``."""
    if fmt == torch.channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    if fmt == torch.channels_last_3d:
        n, c, d, h, w = shape
        return flat.view(n, d, h, w, c).permute(0, 4, 1, 2, 3)
    return flat.view(shape)


def relu_mask(x: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.memory_format]:
    """``torch.relu(x)`` and its 1-bit mask, without autograd.

    Returns ``(y, mask, memory_format)``: ``mask`` is int32, ``ceil(x.numel() / 32)`` words; bit
    ``j`` of word ``w`` is set where element ``32*w + j`` of ``y`` (in ``memory_format``'s
    order: contiguous, or channels_last where ``x`` is dense in it) is positive or NaN. With
    ``inplace`` the result is written into ``x`` and ``y`` is ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _MASK_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    fmt, dense = _layout(x)
    with torch.no_grad():
        if inplace and dense:
            mask = torch.ops.dropit_cuda.relu_mask_forward_inplace(_flatten(x, fmt))
            return x, mask, fmt
        y_flat, mask = torch.ops.dropit_cuda.relu_mask_forward(_flatten(x, fmt))
        y = _unflatten(y_flat, x.shape, fmt)
        if inplace:
            x.copy_(y)
            return x, mask, fmt
        return y, mask, fmt


def relu_mask_backward(
    grad: torch.Tensor, mask: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """ReLU's input gradient from the mask of :func:`relu_mask`: ``grad`` where the bit is set,
    ``+0`` elsewhere. ``memory_format`` is the one :func:`relu_mask` returned."""
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad must be a torch.Tensor, got {type(grad).__name__}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    flat = torch.ops.dropit_cuda.relu_mask_backward(_flatten(grad, memory_format), mask)
    return _unflatten(flat, grad.shape, memory_format)


class _ApplyMask(torch.autograd.Function):
    """``grad -> mask ? grad : 0``: linear in ``grad``, so its own backward is itself (this is
    what makes double backward through :class:`MaskedReLU` work)."""

    @staticmethod
    def forward(ctx, grad, mask, memory_format):
        ctx.save_for_backward(mask)
        ctx.memory_format = memory_format
        return relu_mask_backward(grad, mask, memory_format)

    @staticmethod
    def backward(ctx, gg):
        (mask,) = ctx.saved_tensors
        return _ApplyMask.apply(gg, mask, ctx.memory_format), None, None


class _MaskedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace):
        y, mask, fmt = relu_mask(x, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(mask)  # the only cache: 1 bit per element
        ctx.memory_format = fmt
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _ApplyMask.apply(grad, mask, ctx.memory_format), None


def masked_relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``torch.relu(x)`` (in place with ``inplace``, like ``F.relu``) whose backward caches a
    1-bit mask instead of the output.

    Gradients equal ``nn.ReLU``'s bit for bit. Where no gradient is needed (``torch.no_grad()``,
    inputs that don't require grad) and for dtypes other than float16/bfloat16/float32/float64,
    it is ``torch.relu`` itself. Under ``torch.autocast`` it runs in the input's dtype, as
    ``nn.ReLU`` does.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if not (torch.is_grad_enabled() and x.requires_grad) or x.dtype not in _MASK_DTYPES:
        return torch.relu_(x) if inplace else torch.relu(x)
    return _MaskedReLUFunction.apply(x, inplace)


class MaskedReLU(nn.ReLU):
    """``nn.ReLU`` whose backward cache is a 1-bit mask instead of the output tensor.

    A drop-in subclass of ``nn.ReLU`` (same ``inplace`` argument, no parameters or buffers);
    ``dc.convert(model, relu_mask=True)`` swaps it in and ``dc.revert`` swaps it back. The output
    and gradients equal ``nn.ReLU``'s; what changes is that the output tensor is no longer kept
    alive by the ReLU for backward, so a following DropIT conv/linear, which caches only a packed
    copy of it, lets it be freed.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return masked_relu(input, self.inplace)

    @classmethod
    def from_module(cls, module: nn.ReLU) -> "MaskedReLU":
        """Turns ``module`` (an ``nn.ReLU``) into a ``MaskedReLU`` in place, keeping ``inplace``
        and its hooks; returns it. Changing the object itself means a ReLU module used in several
        places (torchvision's ``BasicBlock`` applies ``self.relu`` twice) is masked everywhere."""
        if not isinstance(module, nn.ReLU):
            raise TypeError(f"module must be an nn.ReLU, got {type(module).__name__}")
        module.__class__ = cls
        return module  # type: ignore[return-value]

    def to_plain(self) -> nn.ReLU:
        """Turns this module back into a plain ``nn.ReLU`` in place (``dc.revert`` calls this)."""
        self.__class__ = nn.ReLU
        return self


@torch.library.register_fake("dropit_cuda::relu_mask_forward")
def _relu_mask_forward_fake(x):
    return torch.empty_like(x), x.new_empty(-(-x.numel() // 32), dtype=torch.int32)


@torch.library.register_fake("dropit_cuda::relu_mask_forward_inplace")
def _relu_mask_forward_inplace_fake(x):
    return x.new_empty(-(-x.numel() // 32), dtype=torch.int32)


@torch.library.register_fake("dropit_cuda::relu_mask_backward")
def _relu_mask_backward_fake(grad, mask):
    return torch.empty_like(grad)
