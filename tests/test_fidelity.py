"""dc.fidelity, dc.tune, dc.FidelityMonitor.

The references are computed here, independently of the implementation: the exact weight gradient
from a plain copy of the model, the DropIT one from a converted copy (both with ``.backward()``
into ``.grad``), cosines and relative errors in plain float64 torch, bytes from ``dc.report`` of a
model converted with the settings in question.
"""

import copy
import math
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dropit_cuda as dc
from dropit_cuda import strategies

try:  # the demo's network (moved into the demo package by the demo's text-task rework)
    from dropit_cuda.demo.digits import DigitsResNet
except ImportError:
    from dropit_cuda.demo import DigitsResNet


# --- models, data and the independent reference --------------------------------------------------


class _Net(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> pool -> linear -> ReLU -> linear: every layer after the
    first sees post-ReLU data (and so does the first, given post-ReLU input)."""

    def __init__(self, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Linear(width, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        h = self.body(self.stem(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


NET_LAYERS = ["stem", "body.1", "fc1", "fc2"]


def _x(n=16, seed=1):
    return torch.relu(torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)))


def _labels(n=16, classes=5, seed=2):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _ce(labels):
    return lambda out: F.cross_entropy(out, labels)


def _mean_square(out):
    return out.float().square().mean()


def _weight_grads(model, args, loss_fn):
    """``{parameter name: .grad}`` after one plain ``loss_fn(model(*args)).backward()``."""
    model.zero_grad(set_to_none=True)
    loss_fn(model(*args)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _cos_rel(d, e):
    d, e = d.double().flatten(), e.double().flatten()
    return float(d @ e / (d.norm() * e.norm())), float((d - e).norm() / e.norm())


def _reference(plain, converted, args, loss_fn, layers, seed=0):
    """Per layer (``name`` -> parameter ``name.weight``) and over all of them concatenated: the
    cosine and relative error of the converted model's weight gradient against the plain one's."""
    torch.manual_seed(seed)
    exact = _weight_grads(plain, args, loss_fn)
    torch.manual_seed(seed)
    dropit = _weight_grads(converted, args, loss_fn)
    per_layer = {n: _cos_rel(dropit[f"{n}.weight"], exact[f"{n}.weight"]) for n in layers}
    model = _cos_rel(torch.cat([dropit[f"{n}.weight"].flatten() for n in layers]),
                     torch.cat([exact[f"{n}.weight"].flatten() for n in layers]))
    return per_layer, model


def _rows(rep):
    return {r.name: r for r in rep.layers}


# --- fidelity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", dc.STRATEGIES)
def test_gamma0_every_layer_is_exact(strategy):
    plain = _Net()
    m = dc.convert(copy.deepcopy(plain), gamma=0.0, strategy=strategy, chunk=64, skip_first=False)
    rep = dc.fidelity(m, _x(), loss_fn=_ce(_labels()))
    assert [r.name for r in rep.measured] == NET_LAYERS
    assert all(r.cosine == 1.0 and r.rel_error == 0.0 for r in rep.layers)
    assert rep.cosine == 1.0 and rep.rel_error == 0.0
    # the reference agrees: at gamma 0 the gradients are the plain ones, bit for bit
    exact, dropit = _weight_grads(plain, (_x(),), _ce(_labels())), _weight_grads(m, (_x(),), _ce(_labels()))
    assert all(torch.equal(exact[f"{n}.weight"], dropit[f"{n}.weight"]) for n in NET_LAYERS)


@pytest.mark.parametrize("strategy, gamma", [("parallel_min_k", 0.7), ("random", 0.8), ("min_k_channel", 0.5)])
def test_numbers_equal_the_independent_computation(strategy, gamma):
    plain = _Net()
    m = dc.convert(copy.deepcopy(plain), gamma=gamma, strategy=strategy, chunk=128, skip_first=False)
    loss_fn = _ce(_labels())
    torch.manual_seed(3)  # the random strategies draw their seeds from here, in both runs
    rep = dc.fidelity(m, _x(), loss_fn=loss_fn)
    per_layer, model = _reference(plain, copy.deepcopy(m), (_x(),), loss_fn, NET_LAYERS, seed=3)
    rows = _rows(rep)
    for name, (cos, rel) in per_layer.items():
        assert rows[name].cosine == pytest.approx(cos, rel=1e-9, abs=1e-12), name
        assert rows[name].rel_error == pytest.approx(rel, rel=1e-9, abs=1e-12), name
        assert (rows[name].gamma, rows[name].strategy) == (gamma, strategy)
    assert rep.cosine == pytest.approx(model[0], rel=1e-9) and rep.cosine < 1.0  # something was dropped
    assert rep.rel_error == pytest.approx(model[1], rel=1e-9)
    with torch.no_grad():
        assert rep.loss == pytest.approx(float(loss_fn(plain(_x()))), rel=1e-6)
    # the bytes are those of the layer inputs (fp32), dense and as cached
    assert rows["fc1"].dense_bytes == 16 * 8 * 4
    assert rep.cached_bytes == sum(r.cached_bytes for r in rep.layers) < rep.dense_bytes


class _Shared(nn.Module):
    """One linear layer used three times in a forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 24)
        self.shared = nn.Linear(24, 24)
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for _ in range(3):
            h = torch.relu(self.shared(h))
        return self.out(h)


