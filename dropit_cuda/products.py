"""DropIT versions of the batched and grouped weight products: ``bmm`` / ``baddbmm`` with the
weight on either side (a 3-D weight, a slice, or rows gathered from one), ``mm`` with the weight
first (``W @ x``), and ``torch._grouped_mm``
(``F.grouped_mm``) of 2-D tokens against a 3-D expert weight with offsets.

As in :mod:`dropit_cuda.functional`, the forward output is torch's own call on the same operands,
the activation is cached packed, and the gradients are computed with the ATen calls autograd uses
for the plain op (``derivatives.yaml``: ``bmm``'s ``grad.bmm(mat2.transpose(1, 2))`` and
``self.transpose(1, 2).bmm(grad)``, ``mm_mat1_backward`` / ``mm_mat2_backward``'s layout rule,
and the same rule for ``_grouped_mm``, whose weight gradient is the per-group sum), so input
gradients are exact by construction and at ``gamma = 0`` every gradient is the plain op's bit for
bit. A weight gathered from a parameter (``weight[expert_ids]``) is not kept: the parameter and
the indices are, and backward gathers again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import functional as DF
from .settings import Settings

__all__ = ["Gathered", "ProductSpec", "einsum", "weight_product"]


@dataclass(frozen=True)
class Gathered:
    """A weight operand gathered from a parameter: ``param[index]`` (an advanced index on dim 0)."""

    param: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class ProductSpec:
    """One product ``out = a @ b`` against a weight.

    ``kind``: ``"mm"``, ``"bmm"`` (``baddbmm`` when a bias is given) or ``"grouped_mm"``.
    ``w_pos``: which operand is the weight (0: ``W @ x``, 1: ``x @ W``).
    ``w_sizes`` / ``w_strides``: the weight operand's layout (decides the ``mm`` / ``grouped_mm``
    backward, as in ATen). ``x_sizes`` / ``x_strides`` likewise for the activation.
    """

    kind: str
    w_pos: int
    w_sizes: tuple
    w_strides: tuple
    x_sizes: tuple
    x_strides: tuple


def _column_major(sizes: tuple, strides: tuple) -> bool:
    """ATen's test in ``mm_mat1_backward`` / ``mm_mat2_backward`` (on the last two dimensions)."""
    return strides[-2] == 1 and strides[-1] == sizes[-2]


def _product(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], offs: Optional[torch.Tensor],
             spec: ProductSpec) -> torch.Tensor:
    a, b = (w, x) if spec.w_pos == 0 else (x, w)
    if spec.kind == "grouped_mm":
        return torch._grouped_mm(a, b, offs=offs)
    if spec.kind == "mm":
        return torch.mm(a, b)
    return torch.bmm(a, b) if bias is None else torch.baddbmm(bias, a, b)


def _restore_layout(x_hat: torch.Tensor, sizes: tuple, strides: tuple) -> torch.Tensor:
    """The unpacked input in the memory layout the forward read it in (so that the backward
    product runs the same kernel on the same layout as the plain op's)."""
    if tuple(x_hat.stride()) == strides:
        return x_hat
    return torch.empty_strided(sizes, strides, dtype=x_hat.dtype, device=x_hat.device).copy_(x_hat)


def _grad_weight(g: torch.Tensor, x: torch.Tensor, offs: Optional[torch.Tensor], spec: ProductSpec) -> torch.Tensor:
    """The weight operand's gradient, as autograd computes it for the plain op."""
    if spec.kind == "bmm":
        return g.bmm(x.transpose(1, 2)) if spec.w_pos == 0 else x.transpose(1, 2).bmm(g)
    col = _column_major(spec.w_sizes, spec.w_strides)
    if spec.kind == "mm":
        if spec.w_pos == 0:  # mm_mat1_backward(grad, mat2=x)
            return x.mm(g.t()).t() if col else g.mm(x.t())
        return g.t().mm(x).t() if col else x.t().mm(g)  # mm_mat2_backward(grad, mat1=x)
    # grouped_mm, weight second: the per-group sums x_g^T @ grad_g
    if col:
        return torch._grouped_mm(g.t(), x, offs=offs).transpose(-2, -1)
    return torch._grouped_mm(x.t(), g, offs=offs)


def _grad_input(g: torch.Tensor, w: torch.Tensor, offs: Optional[torch.Tensor], spec: ProductSpec) -> torch.Tensor:
    """The activation's gradient, as autograd computes it for the plain op."""
    if spec.kind == "bmm":
        return w.transpose(1, 2).bmm(g) if spec.w_pos == 0 else g.bmm(w.transpose(1, 2))
    col = _column_major(spec.x_sizes, spec.x_strides)
    if spec.kind == "mm":
        if spec.w_pos == 0:  # mm_mat2_backward(grad, mat1=w)
            return g.t().mm(w).t() if col else w.t().mm(g)
        return w.mm(g.t()).t() if col else g.mm(w.t())
    return torch._grouped_mm(g, w.transpose(-2, -1), offs=offs)  # routed for row-major x only


