"""After the first training forward a converted model routes only where it must (see
``dropit_cuda/routing.py``): the mode sees no torch call of a stack of stock layers, only those of
the modules that need it, and coverage, exactness and the report stay what they were."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropit_cuda as dc
from dropit_cuda import routing


class _SharedWeight(nn.Module):
    """Multiplies its submodule's weight itself (as torchvision's Swin does)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias).relu()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.shared = _SharedWeight()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.body(self.stem(x))
        x = self.shared(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x)


def _x():
    return torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))


def _grads(model):
    model.zero_grad(set_to_none=True)
    out = model(_x())
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def mode_calls(monkeypatch):
    """How many torch calls reach a conversion's mode (reset by the test)."""
    count = {"calls": 0}
    original = routing._Router.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        count["calls"] += 1
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(routing._Router, "__torch_function__", counting)
    return count


WEIGHTS = ["stem.weight", "body.0.weight", "body.2.weight", "shared.proj.weight", "attn.in_proj_weight",
           "attn.out_proj.weight", "conv.weight", "head.weight"]


def test_narrowed_forwards_cover_the_same_weights_and_route_only_where_needed(mode_calls):
    torch.manual_seed(0)
    plain = _Net()
    # routing is under test: products whose input is kept anyway (the ReLU's output, MHA's
    # attention output) go through DropIT too, so the gradient signal shows every routed weight
    model = dc.convert(copy.deepcopy(plain), gamma=0.9, dense_where_kept=False)
    out_p, grads_p = _grads(plain)
    calls = []
    for step in range(3):
        mode_calls["calls"] = 0
        out, grads = _grads(model)
        calls.append(mode_calls["calls"])
        assert torch.equal(out, out_p)
        changed = {n for n in grads_p if not torch.equal(grads[n], grads_p[n])}
        # skip_first leaves stem dense; every other product weight goes through DropIT
        assert changed == set(WEIGHTS) - {"stem.weight"}, f"step {step}"
        report = dc.report(model)
        assert {r.name: r.calls for r in report.layers if r.calls} == {
            "body.0": 1, "body.2": 1, "shared.proj": 1, "attn.in_proj_weight": 1, "attn.out_proj": 1,
            "conv": 1, "head": 1}
    # the observed forward routes every call; later ones only the attention's and the
    # shared-weight module's, the same each time
    assert calls[0] > calls[1] == calls[2] > 0, calls
    assert report.forwards == 3


def test_a_stack_of_stock_layers_routes_nothing_after_the_first_forward(mode_calls):
    torch.manual_seed(0)
    model = dc.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    x = torch.randn(4, 6)
    model(x).sum().backward()
    assert mode_calls["calls"] > 0
    mode_calls["calls"] = 0
    model(x).sum().backward()
    assert mode_calls["calls"] == 0
    assert [r.calls for r in dc.report(model).layers] == [0, 1, 1]  # the first is skip_first's


def test_gamma0_narrowed_is_bit_exact():
    torch.manual_seed(0)
    plain = _Net()
    model = dc.convert(copy.deepcopy(plain), gamma=0.0, skip_first=False)
    want = _grads(plain)
    for _ in range(2):
        got = _grads(model)
        assert torch.equal(got[0], want[0]) and all(torch.equal(got[1][n], want[1][n]) for n in want[1])


def test_a_layer_turned_dense_or_dropit_is_observed_again(mode_calls):
    torch.manual_seed(0)
    plain = _Net()
    model = dc.convert(copy.deepcopy(plain), gamma=0.9, skip_first=False)
    _grads(model)
    layer = next(l for l in model._dropit_conversion.layers if l.name == "body.2")
    layer.settings = None  # dense now
    mode_calls["calls"] = 0
    _, grads = _grads(model)
    assert mode_calls["calls"] > 0  # observed again, everything routed
    _, grads_p = _grads(plain)
    assert torch.equal(grads["body.2.weight"], grads_p["body.2.weight"])
    assert not torch.equal(grads["body.0.weight"], grads_p["body.0.weight"])
    layer.settings = dc.Settings(0.9)  # DropIT again: covered on the very next forward
    _, grads = _grads(model)
    assert not torch.equal(grads["body.2.weight"], grads_p["body.2.weight"])


def test_eval_no_grad_and_revert_after_narrowing():
    torch.manual_seed(0)
    plain = _Net()
    model = dc.convert(copy.deepcopy(plain), gamma=0.9)
    _grads(model)
    _grads(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(_x()), plain.eval()(_x()))
    model.train(), plain.train()
    dc.revert(model)
    assert all("forward" not in vars(m) and not m._forward_pre_hooks and not m._forward_hooks
               for m in model.modules())
    out, grads = _grads(model)
    out_p, grads_p = _grads(plain)
    assert torch.equal(out, out_p) and all(torch.equal(grads[n], grads_p[n]) for n in grads_p)


def test_narrowed_model_copies_and_pickles():
    import pickle

    torch.manual_seed(0)
    plain = _Net()
    model = dc.convert(copy.deepcopy(plain), gamma=0.9, dense_where_kept=False)  # (as above)
    _grads(model)
    _grads(model)
    _, grads_p = _grads(plain)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        _, grads = _grads(clone)
        changed = {n for n in grads_p if not torch.equal(grads[n], grads_p[n])}
        assert changed == set(WEIGHTS) - {"stem.weight"}
        # the clone's layers compute with the clone's weights, not the original's
        with torch.no_grad():
            clone.head.weight.zero_()
        assert torch.equal(clone(_x()), clone.head.bias.expand(2, 5, 3))