def test_shared_weight_sums_over_its_uses():
    plain = _Shared()
    m = dc.convert(copy.deepcopy(plain), gamma=0.8, chunk=48)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(4))
    rep = dc.fidelity(m, x)
    per_layer, _ = _reference(plain, copy.deepcopy(m), (x,), _mean_square, ["shared", "out"])
    rows = _rows(rep)
    assert rows["shared"].calls == 3
    assert rows["shared"].dense_bytes == 3 * 10 * 24 * 4
    for name, (cos, rel) in per_layer.items():
        assert rows[name].cosine == pytest.approx(cos, rel=1e-6)
        assert rows[name].rel_error == pytest.approx(rel, rel=1e-6)


def test_dense_layers_are_listed_as_dense():
    m = dc.convert(_Net(), gamma={"fc2": None, "*": 0.9}, exclude="fc1")
    rep = dc.fidelity(m, _x())
    rows = _rows(rep)
    assert {n: rows[n].dense_reason for n in NET_LAYERS} == {
        "stem": "skip_first", "body.1": None, "fc1": "excluded", "fc2": "per-layer setting"}
    for n in ("stem", "fc1", "fc2"):
        assert rows[n].cosine is None and rows[n].rel_error is None and rows[n].gamma is None
    assert [r.name for r in rep.measured] == ["body.1"]
    assert rep.cosine == rows["body.1"].cosine  # the model figures cover the DropIT layers only
    text = str(rep)
    assert "dense (skip_first)" in text and "dense (excluded)" in text and "dense (per-layer setting)" in text


def test_corrupted_cache_shows_low_cosine(monkeypatch):
    # body.1 alone uses min_k; corrupting min_k's unpack corrupts that layer's cache only
    def convert():
        return dc.convert(_Net(), gamma=0.5, strategy={"body.1": "min_k", "*": "parallel_min_k"}, skip_first=False)

    clean = _rows(dc.fidelity(convert(), _x()))
    original = strategies.MinK.unpack

    def noise(self, tensors, meta):  # the cache replaced by noise of the same scale
        out = original(self, tensors, meta)
        return torch.randn(out.shape, generator=torch.Generator().manual_seed(0)) * out.std()

    monkeypatch.setattr(strategies.MinK, "unpack", noise)
    corrupted = _rows(dc.fidelity(convert(), _x()))
    assert clean["body.1"].cosine > 0.9
    assert abs(corrupted["body.1"].cosine) < 0.3
    assert corrupted["body.1"].rel_error > 0.9
    for n in ("stem", "fc1", "fc2"):  # the others still get exact input gradients
        assert corrupted[n].cosine == clean[n].cosine


def test_parallel_min_k_beats_random_on_post_relu_data():
    plain = _Net(width=16)
    x, loss_fn = _x(32), _ce(_labels(32))
    results = {}
    for strategy in ("parallel_min_k", "random"):
        m = dc.convert(copy.deepcopy(plain), gamma=0.9, strategy=strategy, chunk=256, skip_first=False)
        results[strategy], _ = _reference(plain, m, (x,), loss_fn, NET_LAYERS)
        fid = _rows(dc.fidelity(m, x, loss_fn=loss_fn))
        if strategy == "parallel_min_k":  # deterministic: fidelity sees the same cosines
            assert all(fid[n].cosine == pytest.approx(results[strategy][n][0], rel=1e-9) for n in NET_LAYERS)
    for n in NET_LAYERS:
        assert results["parallel_min_k"][n][0] > results["random"][n][0], n


