"""``dc.convert`` on third-party models (small configs, random init, nothing downloaded) covers
every trainable weight the forward pass multiplies, wherever the product is called from.

The signal is independent of the package: ``weight_products.product_calls`` watches the linear/
conv products a plain forward pass makes. DropIT changes only the weight gradients of the products
it covers, so at gamma = 0.9 each of those gradients differs from the plain model's, except the
first layer's (``skip_first``), and every other gradient (the first layer's weight, biases,
norms, embeddings, position tables...) and the forward output are equal bit for bit. All-zero
parameters get small random values first (see ``randomize_zero_parameters``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dropit_cuda as dc
from benchmarks.zoo import ZOO, saved_bytes
from weight_products import expected_coverage, not_covered, prepared, same, train_step

# the slowest build and steps on a 2-core CPU (33 million parameters, 3-D convolutions)
SLOW = {"r3d_18"}
MODELS = [pytest.param(z, id=z.name, marks=[pytest.mark.slow] if z.name in SLOW else []) for z in ZOO]
GAMMA = 0.9


@pytest.fixture(autouse=True)
def one_thread(cpu_threads):
    # tiny models: one thread is fast enough, and on a shared machine several threads spend more
    # time waiting for each other than computing
    cpu_threads(1)


def converted_copy(model: nn.Module, gamma: float, **kwargs) -> nn.Module:
    out = dc.convert(copy.deepcopy(model), gamma=gamma, **kwargs)
    assert out is not model
    return out


def assert_same_outputs(got, want) -> None:
    assert len(got.outputs) == len(want.outputs)
    for a, b in zip(got.outputs, want.outputs):
        assert torch.equal(a, b), "the forward output changed"
    assert torch.equal(got.loss, want.loss)


# Each converted model takes two steps: the first training forward is observed with every torch
# function routed, the second runs with the routing narrowed to where it is needed (see
# dropit_cuda/routing.py); both must cover the same weights and give the same gradients.
STEPS = ("observed", "narrowed")


@pytest.mark.parametrize("spec", MODELS)
def test_dropit_covers_every_trainable_product_weight(spec):
    model, inputs, calls = prepared(spec.name)
    covered, first = expected_coverage(list(calls))
    assert covered, "the probe found nothing to cover"
    want = train_step(copy.deepcopy(model), inputs)
    # routing is under test here: products whose input another op keeps are packed too
    converted = converted_copy(model, GAMMA, dense_where_kept=False)
    for step in STEPS:
        got = train_step(converted, inputs)
        assert_same_outputs(got, want)
        assert want.grads.keys() == got.grads.keys()
        dense = sorted(n for n in covered if same(got.grads[n], want.grads[n]))
        inexact = sorted(n for n in want.grads if n not in covered and not same(got.grads[n], want.grads[n]))
        assert not dense, f"{step} step: weights multiplied in the forward pass but not through DropIT: {dense}"
        assert not inexact, (f"{step} step: gradients that DropIT must leave exact changed: {inexact} "
                             f"(the first layer, kept dense by skip_first, is {sorted(first)})")
    # weights multiplied only by products DropIT leaves dense by design are named in the report
    names = {n: p for n, p in converted.named_parameters()}
    rows = {r.name: r for r in dc.report(converted).layers}
    for n in not_covered(list(calls)):
        owner = next(layer.name for layer in converted._dropit_conversion.layers if layer.current() is names[n])
        assert rows[owner].uncovered and "not covered" in rows[owner].uncovered, rows.get(owner)


@pytest.mark.parametrize("spec", MODELS)
def test_gamma_zero_is_bit_exact(spec):
    model, inputs, _ = prepared(spec.name)
    want = train_step(copy.deepcopy(model), inputs)
    converted = converted_copy(model, 0.0)
    for step in STEPS:
        got = train_step(converted, inputs)
        assert_same_outputs(got, want)
        changed = sorted(n for n in want.grads if not same(got.grads[n], want.grads[n]))
        assert not changed, f"{step} step: gradients differ at gamma=0: {changed}"


@pytest.mark.parametrize("spec", MODELS)
def test_saved_bytes_fall(spec):
    model, inputs, _ = prepared(spec.name)
    plain, converted = copy.deepcopy(model), converted_copy(model, GAMMA)
    for m in (plain, converted):  # the first training step is where skip_first finds its layer
        train_step(m, inputs)
    before, after = saved_bytes(plain, *inputs), saved_bytes(converted, *inputs)
    assert after < before, f"saved for backward: plain {before} B, converted at gamma={GAMMA} {after} B"


def _hooks(model: nn.Module) -> list[tuple]:
    return [(name, len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_pre_hooks),
             len(m._backward_hooks), len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks))
            for name, m in model.named_modules()]


@pytest.mark.parametrize("spec", MODELS)
def test_revert_restores_the_model(spec):
    model, inputs, _ = prepared(spec.name)
    never, model = copy.deepcopy(model), copy.deepcopy(model)
    params = dict(model.named_parameters())
    dc.convert(model, gamma=GAMMA)
    for m in (model, never):  # a training step first: whatever convert sets up lazily is set up
        train_step(m, inputs)
    assert dc.revert(model) is model

    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in never.named_modules()]
    assert _hooks(model) == _hooks(never)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters()), "parameters were replaced"
    got_state, want_state = model.state_dict(), never.state_dict()
    assert list(got_state) == list(want_state)
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    # DropIT still running anywhere would change a weight gradient at gamma = 0.9
    got, want = train_step(model, inputs), train_step(never, inputs)
    assert_same_outputs(got, want)
    assert all(same(got.grads[n], want.grads[n]) for n in want.grads)


@pytest.mark.parametrize("name", ["vit", "gpt2"])
def test_frozen_weights_cache_nothing(name):
    # every product weight frozen: nothing to compute a weight gradient for, so nothing to cache
    model, inputs, calls = prepared(name)
    model = copy.deepcopy(model)
    frozen = {n for c in calls for n in c.params}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    plain, converted = copy.deepcopy(model), converted_copy(model, GAMMA)
    want, got = train_step(plain, inputs), train_step(converted, inputs)

    assert_same_outputs(got, want)
    assert all(same(got.grads[n], want.grads[n]) for n in want.grads)
    before, after = saved_bytes(plain, *inputs), saved_bytes(converted, *inputs)
    assert after <= before, f"frozen layers cached {after - before} B more"
