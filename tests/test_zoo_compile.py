"""``torch.compile(fullgraph=True)`` of converted third-party models: one graph, DropIT inside it,
gradients as in eager mode (parallel_min_k selects deterministically)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import dropit_cuda as dc
from weight_products import expected_coverage, prepared, train_step

GAMMA = 0.9


@pytest.fixture(autouse=True)
def one_thread(cpu_threads):
    cpu_threads(1)  # tiny models (see test_zoo.py)


@pytest.mark.parametrize("name", ["gpt2", "mamba", pytest.param("swin_t", marks=pytest.mark.slow)])
def test_compiled_converted_model_is_one_graph_and_matches_eager(name):
    model, inputs, calls = prepared(name)
    covered, _ = expected_coverage(list(calls))
    plain = copy.deepcopy(model)
    # a compiled forward decides nothing: products whose input is kept elsewhere stay packed, in
    # the eager reference too
    eager = dc.convert(copy.deepcopy(model), gamma=GAMMA, dense_where_kept=False)
    converted = dc.convert(copy.deepcopy(model), gamma=GAMMA, dense_where_kept=False)
    counter = CompileCounterWithBackend("aot_eager")  # AOTAutograd traces the backward too
    torch._dynamo.reset()
    compiled = torch.compile(converted, backend=counter, fullgraph=True)

    for _ in range(2):  # the second step must reuse the graph of the first
        got = train_step(converted, inputs, forward=compiled)
        want = train_step(eager, inputs)
    ref = train_step(plain, inputs)

    assert counter.frame_count == 1, f"{counter.frame_count} graphs"
    for a, b in zip(got.outputs, want.outputs, strict=True):
        torch.testing.assert_close(a, b)
    for n, g in want.grads.items():
        torch.testing.assert_close(got.grads[n], g, msg=lambda m, n=n: f"{n}: {m}")
    # the compiled graph really caches through DropIT: covered weights' gradients moved
    dense = sorted(n for n in covered if torch.allclose(got.grads[n], ref.grads[n], rtol=1e-2, atol=0))
    assert not dense, f"compiled model multiplies these weights without DropIT: {dense}"