class _DropITProduct(torch.autograd.Function):
    """``out = a @ b`` (see :class:`ProductSpec`) caching the activation packed; the weight operand
    is kept as the parameter (or its view) it is, or as parameter + indices when gathered."""

    @staticmethod
    def forward(x, w, bias, offs, gathered, spec, settings, cast, layer, op):
        with torch.autocast(x.device.type, enabled=False):
            return _product(x, DF.weight_operand(w, cast), bias, offs, spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, bias, offs, gathered, spec, settings, cast, layer, op = inputs
        ctx.spec, ctx.cast, ctx.gathered = spec, cast, gathered is not None
        ctx.w_dtype = w.dtype
        ctx.has_bias = bias is not None
        kept = (gathered.param, gathered.index) if gathered is not None else (w,)
        ctx.n_w = len(kept)
        DF.save_packed(ctx, x, kept + ((offs,) if offs is not None else ()), settings,
                       -2 if spec.w_pos == 0 else -1, layer, op, need_weight_grad=ctx.needs_input_grad[1])

    vmap = staticmethod(DF._unsupported_vmap)

    @staticmethod
    @DF._once_differentiable
    def backward(ctx, grad):
        spec: ProductSpec = ctx.spec
        kept, x_hat = DF.restore_packed(ctx)
        offs = kept[ctx.n_w] if len(kept) > ctx.n_w else None
        if ctx.gathered:
            param, index = kept[0], kept[1]
            w = param[index]  # gathered again: the same rows, not kept from the forward
        else:
            w = kept[0]
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(grad, DF.weight_operand(w, ctx.cast), offs, spec)
        if ctx.needs_input_grad[1]:
            def weight_grad(inp: torch.Tensor) -> torch.Tensor:
                g_w = _grad_weight(grad, _restore_layout(inp, spec.x_sizes, spec.x_strides), offs, spec)
                return g_w if ctx.cast is None else g_w.to(ctx.w_dtype)

            grad_w = weight_grad(x_hat)
            DF._give_exact_grad(ctx, grad_w, weight_grad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad  # baddbmm's self: grad (the engine reduces a broadcast bias)
        return grad_x, grad_w, grad_bias, None, None, None, None, None, None, None


def weight_product(x: torch.Tensor, w: torch.Tensor, spec: ProductSpec, settings: Settings, layer: Any = None,
                   op: str = "bmm", bias: Optional[torch.Tensor] = None, offs: Optional[torch.Tensor] = None,
                   gathered: Optional[Gathered] = None, autocast: bool = True) -> torch.Tensor:
    """The product ``spec`` describes, caching ``x`` as ``settings`` say. ``autocast``: whether
    torch autocasts this op (``mm``/``bmm``/``baddbmm`` do, ``_grouped_mm`` does not)."""
    if not DF._caches(x, w) or DF._forward_ad():  # nothing to cache, or forward AD: torch's own call
        return _product(x, w, bias, offs, spec)
    x, bias, w_cast = DF._autocast_operands(x, w, bias) if autocast else (x, bias, None)
    return _DropITProduct.apply(x, w, bias, offs, gathered, spec, settings, w_cast, layer, op)


# --- einsum: torch's own op, differentiated again in backward ---------------------------------


class _DropITEinsum(torch.autograd.Function):
    """``torch.einsum(equation, x, w)`` (or ``(w, x)``) caching ``x`` packed. Backward runs torch's
    einsum again on the unpacked input and the weight, under the forward's autocast state, and
    lets autograd differentiate it: the gradients are autograd's own for the plain op (the input
    gradient reads only the weight, so it is exact at any gamma); this costs one more product."""

    @staticmethod
    def forward(x, w, equation, w_first, settings, autocast, layer, op):
        with torch.autocast("cpu" if x.device.type == "cpu" else x.device.type, dtype=autocast[1],
                            enabled=autocast[0]):
            return torch.einsum(equation, *((w, x) if w_first else (x, w)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, equation, w_first, settings, autocast, layer, op = inputs
        ctx.equation, ctx.w_first, ctx.autocast = equation, w_first, autocast
        ctx.x_geometry = (tuple(x.shape), tuple(x.stride()))
        DF.save_packed(ctx, x, (w,), settings, -1, layer, op, need_weight_grad=ctx.needs_input_grad[1])

    vmap = staticmethod(DF._unsupported_vmap)

    @staticmethod
    @DF._once_differentiable
    def backward(ctx, grad):
        (w,), x_hat = DF.restore_packed(ctx)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        def grads(inp: Optional[torch.Tensor]) -> tuple:
            if inp is None:  # the input gradient reads only the weight: any values of this shape do
                inp = torch.zeros(ctx.x_geometry[0], dtype=grad.dtype if ctx.autocast[0] else w.dtype,
                                  device=grad.device)
            leaves = (inp.detach().requires_grad_(need_x), w.detach().requires_grad_(need_w))
            with torch.enable_grad(), torch.autocast(grad.device.type, dtype=ctx.autocast[1],
                                                     enabled=ctx.autocast[0]):
                out = torch.einsum(ctx.equation, *(leaves[::-1] if ctx.w_first else leaves))
            wanted = [t for t, n in zip(leaves, (need_x, need_w)) if n]
            got = iter(torch.autograd.grad(out, wanted, grad))
            return tuple(next(got) if n else None for n in (need_x, need_w))

        x_in = None if x_hat is None else _restore_layout(x_hat, *ctx.x_geometry)
        grad_x, grad_w = grads(x_in)
        if need_w:
            DF._give_exact_grad(ctx, grad_w, lambda inp: grads(_restore_layout(inp, *ctx.x_geometry))[1])
        return grad_x, grad_w, None, None, None, None, None, None


def einsum(equation: str, x: torch.Tensor, w: torch.Tensor, w_first: bool, settings: Settings,
           layer: Any = None, op: str = "einsum") -> torch.Tensor:
    """``torch.einsum(equation, x, w)`` (``(w, x)`` when ``w_first``) caching ``x`` packed."""
    if not DF._caches(x, w) or DF._forward_ad():  # nothing to cache, or forward AD: torch's own call
        return torch.einsum(equation, *((w, x) if w_first else (x, w)))
    device = x.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    return _DropITEinsum.apply(x, w, equation, w_first, settings, autocast, layer, op)
