"""MaskedReLU: forward and gradients bit-equal to nn.ReLU, a 1-bit mask as the only cache."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dropit_cuda as dc
from dropit_cuda.relu import relu_mask, relu_mask_backward
from cases import saved_tensors

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(INT_OF[t.element_size()])


def assert_same_bits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-equal, except that a NaN only has to be a NaN: torch's own bfloat16 CPU kernels
    don't keep NaN payloads (the same NaN input gives different bits at different positions)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan)
    if ref.dtype != torch.bfloat16:
        assert torch.equal(bits(ours), bits(ref))
    else:
        assert torch.equal(bits(ours)[~nan.contiguous()], bits(ref)[~nan.contiguous()])


def special_input(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random normals with +-0, +-inf, +-NaN, subnormals and the smallest normals mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    tiny = torch.finfo(dtype).tiny
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), tiny, -tiny,
         tiny / 4, -tiny / 4],
        dtype=dtype,
    )
    if n:
        where = torch.randint(0, n, (max(1, n // 5),), generator=g)
        x[where] = specials[torch.randint(0, len(specials), (len(where),), generator=g)]
    return x


def reference_mask(x: torch.Tensor) -> list[int]:
    """Slow reference: int32 words, bit j of word w set where relu(x)[32w+j] is not <= 0."""
    flags = [not (v <= 0) for v in torch.relu(x.double().reshape(-1)).tolist()]
    words = []
    for w in range(0, len(flags), 32):
        word = sum(1 << j for j, f in enumerate(flags[w:w + 32]) if f)
        words.append(word - (1 << 32) if word >= 1 << 31 else word)
    return words


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 100, 4099])
def test_forward_and_mask_match_reference(dtype, n):
    x = special_input(n, dtype, seed=n)
    y, mask, strides = relu_mask(x)
    assert strides == x.stride() and y.stride() == x.stride()
    assert_same_bits(y, torch.relu(x))
    assert mask.dtype == torch.int32 and mask.shape == ((n + 31) // 32,)
    assert mask.tolist() == reference_mask(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_input_parallel_split(dtype, cpu_threads):
    # Long enough that each of 4 threads gets more than torch's parallel grain (32K elements),
    # split unevenly over 3, and not a multiple of 32; every thread count gives the same bytes.
    x = special_input(300_007, dtype, seed=5)
    grad = special_input(x.numel(), dtype, seed=6)
    flags = ~(torch.relu(x) <= 0)
    padded = torch.zeros((x.numel() + 31) // 32 * 32, dtype=torch.bool)
    padded[: x.numel()] = flags
    expected_grad = torch.where(flags, grad, torch.zeros((), dtype=dtype))
    for threads in (1, 2, 3, 4):
        cpu_threads(threads)
        y, mask, strides = relu_mask(x)
        assert_same_bits(y, torch.relu(x))
        got = ((mask.view(-1, 1).long() >> torch.arange(32)) & 1).bool().view(-1)
        assert torch.equal(got, padded), threads
        assert_same_bits(relu_mask_backward(grad, mask, strides), expected_grad)


def _grads(module_factory, x0, grad_out, inplace):
    x = x0.clone().requires_grad_()
    h = x * 1 if inplace else x  # in place needs a non-leaf input, as with nn.ReLU
    y = module_factory(inplace)(h)
    y.backward(grad_out)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kind", ["random", "zeros", "nan"])
def test_matches_nn_relu_bit_for_bit(dtype, inplace, kind):
    n = 2 * 3 * 5 * 7
    if kind == "random":
        x0 = special_input(n, dtype, seed=1)
    elif kind == "zeros":
        x0 = torch.tensor([0.0, -0.0] * (n // 2), dtype=dtype)
    else:
        x0 = torch.full((n,), float("nan"), dtype=dtype)
        x0[1::3] = -float("nan")
        x0[2::5] = -1.0
    x0 = x0.view(2, 3, 5, 7)
    grad_out = special_input(n, dtype, seed=2).view(2, 3, 5, 7)
    y_ref, g_ref = _grads(lambda ip: nn.ReLU(inplace=ip), x0, grad_out, inplace)
    y, g = _grads(lambda ip: dc.MaskedReLU(inplace=ip), x0, grad_out, inplace)
    assert_same_bits(y, y_ref)
    assert_same_bits(g, g_ref)


@pytest.mark.parametrize("inplace", [False, True])
def test_mask_follows_storage_order(inplace):
    base = special_input(2 * 5 * 3 * 4, torch.float32, seed=11)
    cl = base.view(2, 3, 4, 5).permute(0, 3, 1, 2)  # channels_last: storage order is `base`
    assert cl.is_contiguous(memory_format=torch.channels_last)
    tr = base.view(12, 10).t()  # a transpose: storage order is `base` too
    for x in (cl, tr):
        x = x.clone(memory_format=torch.preserve_format)
        ref_y = torch.relu(x)
        y, mask, strides = relu_mask(x, inplace=inplace)
        assert strides == x.stride() == y.stride() and (y is x) == inplace
        assert_same_bits(y, ref_y)
        assert mask.tolist() == reference_mask(base)
        want = (~(ref_y <= 0)).float()
        assert torch.equal(relu_mask_backward(torch.ones_like(x), mask, strides), want)


def test_negative_zero_and_nan_semantics():
    # Written out: relu(-0) = -0, NaN passes forward and backward, a negative grad is
    # replaced by +0 (not -0) where the output is <= 0.
    x = torch.tensor([-0.0, 0.0, float("nan"), -2.0, 3.0]).requires_grad_()
    y = dc.masked_relu(x * 1)
    assert torch.equal(torch.signbit(y), torch.tensor([True, False, False, False, False]))
    y.backward(torch.tensor([-1.0, -1.0, -1.0, -1.0, -0.0]))
    assert x.grad.tolist()[:2] == [0.0, 0.0] and not torch.signbit(x.grad[:2]).any()
    assert x.grad[2].item() == -1.0 and x.grad[3].item() == 0.0 and not torch.signbit(x.grad[3])
    assert torch.signbit(x.grad[4])  # -0 gradient passes unchanged


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    "layout", ["channels_last", "channels_last_3d", "transposed", "strided_view"]
)
def test_layouts(layout, inplace):
    g = torch.Generator().manual_seed(3)
    if layout == "channels_last":
        base = torch.randn(2, 5, 3, 4, generator=g).to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        base = torch.randn(2, 3, 2, 3, 4, generator=g).to(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        base = torch.randn(7, 9, generator=g).t()
    else:
        base = torch.randn(6, 10, generator=g)
    grad_out = None
    results = []
    for factory in (nn.ReLU, dc.MaskedReLU):
        leaf = base.clone(memory_format=torch.preserve_format).requires_grad_()
        h = leaf * 1
        if layout == "strided_view":
            h = h[:, 1:8:2]  # a view: in place must write through to h's base
        if grad_out is None:
            grad_out = torch.randn(h.shape, generator=g)
        y = factory(inplace=inplace)(h)
        if inplace:
            assert y is h
        (y * grad_out).sum().backward()
        results.append((y.detach().clone(), leaf.grad))
    (y_ref, g_ref), (y, gr) = results
    assert torch.equal(y, y_ref)
    assert torch.equal(gr, g_ref)
    if layout.startswith("channels_last"):
        fmt = getattr(torch, layout)
        assert y.is_contiguous(memory_format=fmt) and gr.is_contiguous(memory_format=fmt)


def test_inplace_view_writes_through_to_base():
    leaf = torch.randn(4, 6).requires_grad_()
    base = leaf * 1
    view = base[1:3]
    dc.masked_relu(view, inplace=True)
    assert torch.equal(base[1:3], torch.relu(leaf[1:3].detach()))
    assert torch.equal(base[0], leaf[0].detach())
    base.sum().backward()
    want = torch.ones(4, 6)
    want[1:3] = (leaf[1:3] > 0).float()
    assert torch.equal(leaf.grad, want)


def test_inplace_on_leaf_requiring_grad_raises_like_nn_relu():
    for factory in (nn.ReLU, dc.MaskedReLU):
        with pytest.raises(RuntimeError, match="leaf"):
            factory(inplace=True)(torch.randn(3).requires_grad_())


@pytest.mark.parametrize("inplace", [False, True])
def test_only_the_mask_issaved_tensors(inplace):
    leaf = torch.randn(3, 100).requires_grad_()
    h = leaf * 1  # (mul by a python scalar saves nothing)
    y, saved = saved_tensors(lambda: dc.masked_relu(h, inplace=inplace))
    assert len(saved) == 1
    (mask,) = saved
    assert mask.dtype == torch.int32 and mask.numel() == (300 + 31) // 32
    assert mask.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()
    # nn.ReLU, for contrast, saves its output.
    y_ref, saved_ref = saved_tensors(lambda: nn.ReLU()(leaf * 1))
    assert [s.untyped_storage().data_ptr() for s in saved_ref] == [y_ref.untyped_storage().data_ptr()]


def test_backward_twice_and_double_backward():
    x0 = torch.randn(40, dtype=torch.float64)
    results = []
    for factory in (nn.ReLU, dc.MaskedReLU):
        x = x0.clone().requires_grad_()
        y = factory()(x)
        v = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        (gx,) = torch.autograd.grad(y, x, v, create_graph=True, retain_graph=True)
        (gv,) = torch.autograd.grad(gx.square().sum(), v)
        (gx2,) = torch.autograd.grad(y, x, v)  # the graph was retained
        results.append((gx.detach(), gv, gx2))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    x = x0.clone().requires_grad_()
    assert torch.autograd.gradcheck(dc.masked_relu, (x,))
    assert torch.autograd.gradgradcheck(dc.masked_relu, (x,))


def test_autocast_cpu_bfloat16_matches_nn_relu():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))
    ours = copy.deepcopy(ref)
    ours[1] = dc.MaskedReLU()
    ours[3] = dc.MaskedReLU(inplace=True)
    x = torch.randn(5, 16)
    outs = []
    for model in (ref, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)


def test_no_grad_and_non_float_fall_back_to_torch_relu():
    x = torch.randn(10, requires_grad=True)
    with torch.no_grad():
        y = dc.masked_relu(x)
    assert y.grad_fn is None and torch.equal(y, torch.relu(x.detach()))
    i = torch.tensor([-3, 0, 4])
    assert torch.equal(dc.MaskedReLU()(i), torch.tensor([0, 0, 4]))
    dc.MaskedReLU(inplace=True)(i)
    assert i.tolist() == [0, 0, 4]


def test_module_is_an_nn_relu():
    m = dc.MaskedReLU(inplace=True)
    assert isinstance(m, nn.ReLU) and m.inplace
    assert "inplace=True" in repr(m)
    assert dict(m.state_dict()) == {}


def test_bad_arguments():
    with pytest.raises(TypeError, match="x"):
        dc.masked_relu([1.0, -1.0])
    with pytest.raises(TypeError, match="inplace"):
        dc.masked_relu(torch.randn(3), inplace=1)
    with pytest.raises(TypeError, match="x"):
        relu_mask(torch.tensor([1, 2]))
    y, mask, _ = relu_mask(torch.randn(40))
    with pytest.raises(ValueError, match="mask"):
        relu_mask_backward(torch.randn(80), mask)
    with pytest.raises(TypeError, match="mask"):
        relu_mask_backward(torch.randn(40), mask.long())
    with pytest.raises(TypeError, match="grad"):
        relu_mask_backward(torch.ones(40, dtype=torch.int32), mask)
    with pytest.raises(ValueError, match="dense"):
        torch.ops.dropit_cuda.relu_mask_forward_inplace(torch.randn(4, 6)[:, ::2])


def test_ops_take_non_dense_tensors():
    x = special_input(8 * 12, torch.float32, seed=4).view(8, 12)[:, ::3]
    y, mask = torch.ops.dropit_cuda.relu_mask_forward(x)
    assert y.is_contiguous() and mask.tolist() == reference_mask(x)
    assert_same_bits(y, torch.relu(x))
    g = torch.randn(8, 8)[:, ::2]
    out = torch.ops.dropit_cuda.relu_mask_backward(g, mask)
    assert torch.equal(out, torch.where(~(torch.relu(x) <= 0), g, torch.zeros(())))


def test_fake_impls():
    x = torch.randn(70)
    y, mask, _ = relu_mask(x)
    torch.library.opcheck(torch.ops.dropit_cuda.relu_mask_forward.default, (x,),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.dropit_cuda.relu_mask_forward_inplace.default, (x.clone(),),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.dropit_cuda.relu_mask_backward.default, (torch.randn(70), mask),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_matches_eager():
    model = nn.Sequential(nn.Linear(8, 16), dc.MaskedReLU(), nn.Linear(16, 1))
    x = torch.randn(4, 8)
    model(x).sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    for a, p in zip(eager, model.parameters()):
        torch.testing.assert_close(p.grad, a)
    # dynamic shapes: the layout logic must not need concrete sizes
    dynamic = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (3, 7):
        xb = torch.randn(n, 8)
        model.zero_grad()
        model(xb).sum().backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        dynamic(xb).sum().backward()
        for a, p in zip(want, model.parameters()):
            torch.testing.assert_close(p.grad, a)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 33, 4099, 3_000_017])
def test_cuda_matches_cpu_bytes(dtype, n):
    x = special_input(n, dtype, seed=7)
    y_cpu, mask_cpu, _ = relu_mask(x)
    y, mask, _ = relu_mask(x.cuda())
    assert torch.equal(bits(y.cpu()), bits(y_cpu)) and torch.equal(mask.cpu(), mask_cpu)
    z = x.cuda()
    _, mask_inplace, _ = relu_mask(z, inplace=True)
    assert torch.equal(bits(z.cpu()), bits(y_cpu)) and torch.equal(mask_inplace.cpu(), mask_cpu)
    grad = special_input(n, dtype, seed=8)
    ref = relu_mask_backward(grad, mask_cpu)
    assert torch.equal(bits(relu_mask_backward(grad.cuda(), mask).cpu()), bits(ref))


@cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_module_matches_nn_relu(inplace):
    x0 = special_input(2 * 8 * 9 * 9, torch.float32, seed=9).view(2, 8, 9, 9).cuda()
    x0 = x0.to(memory_format=torch.channels_last)
    grad_out = torch.randn_like(x0)
    y_ref, g_ref = _grads(lambda ip: nn.ReLU(inplace=ip), x0, grad_out, inplace)
    y, g = _grads(lambda ip: dc.MaskedReLU(inplace=ip), x0, grad_out, inplace)
    assert_same_bits(y.cpu(), y_ref.cpu())
    assert_same_bits(g.cpu(), g_ref.cpu())


# --- In a model: the conv inputs are held by the convs alone -----------------------------------


def swap_relus(model: nn.Module) -> nn.Module:
    """Test-local swap of every nn.ReLU for a MaskedReLU (convert does this for users)."""
    for name, child in model.named_children():
        if type(child) is nn.ReLU:
            setattr(model, name, dc.MaskedReLU(inplace=child.inplace))
        else:
            swap_relus(child)
    return model


def conv_input_holders(model: nn.Module, x: torch.Tensor):
    """One forward pass; for each conv, the set of modules that saved a tensor sharing the
    storage of the conv's input (written with hooks only, independent of dc.memory)."""
    stack: list[str] = ["<top>"]
    saved: list[tuple[str, int]] = []
    conv_inputs: dict[str, torch.Tensor] = {}  # kept alive so their addresses aren't reused
    handles = []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue

        def pre(mod, args, name=name):
            stack.append(name)
            if isinstance(mod, nn.Conv2d):
                conv_inputs[name] = args[0]

        def post(mod, args, out):
            stack.pop()

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def pack(t):
        saved.append((stack[-1], t.untyped_storage().data_ptr()))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    holders = {
        conv: {who for who, ptr in saved if ptr == inp.untyped_storage().data_ptr()}
        for conv, inp in conv_inputs.items()
    }
    return out, holders


