"""convert / revert / report: coverage by what runs, skip_first, patterns, per-layer settings,
warnings, errors that change nothing, the ReLU swap that never costs memory."""

import copy
import pickle
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dropit_cuda as dc
from cases import grad_fn_names, grads_after_step, saved_bytes, weights_changed_by_dropit

torchvision = pytest.importorskip("torchvision")  # a test dependency (requirements-test.txt)


class _Small(nn.Module):
    """Conv -> ReLU -> conv -> pool -> linear, with names that patterns can pick."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def _x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_convert_in_place_keeps_modules_parameters_and_state():
    m = _Small()
    params = dict(m.named_parameters())
    state = {k: v.clone() for k, v in m.state_dict().items()}
    types = [type(x) for x in m.modules()]
    out = dc.convert(m, gamma=0.5, strategy="min_k", chunk=128)
    assert out is m
    assert [type(x) for x in m.modules()] == [dc.MaskedReLU if t is nn.ReLU else t for t in types]
    assert all(p is params[n] for n, p in m.named_parameters())
    assert m.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    # a state dict saved from a plain model loads into the converted one and back
    m.load_state_dict(_Small().state_dict())
    _Small().load_state_dict(m.state_dict())


def test_gamma0_is_bit_exact():
    plain = _Small()
    m = dc.convert(copy.deepcopy(plain), gamma=0.0, skip_first=False)
    loss_m, grads_m = grads_after_step(m, _x())
    loss_p, grads_p = grads_after_step(plain, _x())
    assert torch.equal(loss_m, loss_p)
    assert grads_m.keys() == grads_p.keys()
    assert all(torch.equal(grads_m[k], grads_p[k]) for k in grads_p)


def test_coverage_by_gradient_signal_and_skip_first():
    # an independent signal: DropIT changes exactly the weight gradients of covered weights
    changed = weights_changed_by_dropit(_Small, lambda m: dc.convert(m, gamma=0.9), _x)
    assert changed == {"body.1.weight", "body.3.weight", "head.weight"}  # stem: the first layer
    changed = weights_changed_by_dropit(_Small, lambda m: dc.convert(m, gamma=0.9, skip_first=False), _x)
    assert changed == {"stem.weight", "body.1.weight", "body.3.weight", "head.weight"}


class _HeadFirst(nn.Module):
    """Registers the head before the stem, so registration order is not call order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(6, 2)
        self.bn = nn.BatchNorm1d(6)
        self.stem = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.stem(x))))


def test_skip_first_is_the_first_layer_the_input_reaches():
    x = lambda: torch.randn(3, 4, generator=torch.Generator().manual_seed(2))  # noqa: E731
    assert weights_changed_by_dropit(_HeadFirst, lambda m: dc.convert(m, gamma=0.9), x) == {"head.weight"}
    m = dc.convert(_HeadFirst(), gamma=0.9)
    assert dc.report(m).first is None  # decided on the first training forward
    m(x())
    assert dc.report(m).first == "stem"


def test_skip_first_from_example_inputs_restores_state():
    m = _HeadFirst()
    m.train()
    m.stem.eval()
    stats = [b.clone() for b in m.buffers()]
    x = torch.randn(3, 4)
    rng = torch.get_rng_state()
    dc.convert(m, gamma=0.9, example_inputs=x)
    assert dc.report(m).first == "stem"
    assert m.training and not m.stem.training and m.head.training  # modes restored
    assert all(torch.equal(a, b) for a, b in zip(stats, m.buffers()))  # batch-norm statistics too
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(r.calls == 0 for r in dc.report(m).layers)  # the probe is not "the last forward"


def test_include_exclude_patterns():
    conv = lambda **kw: lambda m: dc.convert(m, gamma=0.9, skip_first=False, **kw)  # noqa: E731
    assert weights_changed_by_dropit(_Small, conv(include="body"), _x) == {"body.1.weight", "body.3.weight"}
    assert weights_changed_by_dropit(_Small, conv(exclude=["body.*", "head"]), _x) == {"stem.weight"}
    assert weights_changed_by_dropit(_Small, conv(include=["body.?"], exclude="body.3"), _x) == {"body.1.weight"}
    m = dc.convert(_Small(), include="head")
    assert type(m.body[0]) is nn.ReLU  # ReLUs follow the patterns too


