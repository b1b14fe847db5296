"""dc.memory.measure against saved bytes worked out by hand from the shapes.

What each op keeps for backward (used for the expected figures below): a linear layer keeps its
input (the weight is a parameter and is not counted); ReLU keeps its output; GELU keeps its input;
a view shares its base's storage.
"""

import json

import pytest
import torch
from torch import nn

import dropit_cuda as dc

F32 = 4
BF16 = 2


def nbytes(*shape, size=F32):
    n = size
    for s in shape:
        n *= s
    return n


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_alone_saves_its_input(device):
    lin = nn.Linear(8, 16).to(device)
    r = dc.memory.measure(lin, torch.randn(5, 8, device=device))
    assert r.total_bytes == nbytes(5, 8)
    row = r.module("(model)")
    assert row.type == "Linear" and row.is_layer and not row.is_dropit
    assert row.saved_bytes == row.exclusive_bytes == row.freeable_bytes == nbytes(5, 8)
    assert r.input_bytes == nbytes(5, 8)
    assert r.layer_freeable_bytes == nbytes(5, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_output_is_shared_with_next_linear(device):
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    r = dc.memory.measure(m, torch.randn(3, 8, device=device))
    assert r.total_bytes == nbytes(3, 8) + nbytes(3, 16)
    assert r.num_storages == 2
    first, relu, second = r.module("0"), r.module("1"), r.module("2")
    assert (first.saved_bytes, first.exclusive_bytes) == (nbytes(3, 8), nbytes(3, 8))
    assert (relu.saved_bytes, relu.exclusive_bytes) == (nbytes(3, 16), 0)
    # The second linear's cached input is the ReLU output: packing it would free nothing.
    assert (second.saved_bytes, second.exclusive_bytes, second.freeable_bytes) == (nbytes(3, 16), 0, 0)
    assert r.layer_freeable_bytes == nbytes(3, 8)
    assert r.by_type["Linear"].modules == 2
    assert r.by_type["Linear"].saved_bytes == nbytes(3, 8) + nbytes(3, 16)
    assert r.by_type["ReLU"].exclusive_bytes == 0


def test_gelu_keeps_its_input_so_next_linear_holds_its_own():
    m = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    r = dc.memory.measure(m, torch.randn(2, 8))
    # linear0 input, GELU input (= linear0 output), linear2 input (= GELU output)
    assert r.total_bytes == nbytes(2, 8) + 2 * nbytes(2, 32)
    assert r.module("1").exclusive_bytes == nbytes(2, 32)
    assert r.module("2").freeable_bytes == nbytes(2, 32)
    assert r.layer_freeable_bytes == nbytes(2, 8) + nbytes(2, 32)


def test_conv_input_shared_with_relu():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
    r = dc.memory.measure(m, torch.randn(2, 3, 5, 5))
    assert r.total_bytes == nbytes(2, 3, 5, 5) + nbytes(2, 4, 5, 5)
    assert r.module("0").freeable_bytes == nbytes(2, 3, 5, 5)
    assert r.module("2").saved_bytes == nbytes(2, 4, 5, 5)
    assert r.module("2").exclusive_bytes == 0


class Scale(nn.Module):
    """Multiplies by a parameter: the op saves both operands, the parameter must not count."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("shift", torch.zeros(n))

    def forward(self, x):
        return x * self.scale * (self.shift + 1)


def test_parameters_and_buffers_are_not_counted():
    r = dc.memory.measure(Scale(6), torch.randn(4, 6, requires_grad=True))
    # x*scale keeps x (for d/dscale) and scale (a parameter: not counted); (x*scale)*(shift+1)
    # keeps shift+1 (a new tensor) for the gradient of x*scale; the buffer itself is not counted.
    assert r.total_bytes == nbytes(4, 6) + nbytes(6)
    r2 = dc.memory.measure(nn.Linear(1000, 1000), torch.randn(1, 1000, requires_grad=True))
    assert r2.total_bytes == nbytes(1, 1000)  # the weight (4 MB) is saved, not counted


class SaveViews(torch.autograd.Function):
    """Saves a slice of x and x itself: one storage, counted once at its full size."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x[:, :2], x, x.t())
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class KeepInCtx(torch.autograd.Function):
    """Keeps a tensor and a dataclass-like holder as ctx attributes, not through save_for_backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.copy = x.detach().clone()
        ctx.holder = {"buf": torch.zeros(10, dtype=torch.float64)}
        ctx.scale = 3.0
        return x * 3

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale


class Custom(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


def test_views_of_one_storage_count_once():
    x = torch.randn(4, 6, requires_grad=True)
    r = dc.memory.measure(nn.Sequential(Custom(SaveViews)), x)
    assert r.num_storages == 1
    assert r.total_bytes == nbytes(4, 6)
    assert r.module("0").saved_bytes == nbytes(4, 6)
    assert r.module("0").num_tensors == 3


def test_ctx_attributes_are_counted_and_attributed():
    m = nn.Sequential(nn.Linear(3, 4), Custom(KeepInCtx))
    r = dc.memory.measure(m, torch.randn(2, 3))
    assert r.total_bytes == nbytes(2, 3) + nbytes(2, 4) + nbytes(10, size=8)
    assert r.module("1").saved_bytes == nbytes(2, 4) + nbytes(10, size=8)


class Branchy(nn.Module):
    """Computes a branch whose result is dropped: its graph is freed, its saves don't count."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 64)

    def forward(self, x):
        h = torch.tanh(x)  # tanh keeps its output: saved outside any child module
        self.unused(h).relu()  # discarded
        return self.used(h)


def test_freed_branches_and_root_attribution():
    r = dc.memory.measure(Branchy(), torch.randn(3, 4, requires_grad=True))
    # tanh output, saved by the root (tanh) and by `used` (its input): one storage.
    assert r.total_bytes == nbytes(3, 4)
    assert r.module("(model)").saved_bytes == nbytes(3, 4)
    assert r.module("used").exclusive_bytes == 0
    with pytest.raises(KeyError):
        r.module("unused")


def test_module_called_twice_is_one_row():
    relu = nn.ReLU()
    lin = nn.Linear(5, 5)
    m = nn.Sequential(lin, relu, lin, relu)  # same modules twice
    r = dc.memory.measure(m, torch.randn(2, 5))
    assert r.module("1").calls == 2 and r.module("0").calls == 2
    assert r.module("0").num_tensors == 2
    # x, relu out 1 (shared by relu and lin), relu out 2
    assert r.total_bytes == 3 * nbytes(2, 5)
    assert r.module("1").saved_bytes == 2 * nbytes(2, 5)
    assert r.module("0").exclusive_bytes == nbytes(2, 5)


def test_autocast_copies_are_counted():
    lin = nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = dc.memory.measure(lin, x)
    # bf16 copy of x (for the weight gradient) and of the weight (for the input gradient)
    assert r.total_bytes == nbytes(4, 8, size=BF16) + nbytes(16, 8, size=BF16)
    assert r.weight_copy_bytes == nbytes(16, 8, size=BF16)
    row = r.module("(model)")
    assert row.exclusive_bytes == r.total_bytes
    assert row.freeable_bytes == nbytes(4, 8, size=BF16)
    assert r.input_bytes == 0  # the copy, not the fp32 input, is saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_cuda():
    lin = nn.Linear(8, 16).cuda()
    x = torch.randn(4, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16):
        r = dc.memory.measure(lin, x)
    assert r.total_bytes == nbytes(4, 8, size=2) + nbytes(16, 8, size=2)
    assert r.weight_copy_bytes == nbytes(16, 8, size=2)


def test_kwargs_and_nested_outputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 3)

        def forward(self, x, *, y):
            return {"out": (self.a(x), torch.sigmoid(y))}

    r = dc.memory.measure(Two(), torch.randn(4, 2), y=torch.randn(7, requires_grad=True))
    assert r.total_bytes == nbytes(4, 2) + nbytes(7)  # sigmoid keeps its output


