"""The native autograd nodes of eager products (``csrc/packed_products.cpp``) against the Python
autograd Functions of ``dropit_cuda.functional``: the same outputs, gradients and saved bytes, bit
for bit, over the cases each handles (the Functions are checked against independent references in
test_functional.py, test_nn_parity.py and the zoo tests; these tests pin the two paths together)."""

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dropit_cuda as dc
from dropit_cuda import functional as DF
from dropit_cuda.strategies import STRATEGIES
from cases import saved_tensors


def _native_node(out: torch.Tensor) -> bool:
    """Whether a DropIT node of C++ is behind ``out``: a node named DropIT... that is not a Python
    Function's (those are ``BackwardCFunction`` instances)."""
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            if "DropIT" in fn.name() and not isinstance(fn, torch.autograd.function.BackwardCFunction):
                return True
            stack.extend(f for f, _ in fn.next_functions)
    return False


@contextlib.contextmanager
def python_functions():
    """Every product through the Python autograd Functions."""
    native = DF._native_strategy
    DF._native_strategy = lambda *args: None
    try:
        yield
    finally:
        DF._native_strategy = native


def _run(make, inputs, grad_seed=0):
    """Output, gradients of ``inputs`` and saved bytes of ``make()``, with the random draws of a
    fixed seed (the "random" strategies)."""
    for t in inputs:
        t.grad = None
    torch.manual_seed(123)
    out, saved = saved_tensors(make)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    out.backward(g)
    nbytes = sorted(t.nbytes for t in saved)
    return out.detach(), [None if t.grad is None else t.grad.clone() for t in inputs], nbytes, out


def _assert_paths_equal(make, inputs, native_expected=True):
    got = _run(make, inputs)
    with python_functions():
        want = _run(make, inputs)
    assert _native_node(got[3]) == native_expected
    assert not _native_node(want[3])
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert got[2] == want[2]  # the same tensors saved: the pack, the weight


LINEAR_SHAPES = [(16, 64), (3, 5, 64), (2, 2, 3, 64), (64,), (1, 1), (0, 64)]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_python_function(strategy, shape, bias):
    torch.manual_seed(1)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(8, shape[-1], requires_grad=True)
    b = torch.randn(8, requires_grad=True) if bias else None
    _assert_paths_equal(lambda: DF.linear(x, w, b, gamma=0.7, strategy=strategy, chunk=48),
                        [x, w] + ([b] if bias else []), native_expected=strategy in ("parallel_min_k", "random"))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "weight_t", "bias_2d"])
def test_linear_strided_operands_match(layout):
    torch.manual_seed(2)
    x = torch.randn(24, 16, requires_grad=True)
    w = torch.randn(8, 24, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    if layout == "transposed":  # a column-major input
        w2 = torch.randn(8, 24, requires_grad=True)
        _assert_paths_equal(lambda: DF.linear(x.t(), w2, b, gamma=0.5, chunk=32), [x, w2, b])
    elif layout == "sliced":
        make = lambda: DF.linear(x[::2, :8].unsqueeze(0), w[:, :8], b, gamma=0.5, chunk=32)  # noqa: E731
        _assert_paths_equal(make, [x, w, b])
    elif layout == "weight_t":  # x @ W (addmm, mm, matmul): the op takes W itself
        wt = torch.randn(16, 8, requires_grad=True)
        settings = dc.Settings(0.5, "parallel_min_k", 32)
        _assert_paths_equal(lambda: DF.linear_with(x, wt, b, settings, transposed=True), [x, wt, b])
        with python_functions():
            want = _run(lambda: DF.linear(x, wt.t(), b, gamma=0.5, chunk=32), [x, wt, b])
        got = _run(lambda: DF.linear_with(x, wt, b, settings, transposed=True), [x, wt, b])
        assert torch.equal(got[0], want[0]) and all(torch.equal(a, c) for a, c in zip(got[1], want[1]))
        assert got[1][1].stride() == want[1][1].stride()  # the gradient's layout too
    else:
        b2 = torch.randn(1, 8, requires_grad=True)
        _assert_paths_equal(lambda: DF.linear(x, w[:, :16], b2, gamma=0.5, chunk=32), [x, w, b2])


CONV_CASES = {
    "conv1d": (lambda: torch.randn(2, 4, 9), lambda: nn.Conv1d(4, 6, 3, padding=1)),
    "conv2d_strided_groups": (lambda: torch.randn(2, 4, 9, 7), lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)),
    "conv2d_channels_last": (lambda: torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last),
                             lambda: nn.Conv2d(4, 6, 3, padding=1)),
    "conv3d_channels_last": (lambda: torch.randn(1, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d),
                             lambda: nn.Conv3d(3, 4, 2, dilation=(1, 2, 1))),
    "conv_transpose2d": (lambda: torch.randn(2, 4, 5, 5), lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, output_padding=1)),
    "conv2d_unbatched": (lambda: torch.randn(4, 6, 6), lambda: nn.Conv2d(4, 2, 3, bias=False)),
}


