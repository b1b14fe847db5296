"""DropIT modules: nn subclasses, state_dict, plain eval/no_grad forward, repr, attention."""

import copy

import pytest
import torch
import torch.nn as nn

import dropit_cuda as dc
from cases import grad_fn_names


MODULES = [
    (dc.DropITLinear, nn.Linear, (6, 4), {}, (3, 6)),
    (dc.DropITLinear, nn.Linear, (6, 4), dict(bias=False), (2, 3, 6)),
    (dc.DropITConv1d, nn.Conv1d, (3, 4, 3), dict(stride=2, padding=1), (2, 3, 9)),
    (dc.DropITConv2d, nn.Conv2d, (4, 4, 3), dict(padding="same", groups=2, padding_mode="reflect"), (2, 4, 7, 7)),
    (dc.DropITConv3d, nn.Conv3d, (2, 3, (1, 2, 3)), dict(dilation=2, bias=False), (1, 2, 5, 6, 7)),
    (dc.DropITConvTranspose1d, nn.ConvTranspose1d, (3, 4, 3), dict(stride=2, output_padding=1), (2, 3, 9)),
    (dc.DropITConvTranspose2d, nn.ConvTranspose2d, (4, 2, 3), dict(groups=2, dilation=2, padding=1), (2, 4, 5, 6)),
    (dc.DropITConvTranspose3d, nn.ConvTranspose3d, (2, 3, 2), dict(stride=(1, 2, 1), bias=False), (1, 2, 3, 4, 3)),
]


@pytest.mark.parametrize("cls, plain, args, kwargs, shape", MODULES, ids=lambda v: getattr(v, "__name__", None))
def test_module_matches_plain(cls, plain, args, kwargs, shape):
    torch.manual_seed(0)
    m = cls(*args, **kwargs, gamma=0.0, strategy="min_k", chunk=256)
    assert isinstance(m, plain)
    ref = plain(*args, **kwargs)
    assert m.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(m.state_dict())
    m.load_state_dict(ref.state_dict())
    x = torch.randn(shape, requires_grad=True)
    out = m(x)
    assert any(n.startswith("DropIT") for n in grad_fn_names(out))
    want = ref(x)
    assert torch.equal(out, want)
    gout = torch.randn_like(out)
    a = torch.autograd.grad(out, [x, *m.parameters()], gout)
    b = torch.autograd.grad(want, [x, *ref.parameters()], gout)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    r = repr(m)
    assert "gamma=0.0" in r and "strategy='min_k'" in r and "chunk=256" in r


def test_eval_and_no_grad_use_the_plain_forward():
    m = dc.DropITConv2d(3, 4, 3, gamma=0.9)
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    assert any(n.startswith("DropIT") for n in grad_fn_names(m(x)))
    m.eval()
    assert not any(n.startswith("DropIT") for n in grad_fn_names(m(x)))
    m.train()
    with torch.no_grad():
        assert m(x).grad_fn is None
    lin = dc.DropITLinear(3, 2).eval()
    assert not any(n.startswith("DropIT") for n in grad_fn_names(lin(torch.randn(2, 3, requires_grad=True))))


def test_module_defaults_and_bad_arguments():
    m = dc.DropITLinear(4, 3)
    assert (m.gamma, m.strategy, m.chunk) == (0.9, "parallel_min_k", 16384)
    with pytest.raises(ValueError, match="gamma"):
        dc.DropITLinear(4, 3, gamma=1.0)
    with pytest.raises(ValueError, match="strategy"):
        dc.DropITConv2d(4, 3, 3, strategy="median")
    with pytest.raises(ValueError, match="chunk"):
        dc.DropITConv1d(4, 3, 3, chunk=100000)
    m.gamma = 0.25
    assert m.gamma == 0.25
    with pytest.raises(ValueError, match="gamma"):
        m.gamma = 1.5
    with pytest.raises(ValueError, match="strategy"):
        m.strategy = "max_k"
    assert (m.gamma, m.strategy) == (0.25, "parallel_min_k")


def test_from_module_and_to_plain():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="strategy"):
        dc.DropITLinear.from_module(lin, gamma=0.5, strategy="bogus")
    assert type(lin) is nn.Linear and not lin._forward_pre_hooks  # unchanged by the failure
    with pytest.raises(TypeError, match="module"):
        dc.DropITConv2d.from_module(lin)
    m = dc.DropITLinear.from_module(lin, gamma=0.5)
    assert m is lin and type(m) is dc.DropITLinear and m.gamma == 0.5
    assert m.to_plain() is lin and type(lin) is nn.Linear and not lin._forward_pre_hooks
    assert "_dropit_layers" not in vars(lin)


def test_module_copy_and_pickle():
    import io

    m = dc.DropITConv2d(2, 3, 3, gamma=0.5, strategy="random")
    c = copy.deepcopy(m)
    assert type(c) is dc.DropITConv2d and c.gamma == 0.5 and c.strategy == "random"
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    r = torch.load(buf, weights_only=False)
    assert type(r) is dc.DropITConv2d and r.strategy == "random"


# --- nn.MultiheadAttention ----------------------------------------------------------------------

MHA_CASES = [
    dict(),
    dict(batch_first=True),
    dict(bias=False),
    dict(add_bias_kv=True, add_zero_attn=True),
    dict(kdim=6, vdim=5),
    dict(batch_first=True, kdim=6, vdim=6),
]


