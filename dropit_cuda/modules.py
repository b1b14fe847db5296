"""DropIT modules: drop-in subclasses of ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.MultiheadAttention``.

Each takes its parent's constructor arguments plus the keyword-only ``gamma``, ``strategy`` and
``chunk``, and has the parent's parameters and ``state_dict`` (the DropIT settings are plain
attributes, not state). In training mode with autograd enabled the forward pass goes through
:mod:`dropit_cuda.functional`, which caches a compressed input; in eval mode or under
``torch.no_grad()`` it is the parent's forward, unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as DF
from .ops import check_chunk, check_gamma
from .strategies import check_strategy

__all__ = [
    "DropITConv1d",
    "DropITConv2d",
    "DropITConv3d",
    "DropITLayer",
    "DropITLinear",
    "DropITMultiheadAttention",
]

_DEFAULTS = dict(gamma=0.9, strategy="parallel_min_k", chunk=16384)


class DropITLayer:
    """Mixin of every DropIT module: the settings, the active test, the class swap."""

    #: the ``torch.nn`` class a module built directly as this class reverts to
    plain_class: type = nn.Module
    gamma: float
    strategy: str
    chunk: int

    _CHECKS = {"gamma": check_gamma, "strategy": check_strategy, "chunk": check_chunk}

    def __setattr__(self, name: str, value) -> None:
        check = DropITLayer._CHECKS.get(name)
        super().__setattr__(name, check(value) if check is not None else value)  # type: ignore[misc]

    def set_dropit(self, gamma: float = 0.9, strategy: str = "parallel_min_k", chunk: int = 16384) -> None:
        """Checks and sets the DropIT settings (raises TypeError/ValueError naming the argument)."""
        self.gamma = check_gamma(gamma)
        self.strategy = check_strategy(strategy)
        self.chunk = check_chunk(chunk)

    def dropit_active(self) -> bool:
        """True when the forward pass caches a compressed input: training, autograd enabled."""
        return self.training and torch.is_grad_enabled()

    def _dropit_repr(self) -> str:
        return f"gamma={self.gamma}, strategy={self.strategy!r}, chunk={self.chunk}"

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, {self._dropit_repr()}" if base else self._dropit_repr()

    @classmethod
    def from_module(cls, module: nn.Module, gamma: float = 0.9, strategy: str = "parallel_min_k",
                    chunk: int = 16384) -> nn.Module:
        """Turns ``module`` (an instance of ``plain_class`` or a class it stands for) into ``cls``
        in place, keeping its parameters, buffers and hooks; returns it."""
        if isinstance(module, DropITLayer):
            module.set_dropit(gamma, strategy, chunk)
            return module
        original = type(module)
        module.__class__ = cls
        try:
            module.set_dropit(gamma, strategy, chunk)  # type: ignore[attr-defined]
        except Exception:
            module.__class__ = original
            for name in DropITLayer._CHECKS:
                module.__dict__.pop(name, None)
            raise
        module.__dict__["_dropit_plain_class"] = original
        module._after_swap(gamma, strategy, chunk)  # type: ignore[attr-defined]
        return module

    def _after_swap(self, gamma: float, strategy: str, chunk: int) -> None:
        pass

    def to_plain(self) -> nn.Module:
        """Turns this module back into its plain ``torch.nn`` class in place; returns it."""
        plain = self.__dict__.pop("_dropit_plain_class", type(self).plain_class)
        for name in DropITLayer._CHECKS:
            self.__dict__.pop(name, None)
        self.__class__ = plain
        return self  # type: ignore[return-value]


class DropITLinear(DropITLayer, nn.Linear):
    """``nn.Linear`` that caches a DropIT-compressed input for the weight gradient.

    The channel strategies drop whole input features (the last dimension of the input).
    """

    plain_class = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 gamma: float = 0.9, strategy: str = "parallel_min_k", chunk: int = 16384) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self.set_dropit(gamma, strategy, chunk)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.dropit_active():
            return F.linear(input, self.weight, self.bias)
        return DF.linear(input, self.weight, self.bias, self.gamma, self.strategy, self.chunk)


class _DropITConvNd(DropITLayer):
    def __init__(self, *args, gamma: float = 0.9, strategy: str = "parallel_min_k", chunk: int = 16384,
                 **kwargs) -> None:
        self.plain_class.__init__(self, *args, **kwargs)
        self.set_dropit(gamma, strategy, chunk)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.dropit_active():
            return self.plain_class.forward(self, input)
        return DF.conv(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                       self.gamma, self.strategy, self.chunk, self.padding_mode)


class DropITConv1d(_DropITConvNd, nn.Conv1d):
    """``nn.Conv1d`` that caches a DropIT-compressed input (channel strategies: dimension 1)."""

    plain_class = nn.Conv1d


class DropITConv2d(_DropITConvNd, nn.Conv2d):
    """``nn.Conv2d`` that caches a DropIT-compressed input (channel strategies: dimension 1)."""

    plain_class = nn.Conv2d


class DropITConv3d(_DropITConvNd, nn.Conv3d):
    """``nn.Conv3d`` that caches a DropIT-compressed input (channel strategies: dimension 1)."""

    plain_class = nn.Conv3d


class DropITMultiheadAttention(DropITLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose input projections cache DropIT-compressed inputs.

    ``nn.MultiheadAttention`` applies ``in_proj_weight`` (or ``q/k/v_proj_weight``) and
    ``out_proj.weight`` with ``F.linear`` inside ``F.multi_head_attention_forward``, so swapping
    ``nn.Linear`` modules alone would leave them dense. In training mode this module runs the same
    computation (same masks, dropout, ``need_weights`` and ``is_causal`` handling) with the input
    projections through :func:`dropit_cuda.functional.linear` with this module's settings, and the
    output projection through it with ``out_proj``'s settings when ``out_proj`` is a
    :class:`DropITLinear` (it is, when built directly or by ``convert`` unless excluded). In eval
    mode or without autograd it is ``nn.MultiheadAttention.forward`` (fast path included).
    """

    plain_class = nn.MultiheadAttention

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, device=None, dtype=None, *, gamma: float = 0.9,
                 strategy: str = "parallel_min_k", chunk: int = 16384) -> None:
        nn.MultiheadAttention.__init__(self, embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn,
                                       kdim, vdim, batch_first, device, dtype)
        self.set_dropit(gamma, strategy, chunk)
        DropITLinear.from_module(self.out_proj, gamma, strategy, chunk)

    def _in_linear(self, x, w, b):
        return DF.linear(x, w, b, self.gamma, self.strategy, self.chunk)

    def _out_linear(self, x):
        out_proj = self.out_proj
        if isinstance(out_proj, DropITLinear):
            return DF.linear(x, out_proj.weight, out_proj.bias, out_proj.gamma, out_proj.strategy, out_proj.chunk)
        return F.linear(x, out_proj.weight, out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if not self.dropit_active():
            return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights,
                                                 attn_mask, average_attn_weights, is_causal)
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("DropITMultiheadAttention does not support nested tensors in training mode")
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False,
        )
        if self.batch_first and is_batched:
            # keep "query is key is value" true where it was, it selects the packed projection
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, weights = self._attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def _project(self, query, key, value):
        E = self.embed_dim
        if not self._qkv_same_embed_dim:
            b = self.in_proj_bias
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            return (self._in_linear(query, self.q_proj_weight, b_q),
                    self._in_linear(key, self.k_proj_weight, b_k),
                    self._in_linear(value, self.v_proj_weight, b_v))
        w, b = self.in_proj_weight, self.in_proj_bias
        if key is value and query is key:
            proj = self._in_linear(query, w, b)
            proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        if key is value:
            w_q, w_kv = w.split([E, 2 * E])
            b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
            q = self._in_linear(query, w_q, b_q)
            kv = self._in_linear(key, w_kv, b_kv)
            kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return q, kv[0], kv[1]
        w_q, w_k, w_v = w.chunk(3)
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return self._in_linear(query, w_q, b_q), self._in_linear(key, w_k, b_k), self._in_linear(value, w_v, b_v)

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                   is_causal):
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != self.embed_dim:
            raise ValueError(f"query's last dimension is {embed_dim}, expected embed_dim={self.embed_dim}")
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True needs attn_mask (e.g. nn.Transformer.generate_square_subsequent_mask)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                target_type=query.dtype, check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False
        head_dim = embed_dim // num_heads

        q, k, v = self._project(query, key, value)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, should be {(tgt_len, src_len)}")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, "
                        f"should be {(bsz * num_heads, tgt_len, src_len)}")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

        if self.add_zero_attn:
            zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=1)
            v = torch.cat([v, zeros.to(v.dtype)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)

        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise RuntimeError(
                    f"expecting key_padding_mask shape of {(bsz, src_len)}, but got {tuple(key_padding_mask.shape)}")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v)
            out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self._out_linear(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights

        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self._out_linear(out).view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
        return out, None