def test_per_layer_settings_patterns_callables_and_none():
    m = dc.convert(_Small(), skip_first=False,
                   gamma={"body.1": 0.5, "body.*": 0.8, "head": None},
                   strategy=lambda name, module: "min_k" if isinstance(module, nn.Linear) else "parallel_min_k",
                   chunk={"stem": 64})
    rows = {r.name: r for r in dc.report(m).layers}
    assert (rows["body.1"].gamma, rows["body.3"].gamma, rows["stem"].gamma) == (0.5, 0.8, 0.9)  # first match
    assert rows["head"].gamma is None and rows["head"].dense_reason == "per-layer setting"
    assert (rows["stem"].chunk, rows["body.1"].chunk) == (64, 16384)
    assert weights_changed_by_dropit(_Small, lambda mm: dc.convert(
        mm, skip_first=False, gamma={"head": None, "*": 0.9}), _x) == {"stem.weight", "body.1.weight", "body.3.weight"}
    # a callable sees every layer and may keep it dense
    seen = []
    with pytest.warns(UserWarning, match="no weight to convert"):
        dc.convert(_Small(), gamma=lambda name, module: seen.append(name) or None)
    assert seen == ["stem", "body.1", "body.3", "head"]


def test_per_layer_settings_govern_each_layers_cache():
    # reference: each weight gradient recomputed from the layer's input compressed at the settings
    # meant for that layer and the layer's exact output gradient (DropIT keeps those exact)
    gamma = {"body.1": 0.5, "*": 0.8}
    strategy = types.MappingProxyType({"head": "min_k", "body.*": "random", "stem": "parallel_min_k"})
    chunk = lambda name, module: 32 if name == "stem" else 128  # noqa: E731
    meant = {"stem": (0.8, "parallel_min_k", 32), "body.1": (0.5, "random", 128),
             "body.3": (0.8, "random", 128), "head": (0.8, "min_k", 128)}
    plain = _Small()
    m = dc.convert(copy.deepcopy(plain), gamma=gamma, strategy=strategy, chunk=chunk, skip_first=False)
    seen = {}
    for name, mod in plain.named_modules():
        if name in meant:
            mod.register_forward_hook(lambda mod, a, out, name=name: seen.__setitem__(name, [a[0].detach(), out]))
    torch.manual_seed(5)
    out = plain(_x())
    grads_out = torch.autograd.grad(out.square().mean(), [seen[n][1] for n in meant])
    torch.manual_seed(5)  # the random strategy draws one seed per layer, in forward order
    _, grads = grads_after_step(m, _x())
    torch.manual_seed(5)
    for (name, (g, s, d)), g_out in zip(meant.items(), grads_out):
        x = seen[name][0]
        x_hat = dc.strategies.compress(x, s, g, d, channel_dim=-1 if name == "head" else 1).unpack()
        w = dict(plain.named_modules())[name].weight
        if name == "head":
            expected = g_out.t() @ x_hat
        else:
            expected = torch.nn.grad.conv2d_weight(x_hat, w.shape, g_out, padding=1)
        torch.testing.assert_close(grads[f"{name}.weight"], expected, msg=name)
    # None from a strategy or chunk spec keeps the layer dense too
    m = dc.convert(_Small(), strategy={"head": None}, chunk=lambda name, module: None if name == "stem" else 64,
                   skip_first=False)
    rows = {r.name: r for r in dc.report(m).layers}
    assert [n for n, r in rows.items() if r.gamma is None] == ["stem", "head"]
    assert all(rows[n].dense_reason == "per-layer setting" for n in ("stem", "head"))
    with pytest.raises(ValueError, match="gamma pattern 'missing'"):
        dc.convert(_Small(), gamma=types.MappingProxyType({"missing": 0.5}))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(gamma=1.0), ValueError, "gamma"),
        (dict(gamma="0.5"), TypeError, "gamma"),
        (dict(strategy="topk"), ValueError, "strategy"),
        (dict(chunk=0), ValueError, "chunk"),
        (dict(gamma={"body.*": 1.5}), ValueError, r"gamma\['body.\*'\]"),
        (dict(gamma={"nothing*": 0.5}), ValueError, "gamma pattern 'nothing\\*'"),
        (dict(strategy={"head": "bogus"}), ValueError, r"strategy\['head'\]"),
        (dict(chunk={3: 64}), TypeError, "chunk"),
        (dict(gamma=lambda name, module: 2.0), ValueError, "gamma\\('stem'\\)"),
        (dict(include="nothing*"), ValueError, "include"),
        (dict(exclude=["body", "missing"]), ValueError, "exclude"),
        (dict(include=3), TypeError, "include"),
        (dict(skip_first="yes"), TypeError, "skip_first"),
        (dict(relu_mask=1), TypeError, "relu_mask"),
    ],
)
def test_convert_bad_arguments_change_nothing(kwargs, exc, match):
    m = _Small()
    before = pickle.dumps(m)
    with pytest.raises(exc, match=match):
        dc.convert(m, **kwargs)
    assert pickle.dumps(m) == before  # no hook, attribute or class changed