def _mha_pair(kwargs, seed=0):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(8, 2, **kwargs)
    m = copy.deepcopy(ref)
    dc.convert(m, gamma=0.0, skip_first=False)
    return ref, m


def _mha_inputs(kwargs, self_attention, batched=True):
    bf = kwargs.get("batch_first", False)
    L, S, N = 3, 4, 2
    q = torch.randn((N, L, 8) if bf else (L, N, 8)) if batched else torch.randn(L, 8)
    if self_attention:
        return q, q, q
    kd, vd = kwargs.get("kdim", 8), kwargs.get("vdim", 8)
    shape = (N, S) if bf else (S, N)
    if not batched:
        shape = (S,)
    k = torch.randn(*shape, kd)
    v = k if kd == vd else torch.randn(*shape, vd)
    return q, k, v


def _compare_mha(ref, m, args, **call):
    o1, w1 = ref(*args, **call)
    o2, w2 = m(*args, **call)
    assert "DropITLinearBackward" in grad_fn_names(o2)
    assert torch.equal(o2, o1)
    if w1 is None:
        assert w2 is None
    else:
        assert torch.equal(w2, w1)
    gout = torch.randn_like(o1)
    a = torch.autograd.grad(o1, list(ref.parameters()), gout)
    b = torch.autograd.grad(o2, list(m.parameters()), gout)
    for u, v in zip(a, b):
        assert torch.equal(v, u)
    return o2


@pytest.mark.parametrize("kwargs", MHA_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_gamma0_equals_nn(kwargs, need_weights):
    ref, m = _mha_pair(kwargs)
    same_dims = "kdim" not in kwargs
    for self_attn in ([True, False] if same_dims else [False]):
        args = _mha_inputs(kwargs, self_attn)
        _compare_mha(ref, m, args, need_weights=need_weights)
        L = 3
        S = args[1].shape[1] if kwargs.get("batch_first") else args[1].shape[0]
        mask = torch.rand(L, S) > 0.6
        mask[:, 0] = False
        kpm = torch.zeros(2, S, dtype=torch.bool)
        kpm[1, -1] = True
        _compare_mha(ref, m, args, need_weights=need_weights, attn_mask=mask, key_padding_mask=kpm,
                     average_attn_weights=False)
    if same_dims:
        unbatched = _mha_inputs(kwargs, True, batched=False)
        _compare_mha(ref, m, unbatched, need_weights=need_weights)


def test_mha_causal_float_mask_and_dropout():
    ref, m = _mha_pair(dict(batch_first=True, dropout=0.25))
    q = torch.randn(2, 5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for need_weights in (False, True):
        torch.manual_seed(1)
        o1, _ = ref(q, q, q, attn_mask=causal, is_causal=True, need_weights=need_weights)
        torch.manual_seed(1)
        o2, _ = m(q, q, q, attn_mask=causal, is_causal=True, need_weights=need_weights)
        torch.testing.assert_close(o2, o1)
    with pytest.raises(RuntimeError, match="attn_mask"):
        m(q, q, q, is_causal=True)


def test_mha_projections_are_dropit():
    ref, m = _mha_pair(dict(batch_first=True))
    dc.convert(m, gamma=0.9, skip_first=False)
    q = torch.randn(2, 5, 8, requires_grad=True)
    out, _ = m(q, q, q, need_weights=False)
    names = grad_fn_names(out)
    assert names.count("DropITLinearBackward") == 2  # packed in-projection + out-projection
    assert "AddmmBackward0" not in names and "MmBackward0" not in names
    k = torch.randn(2, 4, 8)
    out, _ = m(q, k, k)
    assert grad_fn_names(out).count("DropITLinearBackward") == 3  # q, kv, out
    # the in-projection's input gradient is exact at any gamma
    (gq,) = torch.autograd.grad(m(q, q, q)[0].sum(), [q])
    (rq,) = torch.autograd.grad(ref(q, q, q)[0].sum(), [q])
    torch.testing.assert_close(gq, rq)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(q, q, q)[0], ref.eval()(q, q, q)[0])


def test_direct_dropit_mha_and_transformer_layer():
    m = dc.DropITMultiheadAttention(8, 2, batch_first=True, gamma=0.5, strategy="min_k")
    q = torch.randn(2, 5, 8)
    m(q, q, q)
    rows = {r.name: r for r in dc.report(m).layers}
    assert rows.keys() == {"in_proj_weight", "out_proj"} and rows["out_proj"].strategy == "min_k"
    assert all(r.calls == 1 and r.gamma == 0.5 for r in rows.values())
    assert "gamma=0.5" in repr(m)
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    ref = copy.deepcopy(layer)
    dc.convert(layer, gamma=0.0, skip_first=False)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = layer(x)
    assert grad_fn_names(out).count("DropITLinearBackward") == 4
    want = ref(x)
    torch.testing.assert_close(out, want)
    gout = torch.randn_like(out)
    for u, v in zip(torch.autograd.grad(out, [x, *layer.parameters()], gout),
                    torch.autograd.grad(want, [x, *ref.parameters()], gout)):
        torch.testing.assert_close(u, v)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_converted_transformer_encoder_eval_fast_path():
    torch.manual_seed(3)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2)
    ref = copy.deepcopy(enc).eval()
    dc.convert(enc, gamma=0.9)
    enc.eval()
    x = torch.randn(2, 5, 8)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, -2:] = True
    with torch.no_grad():
        torch.testing.assert_close(enc(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm))
    enc.train()
    out = enc(x)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
