"""Every DropIT autograd function reads each saved tensor once per backward.

Non-reentrant checkpointing, ``save_on_cpu`` and user ``saved_tensors_hooks`` may hand a saved
tensor back only once; the hooks below raise on a second unpack of the same saved tensor, for every
strategy, with and without autocast (the weight-cast path), and on fidelity's exact-gradient path."""

import contextlib

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import dropit_cuda as dc
from dropit_cuda import functional as DF
from dropit_cuda.strategies import STRATEGIES


@contextlib.contextmanager
def unpack_once():
    """saved_tensors_hooks whose unpack raises when the same saved tensor is unpacked twice;
    yields the list of unpack counts so a test can check the hooks saw the saves at all."""
    counts = []

    def pack(t):
        counts.append(0)
        return len(counts) - 1, t

    def unpack(handle):
        i, t = handle
        counts[i] += 1
        if counts[i] > 1:
            raise RuntimeError(f"saved tensor {i} unpacked {counts[i]} times")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield counts


def _layers():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(32, 8), lambda: torch.randn(4, 32, requires_grad=True)),
        "conv2d": (nn.Conv2d(4, 8, 3, padding=1), lambda: torch.randn(2, 4, 6, 6, requires_grad=True)),
    }


def _apply(kind, m, x, strategy):
    if kind == "linear":
        return DF.linear(x, m.weight, m.bias, gamma=0.5, strategy=strategy, chunk=64)
    return DF.conv2d(x, m.weight, m.bias, padding=1, gamma=0.5, strategy=strategy, chunk=64)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_functions_unpack_each_saved_tensor_once(kind, strategy, autocast):
    m, make_x = _layers()[kind]
    x = make_x()
    with unpack_once() as counts, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _apply(kind, m, x, strategy)
    out.float().sum().backward()
    assert counts and all(c == 1 for c in counts), counts
    assert m.weight.grad is not None and m.weight.grad.dtype == torch.float32 and x.grad is not None


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_converted_model_under_nonreentrant_checkpoint(strategy, autocast):
    # checkpoint's own hooks raise on a second unpack (the crash of the standard fine-tuning recipe)
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    model = dc.convert(block, gamma=0.5, strategy=strategy, chunk=64, skip_first=False)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = checkpoint(model, x, use_reentrant=False)
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fidelity_path_unpacks_once():
    # dc.fidelity keeps the dense input and computes the exact weight gradient beside the DropIT one
    torch.manual_seed(0)
    model = dc.convert(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)), gamma=0.5,
                       skip_first=False)
    x = torch.randn(8, 32)
    for autocast in (False, True):
        with unpack_once() as counts, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            result = dc.fidelity(model, x)
        assert counts and all(c == 1 for c in counts), counts
        assert len(result.layers) == 2
