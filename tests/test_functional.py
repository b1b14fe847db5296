"""DropIT autograd functions: exactness at gamma=0, the cache, gradients at gamma=0.9, autocast."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import dropit_cuda as dc
from dropit_cuda import functional as DF
from dropit_cuda.strategies import STRATEGIES, compress
from cases import saved_tensors

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _grads(out, tensors, grad_out):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, tensors, grad_out)


def _assert_same(a, b, atol=1e-6, rtol=1e-5):
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# --- gamma = 0: the layers equal torch.nn's -----------------------------------------------------

CONV_CASES = [
    # (nd, in, out, kernel, stride, padding, dilation, groups, bias, padding_mode)
    (1, 4, 6, 3, 1, 0, 1, 1, True, "zeros"),
    (1, 4, 6, 4, 2, 3, 1, 2, False, "zeros"),
    (1, 4, 4, 3, 1, "same", 2, 4, True, "reflect"),
    (1, 3, 5, 2, 1, "same", 1, 1, True, "zeros"),  # even kernel: asymmetric 'same'
    (2, 4, 6, 3, 1, 1, 1, 1, True, "zeros"),
    (2, 4, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2, True, "zeros"),
    (2, 4, 8, 3, 1, "same", 1, 4, False, "reflect"),
    (2, 4, 6, 4, 1, "same", 1, 1, True, "zeros"),
    (2, 2, 3, 3, 1, "valid", 1, 1, True, "circular"),
    (2, 2, 3, 3, 2, 2, 1, 1, True, "replicate"),
    (2, 2, 3, 3, 1, (1, 2), 1, 1, True, "circular"),
    (3, 2, 4, 3, 1, 1, 1, 1, True, "zeros"),
    (3, 4, 4, (2, 3, 1), (1, 2, 1), "valid", 1, 2, True, "zeros"),
    (3, 2, 2, 2, 1, "same", 2, 1, False, "replicate"),
]


def _conv_input(nd, cin, batched=True, channels_last=False, dtype=torch.float32):
    spatial = {1: (11,), 2: (9, 8), 3: (6, 5, 7)}[nd]
    shape = ((3,) if batched else ()) + (cin,) + spatial
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    return x.requires_grad_()


def _case_id(c):
    return f"{c[0]}d-k{c[3]}-s{c[4]}-p{c[5]}-d{c[6]}-g{c[7]}-{c[9]}"


CONV_LAYOUT_CASES = [
    pytest.param(case, layout, id=f"{_case_id(case)}-{layout}")
    for case in CONV_CASES
    for layout in ("contiguous", "channels_last", "unbatched")
    if not (layout == "channels_last" and case[0] == 1)  # channels_last needs 4-D/5-D
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case, layout", CONV_LAYOUT_CASES)
def test_conv_gamma0_equals_nn(case, layout):
    nd, cin, cout, k, s, p, d, g, bias, mode = case
    torch.manual_seed(0)
    ref = CONV[nd](cin, cout, k, s, p, d, g, bias, mode)
    x = _conv_input(nd, cin, batched=layout != "unbatched", channels_last=layout == "channels_last")
    out = DF.conv(x, ref.weight, ref.bias, s, p, d, g, gamma=0.0, padding_mode=mode)
    want = ref(x)
    _assert_same(out, want, atol=0, rtol=0)  # forward: exactly F's
    gout = torch.randn_like(want)
    params = [x, ref.weight, ref.bias]
    for a, b in zip(_grads(out, params, gout), _grads(want, params, gout)):
        _assert_same(a, b)


@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7), (2, 2, 3, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gamma0_equals_nn(shape, bias):
    torch.manual_seed(1)
    ref = nn.Linear(7, 4, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    out = DF.linear(x, ref.weight, ref.bias, gamma=0.0)
    want = ref(x)
    _assert_same(out, want, atol=0, rtol=0)
    gout = torch.randn_like(want)
    params = [x, ref.weight, ref.bias]
    for a, b in zip(_grads(out, params, gout), _grads(want, params, gout)):
        _assert_same(a, b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_exact_at_gamma0(strategy):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    lin = nn.Linear(6, 4)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = torch.randn(2, 3, 6, requires_grad=True)
    for layer, inp, fn in ((conv, x, lambda: DF.conv2d(x, conv.weight, conv.bias, padding=1, gamma=0.0, strategy=strategy)),
                           (lin, y, lambda: DF.linear(y, lin.weight, lin.bias, 0.0, strategy))):
        out, want = fn(), layer(inp)
        gout = torch.randn_like(want)
        params = [inp, layer.weight, layer.bias]
        for a, b in zip(_grads(out, params, gout), _grads(want, params, gout)):
            _assert_same(a, b)


@pytest.mark.parametrize("strategy", ["parallel_min_k", "min_k", "min_k_channel"])
def test_gradcheck_float64_gamma0(strategy):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: DF.linear(x, w, b, 0.0, strategy, 8), (x, w, b))
    xc = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    wc = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    bc = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: DF.conv2d(x, w, b, 2, 1, 1, 2, gamma=0.0, strategy=strategy, chunk=16), (xc, wc, bc),
        fast_mode=True,
    )
    x1 = torch.randn(2, 2, 7, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: DF.conv1d(x, w, None, 1, "same", 2, gamma=0.0, strategy=strategy, padding_mode="reflect"),
        (x1, w1), fast_mode=True,
    )


# --- gamma = 0.9 --------------------------------------------------------------------------------


def _exact_weight_grad_conv(x_hat, weight, bias, gout, **conv_kwargs):
    w = weight.detach().clone().requires_grad_()
    out = F.conv2d(x_hat, w, None if bias is None else bias.detach(), **conv_kwargs)
    (gw,) = torch.autograd.grad(out, [w], gout)
    return gw


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_gamma09_grads(strategy, channels_last):
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = _conv_input(2, 4, channels_last=channels_last)
    gout = torch.randn(3, 6, 5, 4)
    torch.manual_seed(11)
    out = DF.conv2d(x, conv.weight, conv.bias, 2, 1, 1, 2, gamma=0.9, strategy=strategy, chunk=64)
    gx, gw, gb = _grads(out, [x, conv.weight, conv.bias], gout)
    want = conv(x)
    _assert_same(out, want, atol=0, rtol=0)
    rx, rw, rb = _grads(want, [x, conv.weight, conv.bias], gout)
    _assert_same(gx, rx)  # input gradient: exact
    _assert_same(gb, rb)  # bias gradient: exact
    torch.manual_seed(11)  # the same random draws as the layer made
    x_hat = compress(x.detach(), strategy, 0.9, 64, channel_dim=1).unpack()
    assert (x_hat == 0).float().mean() >= 0.75  # 4 channels keep 1
    _assert_same(gw, _exact_weight_grad_conv(x_hat, conv.weight, conv.bias, gout, stride=2, padding=1, groups=2))
    assert not torch.allclose(gw, rw, atol=1e-3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear_gamma09_grads(strategy):
    torch.manual_seed(5)
    lin = nn.Linear(20, 6)
    x = torch.randn(4, 5, 20, requires_grad=True)
    gout = torch.randn(4, 5, 6)
    torch.manual_seed(12)
    out = DF.linear(x, lin.weight, lin.bias, 0.9, strategy, 128)
    gx, gw, gb = _grads(out, [x, lin.weight, lin.bias], gout)
    want = lin(x)
    rx, _, rb = _grads(want, [x, lin.weight, lin.bias], gout)
    _assert_same(gx, rx)
    _assert_same(gb, rb)
    torch.manual_seed(12)
    x_hat = compress(x.detach(), strategy, 0.9, 128, channel_dim=-1).unpack()
    ref = torch.einsum("bto,bti->oi", gout, x_hat)
    _assert_same(gw, ref, atol=1e-5)


# --- the cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, padding_mode", [(s, "zeros") for s in STRATEGIES] + [
    ("parallel_min_k", m) for m in ("reflect", "replicate", "circular")])
def test_cache_holds_packed_input_not_dense(strategy, padding_mode):
    torch.manual_seed(6)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    out, saved = saved_tensors(lambda: DF.conv2d(x, conv.weight, None, padding=1, gamma=0.9, strategy=strategy,
                                          padding_mode=padding_mode))
    assert any(t is conv.weight for t in saved)
    others = [t for t in saved if t is not conv.weight]
    assert others, "the packed input must go through save_for_backward"
    assert not any(t.numel() >= x.numel() and t.dtype == x.dtype for t in others)
    assert not any(t.dtype == torch.int64 and t.numel() > 8 for t in others)
    nbytes = sum(t.nbytes for t in others)
    assert nbytes < 0.25 * x.nbytes  # ~0.1*4 + 1/8 bytes per element (channels: 0.1*4 + tiny)
    out.sum().backward()
    assert conv.weight.grad is not None


def test_frozen_weight_is_torchs_own_product():
    # nothing to cache: torch's own call, saving exactly what torch saves (a linear keeps only its
    # weight; a convolution's node keeps its input too, as in the plain model)
    torch.manual_seed(7)
    lin = nn.Linear(16, 8).requires_grad_(False)
    conv = nn.Conv2d(4, 4, 3).requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    xc = torch.randn(2, 4, 7, 7, requires_grad=True)
    for op, ref, inp, w in ((lambda: DF.linear(x, lin.weight, lin.bias), lambda: F.linear(x, lin.weight, lin.bias), x, lin.weight),
                            (lambda: DF.conv2d(xc, conv.weight, conv.bias), lambda: F.conv2d(xc, conv.weight, conv.bias), xc, conv.weight)):
        out, saved = saved_tensors(op)
        want, want_saved = saved_tensors(ref)
        storages = [sorted(t.untyped_storage().data_ptr() for t in ts) for ts in (saved, want_saved)]
        assert storages[0] == storages[1]
        assert torch.equal(out, want)
        (g,) = torch.autograd.grad(out.sum(), [inp])
        assert torch.equal(g, torch.autograd.grad(want.sum(), [inp])[0])
    out, saved = saved_tensors(lambda: DF.linear(x, lin.weight, lin.bias))
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in saved)


def test_no_autograd_means_plain_op():
    lin = nn.Linear(5, 3)
    x = torch.randn(2, 5)
    with torch.no_grad():
        assert DF.linear(x, lin.weight, lin.bias).grad_fn is None
    lin.requires_grad_(False)
    assert DF.linear(x, lin.weight, lin.bias).grad_fn is None


def test_retain_graph_backward_twice():
    torch.manual_seed(8)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = DF.conv2d(x, conv.weight, conv.bias, gamma=0.7)
    out.sum().backward(retain_graph=True)
    first = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    out.sum().backward()
    for g, f in zip((x.grad, conv.weight.grad, conv.bias.grad), first):
        torch.testing.assert_close(g, 2 * f)


def test_double_backward_raises():
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    out = DF.linear(x, lin.weight, lin.bias, gamma=0.5)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), [x], create_graph=True)
    # the first gradient is the plain one; only differentiating it again raises
    (want,) = torch.autograd.grad(F.linear(x, lin.weight, lin.bias).pow(2).sum(), [x])
    assert torch.equal(gx, want)
    with pytest.raises(RuntimeError, match="DropIT layers do not support double backward"):
        gx.sum().backward()
    conv = nn.Conv1d(2, 2, 3)
    xc = torch.randn(1, 2, 6, requires_grad=True)
    outc = DF.conv1d(xc, conv.weight, conv.bias)
    (gxc,) = torch.autograd.grad(outc.pow(2).sum(), [xc], create_graph=True)
    with pytest.raises(RuntimeError, match="dropit_cuda.revert"):
        gxc.sum().backward()


# --- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(gamma=1.0), ValueError, "gamma"),
        (dict(gamma=-0.1), ValueError, "gamma"),
        (dict(gamma="0.5"), TypeError, "gamma"),
        (dict(strategy="top_k"), ValueError, "strategy"),
        (dict(strategy=3), TypeError, "strategy"),
        (dict(chunk=0), ValueError, "chunk"),
        (dict(chunk=65537), ValueError, "chunk"),
        (dict(chunk=16.0), TypeError, "chunk"),
    ],
)
def test_bad_settings(kwargs, exc, name):
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with pytest.raises(exc, match=name):
        DF.conv2d(x, w, **kwargs)
    with pytest.raises(exc, match=name):
        DF.linear(torch.randn(2, 3), torch.randn(4, 3), **kwargs)


def test_bad_conv_arguments():
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="padding_mode"):
        DF.conv2d(x, w, padding_mode="mirror")
    with pytest.raises(ValueError, match="padding"):
        DF.conv2d(x, w, padding="full")
    with pytest.raises(ValueError, match="same"):
        DF.conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="stride"):
        DF.conv2d(x, w, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="weight"):
        DF.conv1d(x, w)
    with pytest.raises(RuntimeError, match="input"):  # as F.conv2d
        DF.conv2d(x[0, 0], w)


# --- mixed precision ----------------------------------------------------------------------------

AUTOCAST = [("cpu", torch.bfloat16), ("cpu", torch.float16)]
if torch.cuda.is_available():
    AUTOCAST += [("cuda", torch.bfloat16), ("cuda", torch.float16)]


@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast(device, dtype):
    torch.manual_seed(9)
    conv = nn.Conv2d(4, 6, 3, padding=1).to(device)
    lin = nn.Linear(6, 5).to(device)
    x = torch.randn(2, 4, 8, 8, device=device, requires_grad=True)
    y = torch.randn(2, 3, 6, device=device, requires_grad=True)
    cases = (
        (conv, x, lambda: DF.conv2d(x, conv.weight, conv.bias, padding=1, gamma=0.0)),
        (lin, y, lambda: DF.linear(y, lin.weight, lin.bias, gamma=0.0)),
    )
    for layer, inp, fn in cases:
        with torch.autocast(device, dtype=dtype):
            out, saved = saved_tensors(fn)
            want = layer(inp)
        assert out.dtype == want.dtype == dtype
        assert torch.equal(out, want)
        cached = [t for t in saved if t.is_floating_point() and t is not layer.weight and t.numel() == inp.numel()]
        assert cached and all(t.dtype == dtype for t in cached)  # the low-precision input, packed
        # no low-precision copy of the weight is kept: the backward casts the master weight again
        assert not any(t.dtype == dtype and t.numel() == layer.weight.numel() for t in saved)
        gout = torch.randn_like(want)
        params = [inp, layer.weight, layer.bias]
        for a, b in zip(_grads(out, params, gout), _grads(want, params, gout)):
            assert a.dtype == b.dtype
            assert torch.equal(a, b)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_padded_conv_gamma09_caches_padded_input(padding_mode):
    torch.manual_seed(10)
    conv = nn.Conv2d(3, 4, 3, padding=(2, 1), padding_mode=padding_mode)
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    out = DF.conv2d(x, conv.weight, conv.bias, padding=(2, 1), gamma=0.9, chunk=32, padding_mode=padding_mode)
    gout = torch.randn_like(out)
    gx, gw = _grads(out, [x, conv.weight], gout)
    rx, _ = _grads(conv(x), [x, conv.weight], gout)
    _assert_same(gx, rx)
    padded = F.pad(x.detach(), [1, 1, 2, 2], mode=padding_mode)
    x_hat = dc.unpack(dc.pack(padded, 0.9, 32))
    _assert_same(gw, _exact_weight_grad_conv(x_hat, conv.weight, conv.bias, gout))


@pytest.mark.parametrize("checkpointed", [False, True])
def test_frozen_weight_under_autocast_keeps_no_low_precision_copy(checkpointed):
    # LoRA's base weights: torch's own product, but its bf16 weight copy is cast again in backward
    # instead of being kept; gradients bit for bit those of the plain call
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).requires_grad_(False)
    x = torch.randn(2, 5, 32, requires_grad=True)
    g = torch.randn(2, 5, 16)

    def run(fn):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x, lin.weight, lin.bias)
        if checkpointed:
            out = checkpoint(step, use_reentrant=False)
            saved = []
        else:
            out, saved = saved_tensors(step)
        (gx,) = torch.autograd.grad(out, x, g.to(out.dtype))
        return out, saved, gx

    out, saved, gx = run(lambda x, w, b: DF.linear(x, w, b, gamma=0.9))
    want, want_saved, want_gx = run(F.linear)
    assert torch.equal(out, want) and torch.equal(gx, want_gx)
    if not checkpointed:
        assert any(t.dtype == torch.bfloat16 and t.numel() == lin.weight.numel() for t in want_saved)
        assert not any(t.dtype == torch.bfloat16 and t.numel() == lin.weight.numel() for t in saved)