class _WithState(nn.Module):
    """Batch norm (buffers), dropout (random state), a submodule left in eval mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.frozen_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.drop(torch.relu(self.frozen_bn(self.bn(self.conv(x)))))
        return self.fc(h.mean((2, 3)))


def test_grads_random_state_buffers_modes_and_report_untouched():
    m = dc.convert(_WithState(), gamma=0.8, strategy="random", skip_first=False)
    m.frozen_bn.eval()
    m(_x())  # a training step's forward: the report speaks of it
    m.fc.weight.grad = torch.full_like(m.fc.weight, 7.0)
    grad_obj = m.fc.weight.grad
    m.conv.bias.grad = torch.ones_like(m.conv.bias)
    before = {
        "grads": {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in m.named_parameters()},
        "buffers": {n: b.clone() for n, b in m.named_buffers()},
        "modes": {n: mod.training for n, mod in m.named_modules()},
        "report": dc.report(m).to_dict(),
    }
    rng = torch.get_rng_state()
    rep = dc.fidelity(m, _x(8, seed=5))
    assert rep.measured and rep.cosine < 1.0
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in m.named_parameters():
        obj, value = before["grads"][n]
        assert p.grad is obj, n  # None stays None, a tensor stays that very tensor
        assert value is None or torch.equal(p.grad, value), n
    assert m.fc.weight.grad is grad_obj
    assert all(torch.equal(b, before["buffers"][n]) for n, b in m.named_buffers())
    assert {n: mod.training for n, mod in m.named_modules()} == before["modes"]
    assert dc.report(m).to_dict() == before["report"]


def test_checkpointed_blocks_give_the_same_figures():
    class Ckpt(_Net):
        def forward(self, x):
            h = torch.utils.checkpoint.checkpoint(lambda t: self.body(self.stem(t)), x, use_reentrant=False)
            return self.fc2(torch.relu(self.fc1(h.mean((2, 3)))))

    plain_rep = dc.fidelity(dc.convert(_Net(), gamma=0.8, skip_first=False), _x())
    ckpt_rep = dc.fidelity(dc.convert(Ckpt(), gamma=0.8, skip_first=False), _x())
    assert [(r.name, r.calls) for r in plain_rep.layers] == [(r.name, r.calls) for r in ckpt_rep.layers]
    assert [r.cosine for r in plain_rep.layers] == pytest.approx([r.cosine for r in ckpt_rep.layers], rel=1e-9)


def test_default_loss_is_the_mean_square_or_the_outputs_loss():
    plain = _Net()
    m = dc.convert(copy.deepcopy(plain), gamma=0.7, skip_first=False)
    rep = dc.fidelity(m, _x())
    with torch.no_grad():
        assert rep.loss == pytest.approx(float(plain(_x()).square().mean()), rel=1e-6)
    per_layer, _ = _reference(plain, copy.deepcopy(m), (_x(),), _mean_square, NET_LAYERS)
    assert [r.cosine for r in rep.measured] == pytest.approx([per_layer[n][0] for n in NET_LAYERS], rel=1e-9)

    class HFLike(nn.Module):  # an output object with .logits, and .loss when labels are given
        def __init__(self):
            super().__init__()
            self.net = _Net()

        def forward(self, x, labels=None):
            logits = self.net(x)
            loss = None if labels is None else F.cross_entropy(logits, labels)
            return types.SimpleNamespace(logits=logits, loss=loss)

    hf = dc.convert(HFLike(), gamma=0.7, skip_first=False)
    with_labels = dc.fidelity(hf, _x(), labels=_labels())
    with torch.no_grad():
        assert with_labels.loss == pytest.approx(float(F.cross_entropy(plain(_x()), _labels())), rel=1e-6)
    assert dc.fidelity(hf, _x()).loss == pytest.approx(rep.loss, rel=1e-6)  # mean square of .logits


def test_input_modified_in_place_after_use_raises():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x).relu()
            out = self.b(h)
            h.mul_(2)  # b's input, changed after b used it
            return out + h.sum()

    m = dc.convert(InPlace(), gamma=0.5, relu_mask=False)
    with pytest.raises(RuntimeError, match="modified in place"):
        dc.fidelity(m, torch.randn(3, 4))


def test_report_table_dict_and_plot(tmp_path):
    m = dc.convert(_Net(), gamma=0.8)
    rep = dc.fidelity(m, _x())
    text = str(rep)
    for r in rep.measured:
        assert r.name in text and f"{r.cosine:.4f}" in text
    assert "(all DropIT layers)" in text and f"{rep.cosine:.4f}" in text
    d = rep.to_dict()
    assert [row["cosine"] for row in d["layers"]] == [r.cosine for r in rep.layers]
    assert (d["cosine"], d["cached_bytes"], d["dense_bytes"]) == (rep.cosine, rep.cached_bytes, rep.dense_bytes)
    pytest.importorskip("matplotlib")
    path = rep.plot(str(tmp_path / "fidelity.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    rep = dc.fidelity(dc.convert(_Net(), gamma=0.8), _x())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"dropit_cuda\[demo\]"):
        rep.plot(str(tmp_path / "x.png"))


def test_fidelity_bad_arguments():
    m = dc.convert(_Net(), gamma=0.8)
    with pytest.raises(TypeError, match="model"):
        dc.fidelity(torch.randn(2), _x())
    with pytest.raises(ValueError, match="not converted"):
        dc.fidelity(_Net(), _x())
    with pytest.raises(TypeError, match="loss_fn"):
        dc.fidelity(m, _x(), loss_fn=3)
    with pytest.raises(ValueError, match="loss_fn.*scalar"):
        dc.fidelity(m, _x(), loss_fn=lambda out: out.sum(0))
    with pytest.raises(TypeError, match="loss_fn must return a tensor"):
        dc.fidelity(m, _x(), loss_fn=lambda out: 1.0)
    with pytest.raises(TypeError, match="loss_fn"):  # no default loss for a tuple output
        dc.fidelity(dc.convert(nn.Sequential(_Net(), _Pair()), gamma=0.8), _x())
    m.eval()
    with pytest.raises(ValueError, match="training mode"):
        dc.fidelity(m, _x())
    m.train()
    assert all(p.grad is None for p in m.parameters())


class _Pair(nn.Module):
    def forward(self, x):
        return x, x


# --- tune ----------------------------------------------------------------------------------------


def _layer_cosines(plain, spec, args, loss_fn, layers, **convert_kwargs):
    """The reference cosine of each layer with ``plain`` converted by ``gamma=spec``."""
    m = dc.convert(copy.deepcopy(plain), gamma=spec, **convert_kwargs)
    return _reference(plain, m, args, loss_fn, layers)[0]


def _cached_bytes(plain, spec, args, layers, **convert_kwargs):
    """Bytes ``layers`` of the converted copy cache in one training forward: DropIT layers from
    the report, layers the spec keeps dense at their whole input (seen by a forward pre-hook)."""
    m = dc.convert(copy.deepcopy(plain), gamma=spec, **convert_kwargs)
    inputs = {}
    for name, mod in m.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            mod.register_forward_pre_hook(lambda mod, a, name=name: inputs.__setitem__(name, a[0].nbytes))
    m(*args)
    total = 0
    for r in dc.report(m).layers:
        if r.name in layers:
            total += r.cached_bytes if r.gamma is not None else inputs[r.name]
    return total


def test_tune_meets_its_floor_on_its_batch():
    plain = _Net(width=16)
    x, loss_fn = _x(32), _ce(_labels(32))
    kw = dict(strategy="parallel_min_k", chunk=256, skip_first=False)
    m = dc.convert(copy.deepcopy(plain), gamma=0.9, **kw)
    plan = dc.tune(m, x, loss_fn=loss_fn, min_cosine=0.95)
    assert set(plan) == set(NET_LAYERS)
    assert dc.report(m).layers[0].gamma == 0.9  # the model's own settings are back
    tuned = {r.name: r for r in plan.layers}
    assert any(r.gamma is not None for r in tuned.values())
    assert len({r.gamma for r in tuned.values()}) > 1  # per layer, not one γ for all
    reference = _layer_cosines(plain, plan, (x,), loss_fn, NET_LAYERS, **kw)
    for name, row in tuned.items():
        if row.gamma is None:
            assert "below the floor at every" in row.reason and max(row.cosines.values()) < 0.95
        else:
            assert reference[name][0] >= 0.95, name
            assert reference[name][0] == pytest.approx(row.cosine, rel=1e-9)  # layers don't interact
            bigger = [g for g in row.cosines if g > row.gamma]
            assert all(row.cosines[g] < 0.95 for g in bigger), name  # the largest γ that passes
    # applied as convert's gamma spec, each layer gets its planned γ
    applied = {r.name: r.gamma for r in dc.report(dc.convert(copy.deepcopy(plain), gamma=plan, **kw)).layers}
    assert applied == {n: r.gamma for n, r in tuned.items()}


def test_tune_plan_caches_no_more_than_the_uniform_gamma_with_the_same_floor():
    torch.manual_seed(0)
    plain = DigitsResNet(width=8)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    loss_fn = _ce(_labels(32, classes=10))
    kw = dict(chunk=512)
    m = dc.convert(copy.deepcopy(plain), gamma=0.9, **kw)
    floor = 0.8
    plan = dc.tune(m, x, loss_fn=loss_fn, min_cosine=floor, gammas=(0.5, 0.7, 0.8, 0.9))
    layers = [r.name for r in plan.tuned]
    assert layers == [r.name for r in dc.report(m).layers if r.gamma is not None]
    # the uniform γ whose worst layer meets the same floor, found independently
    worst = {g: min(c for c, _ in _layer_cosines(plain, g, (x,), loss_fn, layers, **kw).values())
             for g in (0.5, 0.7, 0.8, 0.9)}
    best_uniform = max(g for g in worst if worst[g] >= floor)
    assert plan.best_uniform.gamma == best_uniform
    assert [u.worst_cosine for u in plan.uniform] == pytest.approx([worst[g] for g in (0.5, 0.7, 0.8, 0.9)],
                                                                   rel=1e-9)
    plan_bytes = _cached_bytes(plain, plan, (x,), layers, **kw)
    uniform_bytes = _cached_bytes(plain, best_uniform, (x,), layers, **kw)
    assert plan_bytes <= uniform_bytes
    assert plan_bytes < uniform_bytes  # and here strictly fewer: some layers take a larger γ
    # the plan's byte accounting (strategy nbytes from the recorded shapes) is what gets cached
    # layers reading one tensor with the same settings share one pack (layer2's shortcut and conv1
    # here), which the per-layer prediction counts once per layer: an upper bound
    assert plan.cached_bytes >= plan_bytes
    assert {u.gamma: u.cached_bytes for u in plan.uniform}[best_uniform] >= uniform_bytes


class _Tricky(nn.Module):
    """Layers whose names are fnmatch patterns of each other (``a[1]`` would match ``a1``), a
    module with a weight of its own and a child layer, a very sparse input and a dense one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.d = nn.ModuleDict({"a[1]": nn.Linear(100, 8), "a1": nn.Linear(100, 8)})
        self.outer = _Outer()

    def forward(self, sparse, dense):
        return self.d["a1"](sparse) + self.d["a[1]"](dense) + self.outer(dense)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 100) / 10)
        self.inner = nn.Linear(100, 8)

    def forward(self, x):
        return F.linear(x, self.weight) + self.inner(torch.relu(x))