@pytest.mark.parametrize("strategy", ["parallel_min_k", "random", "min_k_channel"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_python_function(strategy, case):
    make_x, make_m = CONV_CASES[case]
    torch.manual_seed(3)
    m = make_m()
    x = make_x().requires_grad_()
    params = [p for p in m.parameters()]
    if isinstance(m, nn.ConvTranspose2d):
        fn = lambda: DF.conv_transpose2d(x, m.weight, m.bias, m.stride, m.padding, m.output_padding,  # noqa: E731
                                         m.groups, m.dilation, gamma=0.8, strategy=strategy, chunk=40)
    else:
        nd = m.weight.dim() - 2
        conv = getattr(DF, f"conv{nd}d")
        fn = lambda: conv(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups,  # noqa: E731
                          gamma=0.8, strategy=strategy, chunk=40)
    _assert_paths_equal(fn, [x] + params, native_expected=strategy != "min_k_channel")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_low_and_high_precision_match(dtype):
    torch.manual_seed(4)
    x = torch.randn(6, 32, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 32, dtype=dtype, requires_grad=True)
    _assert_paths_equal(lambda: DF.linear(x, w, None, gamma=0.6, chunk=64), [x, w])


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_autocast_matches_and_saves_no_weight_copy(kind):
    torch.manual_seed(5)
    if kind == "linear":
        m, x = nn.Linear(32, 16), torch.randn(4, 32, requires_grad=True)
        make = lambda: DF.linear(x, m.weight, m.bias, gamma=0.5, chunk=64)  # noqa: E731
    else:
        m, x = nn.Conv2d(3, 4, 3), torch.randn(2, 3, 7, 7, requires_grad=True)
        make = lambda: DF.conv2d(x, m.weight, m.bias, gamma=0.5, chunk=64)  # noqa: E731

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return make()

    _assert_paths_equal(autocast, [x, m.weight, m.bias])
    _, saved = saved_tensors(autocast)
    assert not any(t.dtype == torch.bfloat16 and t.shape == m.weight.shape for t in saved)
    assert any(t is m.weight for t in saved)


def test_converted_model_shares_one_pack_and_keeps_input_as_python_functions_do():
    """q/k/v read one tensor (one pack, shared through the forward's cache); o_proj reads SDPA's
    output, which stays alive anyway (kept as it is); two steps: the observed one and the narrowed
    one, where the stock layers make their products directly."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
            self.conv = nn.Conv1d(32, 32, 1)

        def forward(self, x):
            x = self.conv(x.transpose(1, 2)).transpose(1, 2)
            q, k, v = (p(x).view(2, 5, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 32)
            return self.o(a).square().mean()

    def steps():
        torch.manual_seed(6)
        model = dc.convert(Attention(), gamma=0.9, chunk=64, skip_first=False)
        x = torch.randn(2, 5, 32)
        out = []
        for _ in range(2):
            model.zero_grad()
            torch.manual_seed(7)
            loss, saved = saved_tensors(lambda: model(x))
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()], sorted(t.nbytes for t in saved),
                        dc.report(model).layers))
        return out

    got = steps()
    with python_functions():
        want = steps()
    for g, w in zip(got, want):
        assert torch.equal(g[0], w[0])
        assert all(torch.equal(a, b) for a, b in zip(g[1], w[1]))
        assert g[2] == w[2]
        assert g[3] == w[3] and g[3][0].calls > 0


def test_a_failing_product_records_nothing():
    model = dc.convert(nn.Sequential(nn.Linear(8, 4)), gamma=0.5, skip_first=False)
    x = torch.randn(3, 8)
    model(x).sum().backward()
    model(x).sum().backward()  # narrowed: the stock layer makes its product directly
    assert dc.report(model).layers[0].calls == 1
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        model(torch.randn(3, 5))
    assert dc.report(model).layers[0].calls == 0  # the new forward counts from 0; the failed product not


def test_double_backward_raises_and_first_gradients_are_exact():
    torch.manual_seed(8)
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    out = DF.conv2d(x, conv.weight, conv.bias, gamma=0.5)
    assert _native_node(out)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), [x], create_graph=True)
    with python_functions():
        (want,) = torch.autograd.grad(DF.conv2d(x, conv.weight, conv.bias, gamma=0.5).pow(2).sum(), [x],
                                      create_graph=True)
    assert torch.equal(gx, want) and gx.requires_grad
    with pytest.raises(RuntimeError, match="DropIT layers do not support double backward"):
        gx.sum().backward()


def test_only_the_product_output_is_differentiable():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    out, values, index = torch.ops.dropit_cuda.linear_dropit(x, w, None, None, None, 0.5, 16, True, 0, None, None)
    assert out.requires_grad and not values.requires_grad and not index.requires_grad
    ref = dc.pack(x.detach(), 0.5, 16, "bitmap")
    assert torch.equal(values, ref.values) and torch.equal(index, ref.index)
    with pytest.raises(ValueError, match="memory_order"):
        torch.ops.dropit_cuda.linear_dropit(x, w, None, None, None, 0.5, 16, True, 3, None, None)


def _op_run(op, args):
    """Output, returned pack and input/weight/bias gradients of one call of a product op."""
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
              and i < 3 else a for i, a in enumerate(args)]
    out, values, index = op(*leaves)
    out.pow(2).sum().backward()
    return [out, values, index] + [leaves[i].grad for i in range(3) if isinstance(leaves[i], torch.Tensor)]


@pytest.mark.parametrize("case", ["linear", "linear_weight_t", "linear_given_pack", "conv"])
def test_direct_binding_is_the_registered_op(case):
    """The Python module's unboxed bindings (what dropit_cuda.functional calls) pass every argument
    to the registered ops in order: the same outputs, packs and gradients as torch.ops'."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)  # the weight is cast to it inside (cast=)
    if case.startswith("linear"):
        w = torch.randn(40, 24, generator=g) if case == "linear_weight_t" else torch.randn(24, 40, generator=g)
        given = dc.pack(x, 0.5, 16, "offsets") if case == "linear_given_pack" else None
        values, index = (given.values, given.index) if given is not None else (None, None)
        args = (x, w, torch.randn(24, generator=g, dtype=torch.float64), values, index, 0.5, 16, given is None, 0,
                None, torch.float64, case == "linear_weight_t")
        ops = (DF._PRODUCTS.linear_dropit, torch.ops.dropit_cuda.linear_dropit)
    else:
        x = torch.randn(2, 4, 9, 9, generator=g).to(memory_format=torch.channels_last)
        args = (x, torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, generator=g), None, None, 0.75, 24, False,
                1, 7, None, [2, 1], [1, 0], [1, 2], False, [0, 0], 2)
        ops = (DF._PRODUCTS.conv_dropit, torch.ops.dropit_cuda.conv_dropit)
    got, want = _op_run(ops[0], args), _op_run(ops[1], args)
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert got[0].dtype == (torch.float64 if case.startswith("linear") else torch.float32)


@pytest.mark.parametrize("einsum_first", [True, False])
def test_pack_shared_between_native_and_python_products(einsum_first):
    """A native linear and a Python-Function product (einsum against a weight) read one tensor:
    one pack, whichever made it, and the gradients of the all-Python run."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 16)
            self.w = nn.Parameter(torch.randn(16, 32) / 6)

        def forward(self, x):
            e = lambda: torch.einsum("bi,oi->bo", x, self.w)  # noqa: E731
            a, b = (e(), self.lin(x)) if einsum_first else (self.lin(x), e())
            return (a * b).sum()

    def run():
        torch.manual_seed(9)
        model = dc.convert(Two(), gamma=0.8, chunk=64, skip_first=False)
        x = torch.randn(8, 32)
        out = []
        for _ in range(2):
            model.zero_grad()
            loss, saved = saved_tensors(lambda: model(x))
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()], sorted(t.nbytes for t in saved)))
        return out, dc.report(model).layers

    got, got_report = run()
    with python_functions():
        want, want_report = run()
    for g, w in zip(got, want):
        assert torch.equal(g[0], w[0]) and all(torch.equal(a, b) for a, b in zip(g[1], w[1])) and g[2] == w[2]
    assert got_report == want_report
    packed = [r for r in got_report if r.calls]
    assert len(packed) == 2 and sum(r.cached_bytes > 0 for r in packed) == 1  # one pack, counted once


def test_compiled_autograd_takes_the_python_functions_or_says_why():
    from torch._dynamo import compiled_autograd

    torch.manual_seed(10)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    DF.linear(x, w, None, 0.5).sum().backward()
    eager = w.grad.clone()
    w.grad = None
    with compiled_autograd._enable(torch.compile(backend="eager")):
        out = DF.linear(x, w, None, 0.5)
        assert not _native_node(out)  # traceable nodes: compiled autograd was on in the forward
        out.sum().backward()
    assert torch.equal(w.grad, eager)
    out = DF.linear(x, w, None, 0.5)  # an eager forward's native node, a compiled backward
    with pytest.raises(NotImplementedError, match="cannot run under compiled autograd"):
        with compiled_autograd._enable(torch.compile(backend="eager")):
            out.sum().backward()