def test_report_text_and_dict():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    r = dc.memory.measure(m, torch.randn(64, 8), top=2)
    text = str(r)
    assert "Linear" in text and "ReLU" in text
    assert "largest 2 modules" in text
    assert f"{nbytes(64, 8) / 1024:.1f} KiB" in text
    d = json.loads(json.dumps(r.to_dict()))
    assert d["total_bytes"] == r.total_bytes
    assert {row["name"] for row in d["modules"]} == {"0", "1", "2"}
    assert d["by_type"]["Linear"]["modules"] == 2
    assert d["layer_freeable_bytes"] == nbytes(64, 8)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        dc.memory.measure(lambda x: x, torch.randn(2))
    with pytest.raises(ValueError, match="top"):
        dc.memory.measure(nn.ReLU(), torch.randn(2), top=-1)


def test_no_grad_context_is_overridden_and_hooks_removed():
    lin = nn.Linear(3, 3)
    with torch.no_grad():
        r = dc.memory.measure(lin, torch.randn(2, 3))
    assert r.total_bytes == nbytes(2, 3)
    assert not lin._forward_hooks and not lin._forward_pre_hooks


class KeepPacked(torch.autograd.Function):
    """Keeps a dc.Packed as a ctx attribute (the other way a packed cache can be held)."""

    @staticmethod
    def forward(ctx, x):
        ctx.packed = dc.pack(x.detach(), gamma=0.75, chunk=64)
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g