def test_convert_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        dc.convert(torch.randn(3))
    with pytest.raises(TypeError, match="model"):
        dc.revert([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="not converted"):
        dc.report(nn.Linear(2, 2))


def test_convert_again_replaces_the_conversion():
    m = dc.convert(_Small(), gamma=0.9)
    dc.convert(m, gamma=0.3, strategy="random", include="head", relu_mask=False)
    rows = {r.name: r for r in dc.report(m).layers}
    assert (rows["head"].gamma, rows["head"].strategy) == (0.3, "random")
    assert rows["body.1"].dense_reason == "excluded"
    assert not any(isinstance(x, dc.MaskedReLU) for x in m.modules())
    n_hooks = sum(len(x._forward_pre_hooks) for x in m.modules())
    dc.convert(m)
    assert sum(len(x._forward_pre_hooks) for x in m.modules()) >= n_hooks  # replaced, not stacked twice
    dc.convert(m)
    assert sum(len(x._forward_pre_hooks) for x in m.modules()) == sum(
        len(x._forward_pre_hooks) for x in dc.convert(_Small()).modules())


def test_report_counts_calls_and_bytes():
    m = dc.convert(_Small(), gamma=0.9)
    assert dc.report(m).forwards == 0
    m(_x())
    m(_x()[:1])  # the report speaks of the last training forward
    rep = dc.report(m)
    rows = {r.name: r for r in rep.layers}
    assert rows["stem"].dense_reason == "skip_first" and rows["stem"].calls == 0
    assert rows["body.1"].op == "conv2d" and rows["body.1"].calls == 1
    assert rows["body.1"].dense_bytes == 1 * 8 * 8 * 8 * 4  # the input of the last forward, fp32
    assert 0 < rows["body.1"].cached_bytes < rows["body.1"].dense_bytes / 4
    assert rows["head"].op == "linear" and rows["head"].dense_bytes == 8 * 4
    text = str(rep)
    assert "body.1" in text and "conv2d" in text and "skip_first" in text
    d = rep.to_dict()
    assert d["cached_bytes"] == rep.cached_bytes and len(d["layers"]) == 4
    with torch.no_grad():
        m(_x())
    m.eval()
    m(_x())
    assert dc.report(m).forwards == 2  # eval and no_grad forwards are not training forwards


def test_eval_and_no_grad_are_untouched():
    plain = _Small()
    m = dc.convert(copy.deepcopy(plain), gamma=0.9)
    for model in (m, plain):
        model.eval()
    with torch.no_grad():
        assert torch.equal(m(_x()), plain(_x()))
    x = _x().requires_grad_()
    out = m(x)
    assert "DropIT" not in str(grad_fn_names(out))
    m.train()
    assert "DropIT" in str(grad_fn_names(m(x)))


def test_nothing_to_convert_warns():
    with pytest.warns(UserWarning, match="no weight to convert"):
        dc.convert(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.warns(UserWarning, match="no weight to convert"):
        dc.convert(_Small(), gamma=None)


class _WeightUsedElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)

    def forward(self, x):
        # b's weight is used, but not in a product: DropIT cannot cache anything for it
        return self.c(self.a(x) * self.b.weight.sum(0))


def test_unused_converted_weight_warns_once_naming_it():
    m = dc.convert(_WeightUsedElsewhere(), gamma=0.9, skip_first=False)
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 5))  # cut short before any product: it says nothing of the weights' use
    with pytest.warns(UserWarning, match=r"1 converted weight.*: b\."):
        m(torch.randn(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(2, 4))  # once


def test_frozen_weights_are_torchs_own_products():
    # nothing to compute a weight gradient for: torch's own calls, saving what the plain model
    # saves (its convolutions keep their inputs, its linear layers nothing of theirs), same bits
    def build():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    m = dc.convert(build(), gamma=0.9, skip_first=False).requires_grad_(False)
    plain = build().requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert saved_bytes(lambda: m(x), m) == saved_bytes(lambda: plain(x), plain) > 0
    got, want = m(x), plain(x)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    assert all(layer.calls == 0 for layer in m._dropit_conversion.layers)


def test_revert_restores_exactly():
    plain = _Small()
    m = dc.convert(copy.deepcopy(plain), gamma=0.9)
    m(_x())
    dc.revert(m)
    assert [type(x) for x in m.modules()] == [type(x) for x in plain.modules()]
    assert all(not x._forward_pre_hooks and not x._forward_hooks for x in m.modules())
    assert all("_dropit" not in k for x in m.modules() for k in vars(x))
    loss_m, grads_m = grads_after_step(m, _x())
    loss_p, grads_p = grads_after_step(plain, _x())
    assert torch.equal(loss_m, loss_p) and all(torch.equal(grads_m[k], grads_p[k]) for k in grads_p)


def test_converted_model_copies_and_pickles():
    m = dc.convert(_Small(), gamma=0.9)
    m(_x())
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        c(_x())
        assert dc.report(c).forwards == 2 and {r.name for r in dc.report(c).layers if r.calls} == {"body.1", "body.3", "head"}
        assert weights_changed_by_dropit(_Small, lambda mm: mm, _x, converted=c) == {"body.1.weight", "body.3.weight", "head.weight"}
    assert dc.report(m).forwards == 1  # the copies have their own records


def test_relu_mask_only_where_it_frees_memory():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2),  # the pool keeps the ReLU output
                      nn.Conv2d(8, 8, 3), nn.ReLU(),  # consumed by the next conv alone
                      nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(32, 2))
    plain = copy.deepcopy(m)
    x = torch.randn(2, 3, 14, 14)
    dc.convert(m, gamma=0.9)
    m(x)
    assert type(m[1]) is nn.ReLU and type(m[4]) is dc.MaskedReLU
    assert dc.report(m).relus == {"1": "plain (its output is kept alive by another op anyway)",
                                  "4": "masked"}
    assert saved_bytes(lambda: m(x), m) < saved_bytes(lambda: plain(x), plain)
    # decided from example inputs at convert time as well
    m2 = dc.convert(copy.deepcopy(plain), gamma=0.9, example_inputs=x)
    assert type(m2[1]) is nn.ReLU and type(m2[4]) is dc.MaskedReLU