def test_resnet18_conv_inputs_held_by_convs_alone():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    _, holders = conv_input_holders(plain, x)
    relus = {n for n, m in plain.named_modules() if isinstance(m, nn.ReLU)}
    # Plain: every conv shares its input with a ReLU's cache, except the stem (the image) and
    # the first conv after the max-pool (which saves its own input, not its output).
    shared = {c for c, h in holders.items() if h & relus}
    assert set(holders) - shared == {"conv1", "layer1.0.conv1"}

    masked = swap_relus(copy.deepcopy(plain))
    out, holders = conv_input_holders(masked, x)
    # Only convs hold them (a block's conv1 and its downsample conv read the same tensor).
    assert len(holders) == 20
    assert all(conv in h and h <= set(holders) for conv, h in holders.items())
    ref = plain(x)
    assert torch.equal(out, ref)


def test_resnet18_with_masked_relu_trains_a_step_like_plain():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None, num_classes=10)
    masked = swap_relus(copy.deepcopy(plain))
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    for model in (plain, masked):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    for (n, a), b in zip(plain.named_parameters(), masked.parameters()):
        assert torch.equal(a, b), n


# --- convert(relu_mask=True) ------------------------------------------------------------------


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def test_convert_swaps_relus_and_revert_undoes_it():
    model = _resnet18()
    relus = {n: m for n, m in model.named_modules() if type(m) is nn.ReLU}
    assert relus and all(m.inplace for m in relus.values())
    dc.convert(model, gamma=0.9)  # relu_mask is on by default
    for name, m in model.named_modules():
        assert type(m) is not nn.ReLU, name
    for name, m in relus.items():
        assert model.get_submodule(name) is m and type(m) is dc.MaskedReLU and m.inplace
    dc.revert(model)
    assert all(type(model.get_submodule(n)) is nn.ReLU and m.inplace for n, m in relus.items())
    assert not any(isinstance(m, (dc.MaskedReLU, dc.DropITConv2d)) for m in model.modules())

    off = dc.convert(_resnet18(), gamma=0.9, relu_mask=False)
    assert sum(type(m) is nn.ReLU for m in off.modules()) == len(relus)
    with pytest.raises(TypeError, match="relu_mask"):
        dc.convert(_resnet18(), relu_mask=1)