def test_packed_in_ctx_counted():
    x = torch.randn(10, 20, requires_grad=True)  # 200 elements: chunks of 64, 64, 64, 8
    r = dc.memory.measure(Custom(KeepPacked), x)
    kept = 3 * (64 - 48) + (8 - 6)  # keep(L) = L - floor(0.75 L)
    bitmap = 4 * 2 * 4  # 4 chunks, ceil(64/32) = 2 words of 4 bytes
    assert r.total_bytes == kept * F32 + min(bitmap, 2 * kept)


class PackedLinearFn(torch.autograd.Function):
    """A linear layer caching a packed input through save_for_backward (as DropIT layers do)."""

    @staticmethod
    def forward(ctx, x, weight, gamma):
        p = dc.pack(x.detach(), gamma=gamma, chunk=128)
        ctx.save_for_backward(p.values, p.index, weight)
        ctx.meta = p.with_tensors(p.values[:0], p.index[:0])  # metadata only: empty views
        return x @ weight.t()

    @staticmethod
    def backward(ctx, g):
        values, index, weight = ctx.saved_tensors
        x = dc.unpack(ctx.meta.with_tensors(values, index))
        return g @ weight, g.t() @ x, None


class PackedLinear(nn.Linear):
    def forward(self, x):
        return PackedLinearFn.apply(x, self.weight, 0.9)


def test_packed_cache_through_save_for_backward():
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), PackedLinear(64, 8))
    x = torch.randn(10, 16)
    r = dc.memory.measure(m, x)
    # 640 elements in chunks of 128: 5 chunks keep 128 - floor(115.2) = 13 each; bitmap 4 words each.
    packed = 5 * 13 * F32 + 5 * 4 * 4
    relu_out = nbytes(10, 64)
    assert r.total_bytes == nbytes(10, 16) + relu_out + packed
    row = r.module("2")
    assert row.saved_bytes == row.exclusive_bytes == row.freeable_bytes == packed
    assert row.is_layer  # an nn.Linear subclass


