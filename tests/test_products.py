"""The batched, grouped and weight-first products a converted model routes (grouped_mm with
offsets, bmm/baddbmm against a weight or rows gathered from one, ``W @ x``, einsum), one pack per
distinct input, and products left dense because their input is kept alive anyway.

References are torch's own ops on an unconverted copy: at gamma = 0 every gradient must be equal bit
for bit; at gamma = 0.9 the covered weight's gradient changes and the input gradients do not.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import dropit_cuda as dc
from benchmarks.zoo import saved_bytes

AMP = [pytest.param(False, id="fp32"), pytest.param(True, id="bf16-autocast")]


@pytest.fixture(autouse=True)
def one_thread(cpu_threads):
    cpu_threads(1)


class Experts(nn.Module):
    """Tokens through a dense first layer, then one weight product of the kind ``mode`` names."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.first = nn.Linear(16, 16)
        self.experts = nn.Parameter(0.1 * torch.randn(4, 24, 16))  # (experts, out, in)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)  # (32, 16), skipped by skip_first
        ids = torch.arange(h.shape[0]) % 4
        if self.mode == "grouped_mm":
            ids, perm = torch.sort(ids)
            offs = torch.cumsum(torch.bincount(ids, minlength=4), 0).to(torch.int32)
            return torch.nn.functional.grouped_mm(h[perm].to(self.experts.dtype), self.experts.transpose(-2, -1),
                                                  offs=offs)
        if self.mode == "gathered_bmm":  # transformers' batched_mm: weight first, rows gathered
            return torch.bmm(self.experts[ids], h.unsqueeze(-1)).squeeze(-1)
        if self.mode == "baddbmm":  # weight second, a view of the parameter, a broadcast bias
            return torch.baddbmm(torch.ones(4, 1, 24), h.view(4, 8, 16), self.experts.transpose(1, 2))
        if self.mode == "slice_linear":  # transformers' eager experts
            return torch.cat([nn.functional.linear(h[ids == e], self.experts[e]) for e in range(4)])
        if self.mode == "w_at_x":  # Mamba's slow path: the weight is the first operand
            return self.proj.weight @ h.view(2, 16, 16).transpose(1, 2)
        if self.mode == "w_mm_x":
            return torch.mm(self.proj.weight, h.t())
        if self.mode == "einsum":
            return torch.einsum("sd,eod->eso", h, self.experts) + torch.einsum("eod,sd->eso", self.experts, h)
        raise ValueError(self.mode)


MODES = ["grouped_mm", "gathered_bmm", "baddbmm", "slice_linear", "w_at_x", "w_mm_x", "einsum"]


def _step(model: nn.Module, x: torch.Tensor, amp: bool):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    loss = (out.float() * weights).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), loss.detach(), grads, x.grad.clone()


def _run(mode: str, gamma, amp: bool, **convert_kwargs):
    torch.manual_seed(0)
    model = Experts(mode)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    if gamma is not None:
        dc.convert(model, gamma=gamma, **convert_kwargs)
    _step(model, x, amp)  # the first training forward takes the decisions
    return model, _step(model, x, amp)


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("mode", MODES)
def test_gamma_zero_is_bit_exact(mode, amp):
    _, (out, loss, grads, grad_x) = _run(mode, None, amp)
    _, (out0, loss0, grads0, grad_x0) = _run(mode, 0.0, amp)
    assert torch.equal(out, out0) and torch.equal(loss, loss0)
    assert torch.equal(grad_x, grad_x0)
    assert grads.keys() == grads0.keys()
    assert all(torch.equal(grads[n], grads0[n]) for n in grads), [n for n in grads if not torch.equal(grads[n], grads0[n])]


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("mode", MODES)
def test_weight_covered_input_gradient_exact(mode, amp):
    _, (out, _, grads, grad_x) = _run(mode, None, amp)
    model, (out9, _, grads9, grad_x9) = _run(mode, 0.9, amp, dense_where_kept=False)
    weight = "proj.weight" if mode.startswith("w_") else "experts"
    assert torch.equal(out, out9)
    assert torch.equal(grad_x, grad_x9), "the input gradient changed"
    assert not torch.equal(grads[weight], grads9[weight]), f"{weight} is not covered"
    assert all(torch.equal(grads[n], grads9[n]) for n in grads if n != weight)
    row = next(r for r in dc.report(model).layers if r.name in (weight, "proj"))
    assert row.calls >= 1 and 0 < row.cached_bytes < row.dense_bytes


