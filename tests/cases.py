"""Test inputs and probes shared by several test files."""

from __future__ import annotations

import math

import torch


def randn(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``n`` seeded standard-normal values, drawn in float64 and rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)


def adversarial(dtype: torch.dtype, n: int) -> dict[str, torch.Tensor]:
    """Inputs where ties, signed zeros, NaN, infinities and subnormals decide the selection."""
    tiny = torch.finfo(dtype).smallest_normal
    cases = {
        "all_equal": torch.full((n,), 1.5),
        "all_equal_signs": torch.tensor([1.5, -1.5] * (n // 2)),
        "many_zeros": torch.where(torch.arange(n) % 10 == 0, randn(n, torch.float64, 1), torch.zeros(n)),
        "signed_zeros": torch.tensor([0.0, -0.0] * (n // 2)),
        "few_distinct": torch.randint(-2, 3, (n,), generator=torch.Generator().manual_seed(2)).double(),
        "specials": torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0] * (n // 8)),
        "subnormals": torch.tensor([tiny / 2, -tiny / 4, tiny / 8, tiny, -tiny, 0.0], dtype=torch.float64).repeat(n // 6),
    }
    out = {k: v.to(dtype) for k, v in cases.items()}
    assert (out["subnormals"].abs() < tiny).any() and (out["subnormals"] != 0).any()
    return out


def saved_tensors(fn):
    """``fn()``'s result and every tensor autograd saved for backward while it ran."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved
