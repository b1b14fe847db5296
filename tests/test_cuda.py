"""The real CUDA kernels against the CPU ops: byte-identical packed buffers and unpacked tensors.

Needs a GPU and an extension built with the CUDA kernels; every test here is skipped otherwise
(the host SIMT layer runs the same kernel source on the CPU in tests/test_simt_*.py).
"""

import math

import pytest
import torch

import dropit_cuda as dc
from cases import adversarial, randn
from dropit_cuda.relu import relu_mask, relu_mask_backward

HAVE_GPU = torch.cuda.is_available()
HAVE_KERNELS = HAVE_GPU and dc.extension_info()["cuda_kernels"]
pytestmark = pytest.mark.skipif(
    not HAVE_KERNELS, reason="needs a CUDA GPU and dropit_cuda built with its CUDA kernels"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
GAMMAS = [0.0, 0.5, 0.9, 0.99]
CHUNKS = [1, 7, 32, 1000, 16384, 65536]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def check(x, gamma, chunk, bitmap, seed=None):
    """CUDA pack == CPU pack and CUDA unpack == CPU unpack, byte for byte."""
    ops = torch.ops.dropit_cuda
    xc = x.cpu()
    values, index = ops.pack(x.cuda(), gamma, chunk, bitmap, seed)
    ref_values, ref_index = ops.pack(xc, gamma, chunk, bitmap, seed)
    where = f"dtype={x.dtype} n={x.numel()} gamma={gamma} chunk={chunk} bitmap={bitmap} seed={seed}"
    assert values.is_cuda and index.is_cuda
    assert same_bytes(values, ref_values), "values differ: " + where
    assert same_bytes(index, ref_index), "index differs: " + where
    out = ops.unpack(ref_values.cuda(), ref_index.cuda(), x.numel(), gamma, chunk, bitmap)
    ref_out = ops.unpack(ref_values, ref_index, x.numel(), gamma, chunk, bitmap)
    assert same_bytes(out, ref_out), "unpack differs: " + where


def sizes_for(chunk):
    return sorted({3 * chunk, 2 * chunk + chunk // 2 + 1, max(1, chunk // 3)} if chunk <= 16384
                  else {chunk + 5, 3 * chunk, max(1, chunk // 3)})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_matrix(dtype, chunk):
    for gamma in GAMMAS:
        for i, n in enumerate(sizes_for(chunk)):
            x = randn(n, dtype, 100 * chunk + i)
            for bitmap in (True, False):
                check(x, gamma, chunk, bitmap)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [7, 1000, 16384, 65536])
def test_adversarial_inputs(dtype, chunk):
    n = max(3000, 2 * chunk + 48)
    for name, x in adversarial(dtype, n).items():
        for gamma in (0.5, 0.9, 0.99):
            for bitmap in (True, False):
                check(x, gamma, chunk, bitmap)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_keys(dtype):
    for chunk, n in ((7, 400), (1000, 2500), (16384, 3 * 16384 + 9), (65536, 65536 + 3)):
        x = randn(n, dtype, chunk)
        for seed in (0, 12345, 2**62 + 7):
            for bitmap in (True, False):
                check(x, 0.9, chunk, bitmap, seed=seed)


def test_public_api_round_trip_on_cuda():
    x = torch.randn(4, 64, 33, 17, device="cuda").to(memory_format=torch.channels_last)
    p = dc.pack(x, 0.9, 4096)
    assert p.device == x.device and p.values.is_cuda
    y = dc.unpack(p)
    assert y.is_cuda and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert same_bytes(y, dc.unpack(dc.pack(x.cpu(), 0.9, 4096)))


def test_current_stream_and_device_guard():
    x = torch.randn(1 << 20, device="cuda")
    ref = torch.ops.dropit_cuda.pack(x.cpu(), 0.9, 16384, True, None)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        values, index = torch.ops.dropit_cuda.pack(x, 0.9, 16384, True, None)
    s.synchronize()
    assert same_bytes(values, ref[0]) and same_bytes(index, ref[1])
    if torch.cuda.device_count() > 1:
        x1 = x.to("cuda:1")
        with torch.cuda.device(0):
            v1, i1 = torch.ops.dropit_cuda.pack(x1, 0.9, 16384, True, None)
        assert v1.device == x1.device and same_bytes(v1, ref[0])


def test_errors_match_cpu():
    cases = [
        lambda d: torch.ops.dropit_cuda.pack(torch.randn(4, 4, device=d), 0.5, 16, True, None),
        lambda d: torch.ops.dropit_cuda.pack(torch.randn(16, device=d), 1.0, 16, True, None),
        lambda d: torch.ops.dropit_cuda.pack(torch.randn(16, device=d), 0.5, 0, True, None),
        lambda d: torch.ops.dropit_cuda.pack(torch.zeros(16, dtype=torch.int32, device=d), 0.5, 16, True, None),
        lambda d: torch.ops.dropit_cuda.unpack(torch.randn(3, device=d), torch.zeros(1, dtype=torch.int32, device=d), 16, 0.5, 16, True),
        lambda d: torch.ops.dropit_cuda.unpack(torch.randn(8, device=d), torch.zeros(8, dtype=torch.int32, device=d), 16, 0.5, 16, False),
    ]
    for case in cases:
        errors = []
        for device in ("cpu", "cuda"):
            with pytest.raises((ValueError, TypeError)) as info:
                case(device)
            errors.append((info.type, str(info.value).split("\n")[0]))
        assert errors[0] == errors[1]


def test_more_than_2_31_elements():
    # int64 chunk offsets: the last chunks of a tensor past 2^31 elements.
    n = (1 << 31) + 3 * 16384 + 123
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    x = torch.empty(n, dtype=torch.float16, device="cuda")
    x.normal_(generator=torch.Generator(device="cuda").manual_seed(0))
    for bitmap in (True, False):
        values, index = torch.ops.dropit_cuda.pack(x, 0.9, 16384, bitmap, None)
        start = (n // 16384 - 2) * 16384  # chunk-aligned tail: chunks are independent
        tail_values, tail_index = torch.ops.dropit_cuda.pack(x[start:].cpu(), 0.9, 16384, bitmap, None)
        k, w = 16384 - math.floor(0.9 * 16384), 16384 // 32
        c0 = start // 16384
        assert same_bytes(values[c0 * k:], tail_values)
        assert same_bytes(index[c0 * w:] if bitmap else index[c0 * k:], tail_index)
        out = torch.ops.dropit_cuda.unpack(values, index, n, 0.9, 16384, bitmap)
        ref = torch.ops.dropit_cuda.unpack(tail_values, tail_index, n - start, 0.9, 16384, bitmap)
        assert same_bytes(out[start:], ref)
        del out


@pytest.mark.parametrize("dtype,chunk", [
    (torch.float32, 7680), (torch.float32, 8192), (torch.float16, 16384), (torch.float64, 6144),
    (torch.float64, 24576), (torch.float64, 32768), (torch.float32, 53248), (torch.float32, 56000),
    (torch.bfloat16, 65536),
])
def test_shared_memory_edges(dtype, chunk):
    # Staged chunks around the 48 KB default limit (pack's static shared memory is about 17.5 KB,
    # so a staged chunk past about 30 KB needs the opt-in) and around the opt-in maximum (227 KB on
    # an H100/H200: float32 D = 53248 is staged, 56000 reads global memory, float64 24576 / 32768
    # likewise).
    x = randn(2 * chunk + 77, dtype, chunk)
    for gamma in (0.5, 0.9):
        for bitmap in (True, False):
            check(x, gamma, chunk, bitmap)


def crowded_bucket(n: int) -> torch.Tensor:
    """float32 values whose keys share their top 12 bits: more than pack's candidate buffer, so
    the select refines over the whole chunk."""
    low = torch.randperm(1 << 19, generator=torch.Generator().manual_seed(5))[:n].to(torch.int32)
    return (torch.tensor(1.0).view(torch.int32) + low).view(torch.float32)


@pytest.mark.parametrize("chunk", [4096, 16384, 65536])
def test_select_paths(chunk):
    # The wide digit's bucket kept whole (small gamma), refined on gathered candidates (normal
    # data), zeros counted by difference (ReLU-like data, half zeros, at gamma 0.5 the threshold
    # is often zero itself), and the crowded bucket refined over the whole chunk.
    n = 3 * chunk + 123
    normal = randn(n, torch.float32, chunk)
    cases = {"normal": normal, "relu": normal.clamp_min(0), "crowded": crowded_bucket(n),
             "relu_bf16": normal.clamp_min(0).to(torch.bfloat16)}
    for name, x in cases.items():
        for gamma in (0.01, 0.5, 0.9):
            for bitmap in (True, False):
                check(x, gamma, chunk, bitmap)


def test_unaligned_input():
    # A view that starts one element into its storage: no 16-byte loads, the scalar path.
    base = randn(4 * 16384 + 1, torch.float32, 3).cuda()
    for chunk in (16384, 1000):
        check(base[1:], 0.9, chunk, True)
        check(base[1:], 0.9, chunk, False)


def test_threads_packing_different_chunks_at_once():
    # The shared-memory opt-in is set once per device and kernel, not before each launch: host
    # threads packing chunks of different sizes at the same time all get the right bytes.
    import threading

    xs = {D: randn(8 * D, torch.float32, D).cuda() for D in (2048, 16384, 40960)}
    refs = {D: torch.ops.dropit_cuda.pack(x.cpu(), 0.9, D, True, None) for D, x in xs.items()}
    errors = []

    def work(D):
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                for _ in range(20):
                    v, i = torch.ops.dropit_cuda.pack(xs[D], 0.9, D, True, None)
                    torch.cuda.current_stream().synchronize()
                    if not (same_bytes(v, refs[D][0]) and same_bytes(i, refs[D][1])):
                        errors.append(D)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(D,)) for D in xs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_tampered_index_stays_in_bounds():
    # What unpack.cuh promises for an index the CPU op would reject: no access out of bounds (a
    # CUDA error would surface at the synchronize), bitmap chunks filled in index order up to
    # their keep count, offsets placing each value at an in-range offset.
    n, chunk, gamma = 3 * 4096 + 100, 4096, 0.9
    x = randn(n, torch.float32, 8).cuda()
    values, words = torch.ops.dropit_cuda.pack(x, gamma, chunk, True, None)
    gen = torch.Generator().manual_seed(1)
    for bad in (torch.full_like(words, -1), torch.randint(-(2**31), 2**31, words.shape, generator=gen,
                                                               dtype=torch.int64).to(torch.int32).cuda()):
        out = torch.ops.dropit_cuda.unpack(values, bad, n, gamma, chunk, True).cpu()
        torch.cuda.synchronize()
        w, vals = bad.cpu().view(torch.int32), values.cpu()
        k_full, per = chunk - math.floor(gamma * chunk), chunk // 32
        for c in range(-(-n // chunk)):
            length = min(chunk, n - c * chunk)
            keep = length - math.floor(gamma * length)
            marked = [e for e in range(length) if (int(w[c * per + e // 32]) >> (e % 32)) & 1]
            want = torch.zeros(length)
            for j, e in enumerate(marked[:keep]):
                want[e] = vals[c * k_full + j]
            assert same_bytes(out[c * chunk:c * chunk + length], want)
    values, offsets = torch.ops.dropit_cuda.pack(x, gamma, chunk, False, None)
    bad = torch.randint(0, 65536, offsets.shape, generator=gen).to(torch.uint16).cuda()
    out = torch.ops.dropit_cuda.unpack(values, bad, n, gamma, chunk, False).cpu()
    torch.cuda.synchronize()
    o, vals = bad.cpu().to(torch.int64), values.cpu()
    k_full = chunk - math.floor(gamma * chunk)
    for c in range(-(-n // chunk)):
        length = min(chunk, n - c * chunk)
        keep = length - math.floor(gamma * length)
        named = {}
        for r in range(keep):
            if o[c * k_full + r] < length:
                named.setdefault(int(o[c * k_full + r]), set()).add(float(vals[c * k_full + r]))
        for e in range(length):
            assert float(out[c * chunk + e]) in named.get(e, {0.0})


def test_relu_mask_word_groups():
    # Several mask words per warp step: lengths around the group of 4 words, against the CPU op.
    for n in (1, 127, 128, 129, 32 * 4 * 256 * 3 + 33):
        x = randn(n, torch.float32, n).cuda()
        y, mask, _ = relu_mask(x)
        y_ref, mask_ref, _ = relu_mask(x.cpu())
        assert same_bytes(y, y_ref) and same_bytes(mask, mask_ref)
        g = randn(n, torch.float32, n + 1).cuda()
        assert same_bytes(relu_mask_backward(g, mask), relu_mask_backward(g.cpu(), mask_ref))