def _tricky_inputs():
    gen = torch.Generator().manual_seed(7)
    sparse = torch.zeros(12, 100)
    sparse[:, :3] = torch.randn(12, 3, generator=gen) + 3  # 3 non-zeros per row of 100
    return sparse, torch.randn(12, 100, generator=gen)


def test_tune_explains_ties_and_failures_and_escapes_names():
    plain = _Tricky()
    kw = dict(chunk=100, skip_first=False)
    m = dc.convert(copy.deepcopy(plain), gamma=0.9, **kw)
    plan = dc.tune(m, *_tricky_inputs(), min_cosine=0.999)
    rows = {r.name: r for r in plan.layers}
    # 3 non-zeros of 100 survive every candidate γ: cosine 1 at all of them, a tie
    assert rows["d.a1"].cosines == {g: 1.0 for g in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)}
    assert rows["d.a1"].gamma == 0.95 and "tie" in rows["d.a1"].reason
    # a dense Gaussian input loses too much at γ=0.5 for a 0.999 floor: kept dense, and said why
    assert rows["d.a[1]"].gamma is None and "kept dense" in rows["d.a[1]"].reason
    assert rows["outer"].gamma is None and rows["outer.inner"].gamma is not None
    # exact names, metacharacters escaped, children first: each layer gets its own γ
    assert plan["d.a[[]1]"] is None and plan["d.a1"] == 0.95
    assert list(plan).index("outer.inner") < list(plan).index("outer")
    applied = {r.name: r.gamma for r in dc.report(dc.convert(copy.deepcopy(plain), gamma=plan, **kw)).layers}
    assert applied == {"d.a[1]": None, "d.a1": 0.95, "outer.inner": rows["outer.inner"].gamma}
    # outer (not a layer type, listed only when used) is dense: its gradient is the plain one
    exact = _weight_grads(plain, _tricky_inputs(), _mean_square)
    dropit = _weight_grads(dc.convert(copy.deepcopy(plain), gamma=plan, **kw), _tricky_inputs(), _mean_square)
    assert torch.equal(dropit["outer.weight"], exact["outer.weight"])
    assert torch.equal(dropit["d.a[1].weight"], exact["d.a[1].weight"])
    text = str(plan)
    assert "tie" in text and "kept dense" in text and "uniform γ=0.95" in text
    assert plan.to_dict()["gamma"] == dict(plan)