def test_convert_relu_mask_respects_patterns_and_shared_modules():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 2), nn.ReLU(inplace=True))
    dc.convert(model, exclude="5")
    # one module object used twice is masked in both places; the excluded one stays plain
    assert type(model[1]) is dc.MaskedReLU and model[3] is model[1]
    assert type(model[5]) is nn.ReLU
    with pytest.warns(UserWarning, match="no weight to convert.*only its 1 selected ReLU"):
        only = dc.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), include="1")
    assert type(only[1]) is dc.MaskedReLU and type(only[2]) is nn.Linear


def test_converted_resnet18_trains_a_step():
    model = dc.convert(_resnet18(), gamma=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([3, 4])
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.dim() == 4)


def test_memory_measure_shows_conv_inputs_held_by_convs_alone():
    x = torch.randn(2, 3, 32, 32)
    plain = _resnet18()
    convs = [n for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)]
    # A block's conv1 and its downsample conv read one tensor: held by two convs, by no ReLU.
    pairs = {n for n in convs if n.endswith("downsample.0")}
    pairs |= {n.replace("downsample.0", "conv1") for n in pairs}
    after_relu = [n for n in convs if n not in pairs | {"conv1", "layer1.0.conv1"}]
    assert len(after_relu) == 12

    r_plain = dc.memory.measure(plain, x)
    assert all(r_plain.module(n).freeable_bytes == 0 for n in after_relu)

    with pytest.warns(UserWarning, match="no weight to convert"):
        masked = dc.convert(copy.deepcopy(plain), gamma=None)  # convs stay plain, every ReLU masked
    r_masked = dc.memory.measure(masked, x)  # the first training forward, with every ReLU masked
    for n in after_relu:
        row = r_masked.module(n)
        assert row.freeable_bytes == row.saved_bytes == r_plain.module(n).saved_bytes > 0, n
    # With plain convs only what the ReLUs held alone is freed (the last one's output, read by
    # the average pool); the masks come on top, 1 bit per element.
    masks = r_masked.by_type["MaskedReLU"]
    relu_alone = r_plain.by_type["ReLU"].exclusive_bytes
    assert relu_alone == 2 * 512 * 4
    assert r_masked.total_bytes == r_plain.total_bytes - relu_alone + masks.saved_bytes
    assert masks.saved_bytes * 32 == r_plain.by_type["ReLU"].saved_bytes

    # And with DropIT convs, those inputs are replaced by packed caches.
    converted = dc.convert(copy.deepcopy(plain), gamma=0.9)
    r_conv = dc.memory.measure(converted, x)
    for n in after_relu:
        assert 0 < r_conv.module(n).saved_bytes < 0.25 * r_plain.module(n).saved_bytes, n
    assert r_conv.total_bytes < r_masked.total_bytes


def test_output_modified_in_place_afterwards():
    # nn.ReLU saved its output, so changing it in place breaks its backward; the mask doesn't
    # depend on the output tensor, and the gradient is still ReLU's.
    x0 = torch.randn(50)
    x = x0.clone().requires_grad_()
    y = nn.ReLU()(x)
    y.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    x = x0.clone().requires_grad_()
    y = dc.MaskedReLU()(x)
    y.mul_(3)
    y.sum().backward()
    assert torch.equal(x.grad, 3 * (x0 > 0).float())
