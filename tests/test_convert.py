"""convert / revert: in-place swaps, skip_first, include/exclude, torchvision models."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import dropit_cuda as dc
from dropit_cuda.modules import DropITLayer

torchvision = pytest.importorskip("torchvision")  # a test dependency (pyproject [test])


def _count_nodes(out, name):
    count, stack, seen = 0, [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__ == name
        stack.extend(f for f, _ in fn.next_functions)
    return count


def _small():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(1, 1, 1)),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_convert_in_place_shares_parameters():
    m = _small()
    params = {n: p for n, p in m.named_parameters()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    out = dc.convert(m, gamma=0.5, strategy="min_k", chunk=128)
    assert out is m
    assert type(m[0]) is nn.Conv2d  # skip_first
    assert type(m[2][0]) is dc.DropITConv2d and type(m[2][2]) is dc.DropITConv1d and type(m[4]) is dc.DropITLinear
    assert (m[4].gamma, m[4].strategy, m[4].chunk) == (0.5, "min_k", 128)
    for n, p in m.named_parameters():
        assert p is params[n]
    assert m.state_dict().keys() == state.keys()
    dc.revert(m)
    assert [type(x) for x in m.modules()] == [type(x) for x in _small().modules()]
    assert not any(hasattr(x, "gamma") for x in m.modules())
    for n, p in m.named_parameters():
        assert p is params[n]


def test_converted_model_equals_plain_at_gamma0():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    ref = copy.deepcopy(m)
    dc.convert(m, gamma=0.0, skip_first=False)
    assert all(isinstance(x, DropITLayer) for x in (m[0], m[2], m[4]))
    x = torch.randn(2, 3, 8, 8)
    out, want = m(x), ref(x)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


class _HeadFirst(nn.Module):
    """Registers the head before the stem, so registration order is not call order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 2)
        self.stem = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)))


def test_skip_first_registration_order_and_example_inputs():
    m = dc.convert(_HeadFirst())
    assert type(m.head) is nn.Linear and type(m.stem) is dc.DropITLinear
    m = _HeadFirst()
    m.train()
    m.stem.eval()
    dc.convert(m, example_inputs=torch.randn(3, 4))
    assert type(m.stem) is nn.Linear and type(m.head) is dc.DropITLinear
    assert m.training and not m.stem.training and m.head.training  # modes restored
    m = dc.convert(_HeadFirst(), skip_first=False)
    assert type(m.head) is type(m.stem) is dc.DropITLinear


def test_include_exclude_patterns():
    m = dc.convert(_small(), include="2", skip_first=False)
    assert type(m[0]) is nn.Conv2d and type(m[4]) is nn.Linear
    assert type(m[2][0]) is dc.DropITConv2d and type(m[2][2]) is dc.DropITConv1d
    m = dc.convert(_small(), exclude=["2.*", "4"], skip_first=False)
    assert type(m[0]) is dc.DropITConv2d and type(m[2][0]) is nn.Conv2d and type(m[4]) is nn.Linear
    m = dc.convert(_small(), include=["2.?"], exclude="2.2")
    assert type(m[2][0]) is dc.DropITConv2d and type(m[2][2]) is nn.Conv1d


def test_convert_again_updates_settings():
    m = dc.convert(_small(), gamma=0.9)
    dc.convert(m, gamma=0.3, strategy="random", include="4")
    assert (m[4].gamma, m[4].strategy) == (0.3, "random")
    assert (m[2][0].gamma, m[2][0].strategy) == (0.9, "parallel_min_k")


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(gamma=1.0), ValueError, "gamma"),
        (dict(gamma=None), TypeError, "gamma"),
        (dict(strategy="topk"), ValueError, "strategy"),
        (dict(chunk=0), ValueError, "chunk"),
        (dict(include="nothing*"), ValueError, "include"),
        (dict(exclude=["2", "missing"]), ValueError, "exclude"),
        (dict(include=3), TypeError, "include"),
        (dict(skip_first="yes"), TypeError, "skip_first"),
    ],
)
def test_convert_bad_arguments(kwargs, exc, name):
    m = _small()
    with pytest.raises(exc, match=name):
        dc.convert(m, **kwargs)
    assert not any(isinstance(x, DropITLayer) for x in m.modules())


def test_convert_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        dc.convert(torch.randn(3))
    with pytest.raises(TypeError, match="model"):
        dc.revert([nn.Linear(2, 2)])


def _train_step(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    loss = nn.functional.cross_entropy(out, target)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return out


def test_resnet18():
    torch.manual_seed(1)
    m = torchvision.models.resnet18(weights=None, num_classes=10)
    layers = [n for n, x in m.named_modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    dc.convert(m, gamma=0.8)
    converted = [n for n, x in m.named_modules() if isinstance(x, DropITLayer)]
    assert converted == layers[1:] and layers[0] == "conv1"
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert _count_nodes(out, "_DropITConvBackward") == 19
    assert _count_nodes(out, "_DropITLinearBackward") == 1
    _train_step(m, x, torch.tensor([1, 7]))
    dc.revert(m)
    assert not any(isinstance(x, DropITLayer) for x in m.modules())


def test_vit_b_16():
    torch.manual_seed(2)
    m = torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=10)
    layers = [n for n, x in m.named_modules() if isinstance(x, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))]
    dc.convert(m, gamma=0.9)
    converted = [n for n, x in m.named_modules() if isinstance(x, DropITLayer)]
    assert layers[0] == "conv_proj" and converted == layers[1:]
    attn = [x for x in m.modules() if isinstance(x, nn.MultiheadAttention)]
    assert len(attn) == 12 and all(type(a) is dc.DropITMultiheadAttention for a in attn)
    x = torch.randn(2, 3, 32, 32)
    out = _train_step(m, x, torch.tensor([3, 4]))
    # per block: packed in-projection, out-projection, two MLP linears; plus the head
    assert _count_nodes(out, "_DropITLinearBackward") == 12 * 4 + 1
    assert _count_nodes(out, "_DropITConvBackward") == 0
    dc.revert(m)
    assert all(type(a) is nn.MultiheadAttention for a in attn)
    assert all(type(a.out_proj) is NonDynamicallyQuantizableLinear for a in attn)


def test_from_module_failure_leaves_module_plain():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="strategy"):
        dc.DropITLinear.from_module(lin, gamma=0.5, strategy="bogus")
    assert type(lin) is nn.Linear and "gamma" not in lin.__dict__


def test_channels_last_model_gamma0():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    m = m.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(m)
    dc.convert(m, gamma=0.0, skip_first=False)
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    out, want = m(x), ref(x)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