def test_a_forward_that_raises_decides_and_warns_nothing():
    torch.manual_seed(4)
    m = dc.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(32, 2)), gamma=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError):
            m(torch.randn(2, 3, 16, 16))  # the head gets 72 features instead of 32
    # the head took part in no product, but the forward was cut short: no warning about it
    assert [str(w.message) for w in caught] == []
    assert torch._C._len_torch_function_stack() == 0  # the routing mode was left
    # nothing decided from a partial forward: both ReLUs still masked, the next forward decides
    assert type(m[1]) is dc.MaskedReLU and type(m[4]) is dc.MaskedReLU
    assert all(v.startswith("masked (undecided") for v in dc.report(m).relus.values())
    m(torch.randn(2, 3, 14, 14)).sum().backward()
    assert type(m[1]) is nn.ReLU and type(m[4]) is dc.MaskedReLU


def test_resnet18_trains_and_reverts():
    torch.manual_seed(1)
    make = lambda: torchvision.models.resnet18(weights=None, num_classes=10)  # noqa: E731
    x = lambda: torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # noqa: E731
    changed = weights_changed_by_dropit(make, lambda m: dc.convert(m, gamma=0.8), x, seed=1)
    convs = {n + ".weight" for n, mod in make().named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    assert changed == convs - {"conv1.weight"}
    m = dc.convert(make(), gamma=0.8)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    loss = F.cross_entropy(m(x()), torch.tensor([1, 7]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    dc.revert(m)
    assert not any(isinstance(mod, dc.MaskedReLU) for mod in m.modules())


def test_channels_last_model_gamma0():
    torch.manual_seed(3)
    make = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    ).to(memory_format=torch.channels_last)
    plain = make()
    m = dc.convert(copy.deepcopy(plain), gamma=0.0, skip_first=False)
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    loss_m, grads_m = grads_after_step(m, x)
    loss_p, grads_p = grads_after_step(plain, x)
    assert torch.equal(loss_m, loss_p) and all(torch.equal(grads_m[k], grads_p[k]) for k in grads_p)


class _Blocks(nn.Module):
    def __init__(self, checkpointed=()):
        super().__init__()
        torch.manual_seed(6)
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(3))
        self.checkpointed = set(checkpointed)

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i in self.checkpointed:
                x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = x + block(x)
        return x


@pytest.mark.parametrize("strategy", ["parallel_min_k", "random"])
def test_checkpointed_blocks_give_the_same_gradients(strategy):
    x = lambda: torch.randn(4, 8, generator=torch.Generator().manual_seed(7))  # noqa: E731
    grads = []
    for checkpointed in ((), (0, 2), (0, 1, 2)):
        # a checkpoint keeps each block's input alive: dense_where_kept would leave the blocks'
        # first layers dense, differently with and without checkpointing
        m = dc.convert(_Blocks(checkpointed), gamma=0.9, strategy=strategy, dense_where_kept=False)
        torch.manual_seed(8)  # the random strategy's draws
        grads.append(grads_after_step(m, x())[1])
        # the recomputation during backward is not counted as another forward
        assert all(r.calls == 1 for r in dc.report(m).layers if r.gamma is not None)
    for g in grads[1:]:
        assert g.keys() == grads[0].keys() and all(torch.equal(g[k], grads[0][k]) for k in g)
    changed = weights_changed_by_dropit(lambda: _Blocks((0, 1, 2)),
                                        lambda m: dc.convert(m, gamma=0.9, dense_where_kept=False), x)
    assert changed == {f"blocks.{i}.{j}.weight" for i in range(3) for j in (0, 2)}