def test_tune_bad_arguments():
    m = dc.convert(_Net(), gamma=0.8)
    for kwargs, exc, match in [
        (dict(min_cosine=1.5), ValueError, "min_cosine"),
        (dict(min_cosine="high"), TypeError, "min_cosine"),
        (dict(min_cosine=math.nan), ValueError, "min_cosine"),
        (dict(gammas=()), ValueError, "gammas"),
        (dict(gammas=(0.5, 1.0)), ValueError, r"gammas\[1\]"),
        (dict(gammas=0.5), TypeError, "gammas"),
        (dict(gammas="0.5"), TypeError, "gammas"),
        (dict(loss_fn="ce"), TypeError, "loss_fn"),
    ]:
        with pytest.raises(exc, match=match):
            dc.tune(m, _x(), **kwargs)
    with pytest.raises(ValueError, match="not converted"):
        dc.tune(_Net(), _x())


# --- the monitor ---------------------------------------------------------------------------------


class _Writer:
    """A stand-in for a TensorBoard SummaryWriter: records add_scalar calls."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def _train(model, steps, monitor=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = _x(8, seed=10 + step), _labels(8, classes=4, seed=20 + step)
        if monitor is not None:
            monitor.step(x)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_monitor_reports_every_n_steps_and_changes_nothing():
    make = lambda: dc.convert(_WithState(), gamma=0.8, strategy="random")  # noqa: E731
    model = make()
    torch.manual_seed(1)
    without = _train(model, 7)

    seen, writer = [], _Writer()
    model = make()

    def callback(step, rep):
        seen.append((step, rep))

    monitor = dc.FidelityMonitor(model, every=3, writer=writer, callback=callback)
    torch.manual_seed(1)
    with_monitor = _train(model, 7, monitor)
    assert [s for s, _ in seen] == [0, 3, 6]
    assert monitor.last is seen[-1][1]
    assert all(torch.equal(with_monitor[n], without[n]) for n in without)  # training untouched
    model_cos = [(v, s) for t, v, s in writer.scalars if t == "dropit/model/cosine"]
    assert model_cos == [(rep.cosine, s) for s, rep in seen]
    layer_tags = {t for t, _, _ in writer.scalars if t.startswith("dropit/cosine/")}
    assert layer_tags == {f"dropit/cosine/{r.name}" for r in seen[0][1].measured} == {"dropit/cosine/fc"}
    # start_step shifts the count: steps 1..5 report at 3 only
    steps = []
    late = dc.FidelityMonitor(model, every=3, callback=lambda s, r: steps.append(s), start_step=1)
    for _ in range(5):
        late.step(_x(4))
    assert steps == [3]


def test_monitor_bad_arguments():
    m = dc.convert(_Net(), gamma=0.8)
    for kwargs, exc, match in [
        (dict(every=0), ValueError, "every"),
        (dict(every=2.0), TypeError, "every"),
        (dict(every=True), TypeError, "every"),
        (dict(every=2, writer=object()), TypeError, "writer"),
        (dict(every=2, callback=3), TypeError, "callback"),
        (dict(every=2, loss_fn=3), TypeError, "loss_fn"),
        (dict(every=2, start_step=-1), ValueError, "start_step"),
    ]:
        with pytest.raises(exc, match=match):
            dc.FidelityMonitor(m, **kwargs)
    with pytest.raises(ValueError, match="not converted"):
        dc.FidelityMonitor(_Net(), every=2)


def test_fidelity_as_the_first_forward_leaves_the_relu_decisions_to_training():
    # the dense inputs fidelity holds would make every ReLU output look kept by another op
    def decisions(with_fidelity_first):
        m = dc.convert(_Net(), gamma=0.8)
        if with_fidelity_first:
            dc.fidelity(m, _x())
            assert all(v.startswith("masked (undecided") for v in dc.report(m).relus.values())
        m(_x())
        return dc.report(m).relus

    assert decisions(True) == decisions(False)
    assert "masked" in decisions(False).values()