def test_grouped_weight_gradient_is_the_per_group_sum():
    # independent reference: for each expert, the sum over its tokens of grad^T x (slow loop)
    torch.manual_seed(0)
    x = torch.randn(20, 8)
    w = nn.Parameter(torch.randn(3, 16, 8))
    offs = torch.tensor([6, 6, 20], dtype=torch.int32)  # expert 1 gets no token
    holder = nn.Module()
    holder.w = w
    holder.forward = lambda t: torch._grouped_mm(t, holder.w.transpose(-2, -1), offs=offs)
    dc.convert(holder, gamma=0.0, skip_first=False)
    holder.train()
    g = torch.randn(20, 16)
    holder(x).backward(g)
    want = torch.zeros(3, 16, 8)
    start = 0
    for e, end in enumerate(offs.tolist()):
        for s in range(start, end):
            want[e] += torch.outer(g[s], x[s])
        start = end
    torch.testing.assert_close(w.grad, want, rtol=1e-5, atol=1e-5)
    assert not w.grad[1].any()


def test_gathered_weight_copy_is_not_saved():
    torch.manual_seed(0)
    plain = Experts("gathered_bmm")
    converted = dc.convert(copy.deepcopy(plain), gamma=0.9)
    x = torch.randn(32, 16)
    for m in (plain, converted):
        m(x).sum().backward()
    before, after = saved_bytes(plain, x), saved_bytes(converted, x)
    gathered = 32 * 24 * 16 * 4  # the (tokens, out, in) float32 copy plain bmm keeps
    assert before >= gathered
    assert after < before - gathered, f"plain {before} B, converted {after} B"


class SharedInput(nn.Module):
    """q, k and v read one tensor (as in attention), after a dense first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        return self.q(h) * self.k(h) + self.v(h)


@pytest.mark.parametrize("amp", AMP)
def test_products_reading_one_tensor_share_one_pack(amp):
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    shared = dc.convert(SharedInput(), gamma=0.9)
    separate = dc.convert(copy.deepcopy(shared), gamma={"q": 0.9, "k": 0.8, "v": 0.7})
    for m in (shared, separate):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            m(x).float().sum().backward()
    rows = {r.name: r for r in dc.report(shared).layers}
    one = rows["q"].dense_bytes
    assert one == x.numel() * (2 if amp else 4)
    assert rows["k"].dense_bytes == rows["v"].dense_bytes == rows["k"].cached_bytes == 0
    assert rows["k"].calls == rows["v"].calls == 1
    assert dc.report(shared).dense_bytes == one  # the input counted once
    rows_sep = {r.name: r for r in dc.report(separate).layers}
    assert all(rows_sep[n].cached_bytes > 0 for n in "qkv"), "different settings must pack separately"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        b_shared, b_sep = saved_bytes(shared, x), saved_bytes(separate, x)
    assert b_shared < b_sep


class InPlace(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.first, self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x).tanh() * 2  # a fresh tensor that nothing saves
        y = self.a(h)
        h = h.add_(1) if self.inplace else h + 1
        return y + self.b(h)


def test_a_tensor_changed_in_place_is_packed_again():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    want_model = InPlace(False)
    got_model = dc.convert(copy.deepcopy(want_model), gamma=0.0)
    got_model.inplace = True
    for m in (want_model, got_model):
        m(x).sum().backward()
    for (n, p), q in zip(want_model.named_parameters(), got_model.parameters()):
        assert torch.equal(p.grad, q.grad), n
    rows = {r.name: r for r in dc.report(got_model).layers}
    assert rows["a"].cached_bytes > 0 and rows["b"].cached_bytes > 0


class KeptInput(nn.Module):
    """``kept`` reads a tanh output (tanh saves its output for backward); ``free`` reads a sum
    that nothing saves."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.kept = nn.Linear(16, 16)
        self.free = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        t = torch.tanh(h)
        return self.kept(t) + self.free(h + 1)