def _bench_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_memory_smoke(tmp_path, capsys):
    pytest.importorskip("torchvision")
    bench = _bench_module()
    out = tmp_path / "memory.json"
    argv = ["--device", "cpu", "--models", "resnet18_cifar", "--batch", "1", "--dtypes", "fp32",
            "--gammas", "0.9", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["variant"] == "baseline"
    # Its first stage alone keeps about 15 tensors of 64x32x32 fp32 (256 KiB each) per sample.
    assert rows[0]["saved_bytes"] > 10 * 256 * 1024
    if hasattr(dc, "convert"):
        assert [r["variant"] for r in rows][:2] == ["baseline", "dropit g=0.9"]
        # conv inputs are ReLU outputs the ReLUs keep too: converting frees (almost) nothing,
        # and the packs come on top of the dense tensors (about +7% at gamma 0.9)
        assert 0.95 <= rows[1]["saved_bytes_vs_baseline"] <= 1.15
        masked = [r for r in rows if r["options"].get("relu_mask")]
        if masked:  # ReLUs caching a 1-bit mask leave the conv inputs to the convs alone
            assert masked[0]["saved_bytes_vs_baseline"] < 0.7
    assert "resnet18_cifar" in capsys.readouterr().out


def test_bench_memory_plot(tmp_path):
    pytest.importorskip("matplotlib")
    bench = _bench_module()
    rows = []
    for dtype, scale in (("fp32", 4), ("bf16", 2)):
        for gamma, b in ((None, 100), (0.8, 60), (0.9, 55)):
            rows.append({"model": "vit_b_16", "dtype": dtype, "gamma": gamma, "options": {}, "batch": 2,
                         "activation_bytes": b * scale * 1024**2})
    path = tmp_path / "p.png"
    bench.plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _packed_bytes(numel, gamma, chunk, size):
    """Bytes of a bitmap-indexed pack, from the format's definition (slow and obvious)."""
    total = 0
    for start in range(0, numel, chunk):
        length = min(chunk, numel - start)
        kept = length - int(gamma * length // 1)
        total += kept * size + 4 * (-(-chunk // 32))
    return total


def test_converted_model_frees_only_exclusive_inputs():
    if not hasattr(dc, "convert"):
        pytest.fail("dc.convert is missing")
    torch.manual_seed(0)
    x = torch.randn(10, 16)

    def build(act):
        return nn.Sequential(nn.Linear(16, 64), act, nn.Linear(64, 8))

    # GELU keeps its input, so the second linear's input is its own: converting frees it.
    base = dc.memory.measure(build(nn.GELU()), x)
    conv = dc.convert(build(nn.GELU()), gamma=0.9, chunk=128)  # skip_first: linear 0 stays dense
    r = dc.memory.measure(conv, x)
    packed = _packed_bytes(640, 0.9, 128, F32)
    assert packed == 5 * 13 * 4 + 5 * 16
    assert base.total_bytes == nbytes(10, 16) + 2 * nbytes(10, 64)
    assert r.total_bytes == nbytes(10, 16) + nbytes(10, 64) + packed
    row = r.module("2")
    assert row.is_dropit and row.type == "Linear"
    assert row.saved_bytes == row.exclusive_bytes == packed
    assert r.dropit_bytes == packed and r.layer_freeable_bytes == nbytes(10, 16)

    # ReLU keeps its output, the very tensor the linear caches: packing adds the pack on top.
    import inspect

    has_mask = "relu_mask" in inspect.signature(dc.convert).parameters
    no_mask = {"relu_mask": False} if has_mask else {}
    base = dc.memory.measure(build(nn.ReLU()), x)
    r = dc.memory.measure(dc.convert(build(nn.ReLU()), gamma=0.9, chunk=128, **no_mask), x)
    assert r.total_bytes == base.total_bytes + packed
    if has_mask:  # a ReLU caching a 1-bit mask (int32 words) leaves the tensor to the linear
        r = dc.memory.measure(dc.convert(build(nn.ReLU()), gamma=0.9, chunk=128, relu_mask=True), x)
        mask = 4 * (-(-640 // 32))
        assert r.total_bytes == nbytes(10, 16) + mask + packed
        assert r.module("1").exclusive_bytes == mask


def test_converted_under_autocast():
    if not hasattr(dc, "convert"):
        pytest.fail("dc.convert is missing")
    m = dc.convert(nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8)), gamma=0.9, chunk=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = dc.memory.measure(m, torch.randn(10, 16))
    row = r.module("2")
    assert row.freeable_bytes == _packed_bytes(640, 0.9, 128, BF16)
    # what it keeps besides the pack is the bf16 weight copy (for the input gradient), if anything
    assert row.saved_bytes - row.freeable_bytes in (0, nbytes(8, 64, size=BF16))
    assert row.weight_copy_bytes == row.saved_bytes - row.freeable_bytes


def test_bench_memory_relu_mask_rows(monkeypatch):
    bench = _bench_module()

    def convert(model, gamma=0.9, strategy="parallel_min_k", chunk=16384, skip_first=True,
                include=None, exclude=None, relu_mask=False):
        return model

    monkeypatch.setattr(bench.dc, "convert", convert, raising=False)
    labels = [v[0] for v in bench.variants([0.8, 0.9])]
    assert labels == ["baseline", "dropit g=0.8", "dropit g=0.9",
                      "dropit g=0.8 +relu_mask", "dropit g=0.9 +relu_mask"]
    assert bench.variants([0.9])[-1][2] == {"relu_mask": True}
    monkeypatch.setattr(bench.dc, "convert", lambda model, gamma=0.9: model)
    assert [v[0] for v in bench.variants([0.9])] == ["baseline", "dropit g=0.9"]


def test_embedding_of_a_converted_model_is_not_a_dropit_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    dc.convert(model, gamma=0.9, skip_first=False)
    r = dc.memory.measure(model, torch.randint(0, 10, (4, 5)))
    rows = {m.name: m for m in r.modules}
    assert not rows["0"].is_layer and not rows["0"].is_dropit  # a 2-D weight, but no product used it
    assert rows["1"].is_dropit and rows["3"].is_dropit
