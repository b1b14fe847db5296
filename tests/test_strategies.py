"""The selection strategies, each against a slow, obvious reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import dropit_cuda as dc
from dropit_cuda.strategies import STRATEGIES, compress


def _keep(n, gamma):
    return n - math.floor(gamma * n)


def _ref_top_mask(values):
    """Mask of the keep largest |values| of a 1-D list (ties: lower index; NaN above everything)."""
    return lambda keep: _ordered(values)[:keep]


def _ordered(values):
    def rank(i):
        v = values[i]
        mag = math.inf if math.isnan(v) else abs(v)
        return (-mag, 0 if math.isnan(v) else 1, i)

    return sorted(range(len(values)), key=rank)


def _memory_order_list(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1).tolist()
    return x.reshape(-1).tolist()


def _no_per_element_int64(cached, numel_kept):
    for t in cached.tensors:
        assert not (t.dtype == torch.int64 and t.numel() >= numel_kept > 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9])
def test_min_k_is_exact_global_selection(dtype, gamma):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 7) * 4).round().to(dtype) / 4  # many ties
    x.view(-1)[[3, 40]] = torch.tensor([-0.0, 0.0], dtype=dtype)
    c = compress(x, "min_k", gamma)
    y = c.unpack()
    assert y.shape == x.shape and y.dtype == x.dtype
    vals = x.reshape(-1).tolist()
    keep = _keep(len(vals), gamma)
    kept = set(_ordered(vals)[:keep])
    want = torch.tensor([v if i in kept else 0.0 for i, v in enumerate(vals)], dtype=dtype).view(x.shape)
    assert torch.equal(y, want)
    assert int((y != 0).sum()) <= keep
    _no_per_element_int64(c, keep)
    assert c.nbytes == keep * x.element_size() + math.ceil(x.numel() / 8)


def test_min_k_nan_is_kept_and_channels_last_order():
    x = torch.randn(2, 3, 4, 5)
    x[1, 2, 3, 4] = float("nan")
    y = compress(x, "min_k", 0.95).unpack()
    assert torch.isnan(y[1, 2, 3, 4])
    # ties are broken by memory order: in channels_last, channel varies fastest
    xl = torch.ones(1, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    yl = compress(xl, "min_k", 0.5).unpack()
    assert yl.is_contiguous(memory_format=torch.channels_last)
    order = _memory_order_list(xl)
    kept_positions = [i for i, v in enumerate(_memory_order_list(yl)) if v != 0]
    assert kept_positions == list(range(_keep(len(order), 0.5)))


def test_min_k_differs_from_parallel_min_k_on_skewed_chunks():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(64) * 10, torch.randn(64) * 0.1])
    glob = compress(x, "min_k", 0.5).unpack()
    par = compress(x, "parallel_min_k", 0.5, chunk=64).unpack()
    assert int((glob[:64] != 0).sum()) == 64 and int((glob[64:] != 0).sum()) == 0
    assert int((par[:64] != 0).sum()) == 32 and int((par[64:] != 0).sum()) == 32


def test_parallel_min_k_per_chunk_reference():
    torch.manual_seed(2)
    x = torch.randn(5, 37)
    gamma, chunk = 0.7, 50
    y = compress(x, "parallel_min_k", gamma, chunk).unpack().reshape(-1).tolist()
    vals = x.reshape(-1).tolist()
    for start in range(0, len(vals), chunk):
        part = vals[start:start + chunk]
        kept = set(_ordered(part)[:_keep(len(part), gamma)])
        assert y[start:start + chunk] == [v if i in kept else 0.0 for i, v in enumerate(part)]


def test_random_keeps_exactly_keep_per_chunk_and_is_seeded():
    x = torch.randn(4, 300) + 5.0  # no zeros
    gamma, chunk = 0.8, 128
    torch.manual_seed(3)
    a = compress(x, "random", gamma, chunk).unpack()
    torch.manual_seed(3)
    b = compress(x, "random", gamma, chunk).unpack()
    c = compress(x, "random", gamma, chunk).unpack()  # next draw
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    flat = a.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        assert int((part != 0).sum()) == _keep(part.numel(), gamma)
    mask = a != 0
    assert torch.equal(a[mask], x[mask])
    # not the magnitude selection
    assert not torch.equal(mask, compress(x, "parallel_min_k", gamma, chunk).unpack() != 0)


@pytest.mark.parametrize("shape, dim", [((4, 10, 3, 3), 1), ((6, 5, 10), -1), ((8, 10), -1), ((2, 10, 4), 1)])
def test_min_k_channel_keeps_largest_norm_channels(shape, dim):
    torch.manual_seed(4)
    x = torch.randn(shape) * torch.rand(shape[dim]).view([-1 if d == dim % len(shape) else 1 for d in range(len(shape))])
    gamma = 0.7
    c = compress(x, "min_k_channel", gamma, channel_dim=dim)
    y = c.unpack()
    C = shape[dim]
    keep = _keep(C, gamma)
    norms = []
    for ch in range(C):
        sl = x.select(dim, ch)
        norms.append(math.sqrt(sum(v * v for v in sl.reshape(-1).tolist())))
    best = sorted(range(C), key=lambda i: -norms[i])[:keep]
    for ch in range(C):
        if ch in best:
            assert torch.equal(y.select(dim, ch), x.select(dim, ch))
        else:
            assert not y.select(dim, ch).any()
    idx = [t for t in c.tensors if not t.is_floating_point()]
    assert len(idx) == 1 and idx[0].dtype == torch.int32 and idx[0].numel() == keep
    assert c.nbytes == x.numel() // C * keep * x.element_size() + 4 * keep


def test_random_channel_is_seeded_whole_channels():
    x = torch.randn(3, 20, 4, 4).contiguous(memory_format=torch.channels_last) + 3.0
    torch.manual_seed(5)
    a = compress(x, "random_channel", 0.75)
    torch.manual_seed(5)
    b = compress(x, "random_channel", 0.75).unpack()
    ya = a.unpack()
    assert torch.equal(ya, b)
    assert ya.is_contiguous(memory_format=torch.channels_last)
    live = [ch for ch in range(20) if ya[:, ch].any()]
    assert len(live) == _keep(20, 0.75)
    for ch in live:
        assert torch.equal(ya[:, ch], x[:, ch])
    seen = set()
    for s in range(10):
        torch.manual_seed(100 + s)
        y = compress(x, "random_channel", 0.75).unpack()
        seen.add(tuple(ch for ch in range(20) if y[:, ch].any()))
    assert len(seen) > 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_format_bytes(strategy):
    torch.manual_seed(6)
    x = torch.randn(8, 16, 16, 16, dtype=torch.bfloat16)
    c = compress(x, strategy, 0.9)
    assert c.nbytes < 0.2 * x.nbytes
    _no_per_element_int64(c, x.numel() // 10)
    round_trip = c.with_tensors(c.tensors).unpack()
    assert torch.equal(round_trip, c.unpack())


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(strategy="nope"), ValueError, "strategy"),
        (dict(gamma=1.5), ValueError, "gamma"),
        (dict(chunk=-1), ValueError, "chunk"),
        (dict(channel_dim=4), ValueError, "channel_dim"),
    ],
)
def test_compress_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        compress(torch.randn(2, 3, 4), **{"strategy": "min_k_channel", **kwargs})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compress_names_x_when_it_is_not_strided(strategy):
    for x in (torch.randn(3, 4).to_sparse(), torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])):
        with pytest.raises(TypeError, match="x must be a dense"):
            compress(x, strategy)


@pytest.mark.parametrize("strategy", ["min_k_channel", "random_channel"])
@pytest.mark.parametrize("channel_dim", [0, -1])
def test_channel_strategies_refuse_0d_x(strategy, channel_dim):
    with pytest.raises(ValueError, match="channel_dim .* out of range for a 0-D tensor"):
        compress(torch.tensor(2.0), strategy, channel_dim=channel_dim)


def test_cosine_similarity_of_weight_grads():
    """On ReLU activations, magnitude selection approximates the weight gradient much better."""
    torch.manual_seed(7)
    x = F.relu(torch.randn(8, 32, 16, 16))
    w = torch.randn(32, 32, 3, 3) * 0.05
    gout = torch.randn(8, 32, 16, 16)

    def wgrad(x_in):
        wr = w.clone().requires_grad_()
        (g,) = torch.autograd.grad(F.conv2d(x_in, wr, padding=1), [wr], gout)
        return g.reshape(-1)

    exact = wgrad(x)
    sims = {}
    for strategy in STRATEGIES:
        torch.manual_seed(8)
        g = wgrad(compress(x, strategy, 0.9, 4096).unpack())
        sims[strategy] = F.cosine_similarity(g, exact, dim=0).item()
    print("cosine similarity to the exact weight gradient at gamma=0.9:", sims)
    assert sims["parallel_min_k"] > sims["random"] + 0.2
    assert sims["min_k"] > sims["random"] + 0.2
    assert sims["min_k"] >= sims["parallel_min_k"] - 0.02
    assert sims["min_k_channel"] < sims["parallel_min_k"]
