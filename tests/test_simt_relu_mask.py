"""The CUDA ReLU-mask kernel bodies, run by the host SIMT layer, give the CPU ops' bytes."""

from __future__ import annotations

import pytest
import torch

import dropit_cuda  # noqa: F401  (loads the native ops)
from dropit_cuda.relu import relu_mask, relu_mask_backward
from simt.build import load

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(scope="module")
def simt():
    ext = load()  # also registers torch.ops.dropit_simt_relu
    return ext, torch.ops.dropit_simt_relu


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_OF[t.element_size()])


def adversarial(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"),
                            torch.finfo(dtype).tiny / 2, -torch.finfo(dtype).tiny / 2], dtype=dtype)
    if n:
        where = torch.randint(0, n, (max(1, n // 4),), generator=g)
        x[where] = special[torch.randint(0, len(special), (len(where),), generator=g)]
    # Whole words of one sign, to get all-ones and all-zeros ballots.
    x[: min(n, 64)] = x[: min(n, 64)].abs()
    x[64:128] = -x[64:128].abs()
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 20_011])
@pytest.mark.parametrize("threads,grid", [(0, 0), (64, 3), (1024, 0), (32, 1)])
def test_forward_backward_bytes_equal_cpu(simt, dtype, n, threads, grid):
    _, ops = simt
    x = adversarial(n, dtype, seed=n + threads)
    y_ref, mask_ref, _ = relu_mask(x)
    # fibers resumed forward, in reverse, and shuffled: the result must not depend on it
    y, mask = ops.forward(x, False, threads, grid, 0)
    assert torch.equal(bits(y), bits(y_ref)) and torch.equal(mask, mask_ref)
    y_in, mask_in = ops.forward(x, True, threads, grid, 1)
    assert torch.equal(bits(y_in), bits(y_ref)) and torch.equal(mask_in, mask_ref)
    grad = adversarial(n, dtype, seed=n + 1)
    ref = relu_mask_backward(grad, mask_ref)
    assert torch.equal(bits(ops.backward(grad, mask_ref, threads, grid, 2, n)), bits(ref))


def test_every_word_is_one_warp_ballot(simt):
    ext, ops = simt
    x = adversarial(5_000, torch.float32, seed=3)
    # 157 words over 2 blocks of 2 warps: each warp strides over about 39 words.
    ops.forward(x, False, 64, 2)
    stats = ext.last_stats()
    assert stats["blocks"] == 2 and stats["warp_ops"] == (5_000 + 31) // 32


def test_empty_input(simt):
    _, ops = simt
    y, mask = ops.forward(torch.empty(0))
    assert y.numel() == 0 and mask.numel() == 0
