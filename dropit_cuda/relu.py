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

from typing import Optional

import torch
from torch import nn

from . import _native, dtensor

_native.load()

_MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = ["MaskedReLU", "masked_relu", "relu_mask", "relu_mask_backward"]


Strides = tuple[int, ...]


def _dense_in_place(x: torch.Tensor) -> bool:
    """Whether the in-place op can write into ``x`` (a layout whose storage order it walks).
    Only the common layouts are checked, with tests that ``torch.compile`` traces."""
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _as_layout(t: torch.Tensor, strides: Strides) -> torch.Tensor:
    """``t`` itself if it has ``strides``, else a copy with them (a dense layout of its shape)."""
    if tuple(t.stride()) == tuple(strides):
        return t
    out = torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def relu_mask(x: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor, Strides]:
    """``torch.relu(x)`` and its 1-bit mask, without autograd.

    Returns ``(y, mask, strides)``. The mask follows the memory order of ``y``, whose
    ``strides`` are returned: ``x``'s own where ``x`` is dense in some dimension order
    (contiguous, channels_last, a transpose...), else a dense layout of ``x``'s shape. ``mask`` is int32,
    ``ceil(x.numel() / 32)`` words; bit ``j`` of word ``w`` is set where the element at storage
    position ``32*w + j`` of ``y`` is positive or NaN. With ``inplace`` the result is written
    into ``x`` and ``y`` is ``x``; otherwise ``y`` is a new tensor (never a view).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _MASK_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    with torch.no_grad():
        if inplace and _dense_in_place(x):
            return x, torch.ops.dropit_cuda.relu_mask_forward_inplace(x), tuple(x.stride())
        y, mask = torch.ops.dropit_cuda.relu_mask_forward(x)  # any layout: y is dense
        if inplace:
            x.copy_(y)
            return x, mask, tuple(y.stride())
        return y, mask, tuple(y.stride())


def relu_mask_backward(
    grad: torch.Tensor, mask: torch.Tensor, strides: Optional[Strides] = None
) -> torch.Tensor:
    """ReLU's input gradient from the mask of :func:`relu_mask`: ``grad`` where the bit is set,
    ``+0`` elsewhere, as a new tensor with ``strides``, those :func:`relu_mask` returned
    (``grad`` is copied into that layout first where it differs). Without ``strides``, ``grad``
    must already be laid out like the forward's ``y``."""
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad must be a torch.Tensor, got {type(grad).__name__}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    g = grad if strides is None else _as_layout(grad, strides)
    return torch.ops.dropit_cuda.relu_mask_backward(g, mask)


class _ApplyMask(torch.autograd.Function):
    """``grad -> mask ? grad : 0``: linear in ``grad``, so its own backward is itself (this is
    what makes double backward through :class:`MaskedReLU` work)."""

    @staticmethod
    def forward(ctx, grad, mask, strides):
        ctx.save_for_backward(mask)
        ctx.strides = strides
        return relu_mask_backward(grad, mask, strides)

    @staticmethod
    def backward(ctx, gg):
        (mask,) = ctx.saved_tensors
        return _ApplyMask.apply(gg, mask, ctx.strides), None, None


class _MaskedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace):
        y, mask, strides = relu_mask(x, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(mask)  # the only cache: 1 bit per element
        ctx.strides = strides
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _ApplyMask.apply(grad, mask, ctx.strides), None


_CreationMeta = torch._C._autograd.CreationMeta
# Why torch refuses to modify a view in place, by how the view was made (torch's own rules).
_VIEW_NOT_WRITABLE = {
    _CreationMeta.MULTI_OUTPUT_NODE: "it is one of several views returned by one op (unbind, split, chunk...)",
    _CreationMeta.NO_GRAD_MODE: "it was created in no_grad mode and grad mode is now enabled",
    _CreationMeta.IN_CUSTOM_FUNCTION: "it was created inside a custom autograd.Function's forward",
    _CreationMeta.INFERENCE_MODE: "it was created in inference mode",
}


def _check_inplace(x: torch.Tensor) -> None:
    """Raises the RuntimeError torch raises for a recorded in-place op on ``x`` (which requires
    grad), before anything is written: an autograd.Function with ``mark_dirty`` reports these
    only after its forward has already overwritten ``x``."""
    if torch.compiler.is_compiling():  # the tracer applies torch's rules to the graph itself
        return
    if x._is_view():
        reason = _VIEW_NOT_WRITABLE.get(torch._C._autograd._get_creation_meta(x))
        if reason is not None:
            raise RuntimeError(
                f"x is a view that cannot be modified in place: {reason}; use inplace=False "
                "or clone it first (nn.ReLU(inplace=True) raises here too)"
            )
        if x._base.is_leaf:
            raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")
    if x.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")


def masked_relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``torch.relu(x)`` (in place with ``inplace``, like ``F.relu``) whose backward caches a
    1-bit mask instead of the output.

    Gradients equal ``nn.ReLU``'s bit for bit. In place on a leaf that requires grad, or on a
    view torch won't modify in place, it raises a RuntimeError as ``nn.ReLU`` does, before
    writing anything. Where no gradient is needed (``torch.no_grad()``, inputs that don't
    require grad) and for dtypes other than float16/bfloat16/float32/float64, it is
    ``torch.relu`` itself. Under ``torch.autocast`` it runs in the input's dtype, as
    ``nn.ReLU`` does.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if not (torch.is_grad_enabled() and x.requires_grad) or x.dtype not in _MASK_DTYPES or transform_active():
        return torch.relu_(x) if inplace else torch.relu(x)
    if dtensor.is_dtensor(x):  # masked on this rank's local tensor; torch's ReLU where not exact
        out = None if inplace else dtensor.on_local(masked_relu, x)
        return out if out is not None else torch.relu_(x) if inplace else torch.relu(x)
    if inplace:
        _check_inplace(x)
    return _MaskedReLUFunction.apply(x, inplace)


def transform_active() -> bool:
    """Whether forward-mode AD or a ``torch.func`` transform is active: the mask's saving is for a
    plain backward pass, so there ``torch.relu`` itself runs (same values, its own derivatives)."""
    return (torch.autograd.forward_ad._current_level >= 0
            or torch._C._functorch.peek_interpreter_stack() is not None)


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