def test_a_product_whose_input_is_kept_elsewhere_stays_dense():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    plain = KeptInput()
    auto = dc.convert(copy.deepcopy(plain), gamma=0.9)
    packed = dc.convert(copy.deepcopy(plain), gamma=0.9, dense_where_kept=False)
    grads = {}
    for label, m in (("plain", plain), ("auto", auto), ("packed", packed)):
        for _ in range(2):
            m.zero_grad()
            m(x).sum().backward()
        grads[label] = {n: p.grad.clone() for n, p in m.named_parameters()}
    rows = {r.name: r for r in dc.report(auto).layers}
    assert rows["kept"].dense_reason == "input kept alive by another op" and rows["kept"].gamma is None
    assert rows["free"].gamma == 0.9
    assert torch.equal(grads["auto"]["kept.weight"], grads["plain"]["kept.weight"])  # dense
    assert not torch.equal(grads["auto"]["free.weight"], grads["plain"]["free.weight"])  # packed
    assert not torch.equal(grads["packed"]["kept.weight"], grads["plain"]["kept.weight"])
    b_plain, b_auto, b_packed = (saved_bytes(m, x) for m in (plain, auto, packed))
    assert b_auto < b_packed <= b_plain + 1, (b_plain, b_auto, b_packed)


def test_dense_where_kept_must_be_a_bool():
    model = KeptInput()
    with pytest.raises(TypeError, match="dense_where_kept"):
        dc.convert(model, dense_where_kept="yes")
    assert not hasattr(model, "_dropit_conversion")


def test_uncovered_product_is_reported_and_warned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    bil = nn.Bilinear(8, 8, 4)
    net = nn.ModuleDict({"a": model, "bil": bil})
    net.forward = lambda x: net["bil"](net["a"](x), x)
    dc.convert(net, gamma=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(torch.randn(4, 8)).sum().backward()
    row = next(r for r in dc.report(net).layers if r.name == "bil")
    assert row.uncovered is not None and row.uncovered.startswith("bilinear: not covered:")
    assert "bil: bilinear: not covered" in str(dc.report(net))
    assert any("bil (bilinear)" in str(w.message) for w in caught)


@pytest.mark.parametrize("mode,dtype", [("baddbmm", torch.float32), ("w_at_x", torch.float32),
                                        ("w_mm_x", torch.float32)])
def test_compiled_product_is_one_graph_and_matches_eager(mode, dtype):
    # Not here: grouped_mm (torch.compile does not hand a TorchFunctionMode that op, so it stays
    # torch's own in a compiled graph), einsum and gathered rows (left to torch under compile),
    # the eager experts' boolean-mask slices (data-dependent shapes).
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    plain = Experts(mode).to(dtype)
    x = torch.randn(32, 16, dtype=dtype)
    eager = dc.convert(copy.deepcopy(plain), gamma=0.9)
    converted = dc.convert(copy.deepcopy(plain), gamma=0.9)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(converted, backend=counter, fullgraph=True)
    for _ in range(2):
        for m, fn in ((converted, compiled), (eager, eager), (plain, plain)):
            m.zero_grad(set_to_none=True)
            fn(x).float().sum().backward()
    assert counter.frame_count == 1
    weight = "proj.weight" if mode.startswith("w_") else "experts"
    got, want, ref = (dict(m.named_parameters())[weight].grad for m in (converted, eager, plain))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, ref), "the compiled graph multiplies the weight without DropIT"


def test_example_inputs_decide_the_kept_inputs_at_once():
    model = dc.convert(KeptInput(), gamma=0.9, example_inputs=torch.randn(8, 16))
    rows = {r.name: r for r in dc.report(model).layers}
    assert rows["kept"].gamma is None and rows["kept"].dense_reason == "input kept alive by another op"
    assert rows["free"].gamma == 0.9


def test_a_kept_input_under_autocast_keeps_no_weight_copy():
    # left dense, the product still runs through DropIT: it saves the input (kept anyway) and no
    # bf16 copy of the weight, which torch's own product (the layer excluded) would keep
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    plain = KeptInput()
    plain.kept = nn.Linear(16, 512)  # a weight large against the input
    plain.free = nn.Linear(16, 512)
    auto = dc.convert(copy.deepcopy(plain), gamma=0.9)
    excluded = dc.convert(copy.deepcopy(plain), gamma=0.9, exclude="kept")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for m in (auto, excluded):
            for _ in range(2):
                m(x).float().sum().backward()
        b_auto, b_excluded = saved_bytes(auto, x), saved_bytes(excluded, x)
    assert dc.report(auto).layers[[r.name for r in dc.report(auto).layers].index("kept")].gamma is None
    assert b_auto <= b_excluded - 16 * 512 * 2, (b_auto, b_excluded)
