"""A converted model under torch's other ways of differentiating and running: forward-mode AD,
``torch.func`` transforms, double backward, and several threads at once."""

import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vmap

import dropit_cuda as dc


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 4))


MODELS = {"mlp": (_mlp, (4, 16)), "cnn": (_cnn, (2, 3, 5, 5))}


def _pair(name, gamma):
    make, shape = MODELS[name]
    return make(), dc.convert(make(), gamma=gamma, skip_first=False, chunk=32), shape


def _params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(MODELS))
def test_func_grad_equals_eager_backward(name):
    # torch.func.grad runs the same DropIT backward as .backward(): same weight gradients
    _, model, shape = _pair(name, 0.7)
    x = torch.randn(shape)
    got = grad(lambda p: functional_call(model, p, (x,)).square().sum())(_params(model))
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert torch.equal(got[n], p.grad), n
    plain, _, _ = _pair(name, 0.7)
    plain(x).square().sum().backward()
    # DropIT did run under the transform: the weight gradients are not the plain ones
    assert not torch.equal(got["0.weight"], plain[0].weight.grad)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_ad_matches_plain_model(name):
    # the forward tangent never needs the cache: at gamma = 0.9 it is the plain model's
    plain, model, shape = _pair(name, 0.9)
    x, tx = torch.randn(shape), torch.randn(shape)
    tangents = {n: torch.randn_like(p) for n, p in plain.named_parameters()}
    outs = []
    for m in (plain, model):
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p.detach(), tangents[n]) for n, p in m.named_parameters()}
            out = functional_call(m, duals, (fwAD.make_dual(x, tx),))
            outs.append(fwAD.unpack_dual(out))
    assert torch.equal(outs[1].primal, outs[0].primal)
    # the product rule's terms are summed in another order than torch's own formula
    torch.testing.assert_close(outs[1].tangent, outs[0].tangent, rtol=1e-5, atol=1e-6)
    _, want = jvp(lambda inp: plain(inp), (x,), (tx,))
    _, got = jvp(lambda inp: model(inp), (x,), (tx,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_forward_ad_under_autocast():
    plain, model, shape = _pair("mlp", 0.9)
    x, tx = torch.randn(shape), torch.randn(shape)
    outs = []
    for m in (plain, model):
        with fwAD.dual_level(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(fwAD.make_dual(x, tx))
            outs.append(fwAD.unpack_dual(out))
    assert torch.equal(outs[1].primal, outs[0].primal)
    assert outs[1].tangent.dtype == outs[0].tangent.dtype == torch.bfloat16
    torch.testing.assert_close(outs[1].tangent, outs[0].tangent, rtol=2e-2, atol=1e-2)


def test_vmap_error_names_dropit_and_the_way_out():
    _, model, shape = _pair("mlp", 0.5)
    x = torch.randn(shape)
    per_sample = vmap(grad(lambda p, xi: functional_call(model, p, (xi[None],)).sum()), in_dims=(None, 0))
    with pytest.raises(RuntimeError, match=r"dropit_cuda.*vmap.*dropit_cuda\.revert"):
        per_sample(_params(model), x)
    dc.revert(model)  # what the message says to do works
    assert per_sample(_params(model), x)["0.weight"].shape == (4, 32, 16)


def test_double_backward_raises_only_when_taken():
    _, model, shape = _pair("mlp", 0.5)
    x = torch.randn(shape, requires_grad=True)
    out = model(x).square().sum()
    (gx,) = torch.autograd.grad(out, x, create_graph=True)  # a gradient penalty's first step works
    with pytest.raises(RuntimeError, match="DropIT layers do not support double backward"):
        gx.square().sum().backward()
    with pytest.raises(RuntimeError, match="double backward"):
        grad(grad(lambda xi: model(xi).sum()))(torch.randn(16))


@pytest.mark.parametrize("name", list(MODELS))
def test_one_model_trained_from_two_threads(name):
    # per-thread forward state: each thread's gradients are those of the same step run alone
    _, model, shape = _pair(name, 0.5)
    params = [p for p in model.parameters()]
    inputs = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    alone = [torch.autograd.grad(model(x).square().sum(), params) for x in inputs]
    results, errors = [None, None], []

    def work(i):
        try:
            for _ in range(30):
                results[i] = torch.autograd.grad(model(inputs[i]).square().sum(), params)
        except Exception as e:  # noqa: BLE001 - reported below with its thread
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert all(torch.equal(g, w) for g, w in zip(results[i], alone[i]))


class _Experts(nn.Module):
    """Per-expert weights applied with bmm and einsum (products DropIT routes besides linear/conv)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 8) * 0.3)
        self.v = nn.Parameter(torch.randn(8, 4) * 0.3)

    def forward(self, x):  # x: (3, tokens, 8)
        return torch.einsum("etd,df->etf", torch.bmm(x, self.w).relu(), self.v)


def test_forward_ad_through_expert_products_is_torchs_own():
    torch.manual_seed(0)
    plain = _Experts()
    model = dc.convert(_Experts(), gamma=0.9, skip_first=False, chunk=16)
    model.load_state_dict(plain.state_dict())
    x, tx = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    model(x).sum().backward()  # a training step: DropIT covers both weights
    plain(x).sum().backward()
    assert not torch.equal(model.w.grad, plain.w.grad) and not torch.equal(model.v.grad, plain.v.grad)
    outs = []
    for m in (plain, model):
        with fwAD.dual_level():
            outs.append(fwAD.unpack_dual(m(fwAD.make_dual(x, tx))))
    assert torch.equal(outs[1].primal, outs[0].primal) and torch.equal(outs[1].tangent, outs[0].tangent)
