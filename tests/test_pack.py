"""The CPU pack/unpack ops against the independent reference in tests/reference.py."""

import math
import os

import numpy as np
import pytest
import torch

import dropit_cuda as dc
from cases import adversarial, randn
from reference import bit_patterns, reference_pack, reference_unpack, select

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
GAMMAS = [0.0, 0.5, 0.8, 0.9, 0.99]
CHUNKS = [1, 7, 32, 1000, 16384, 65536]


def sizes_for(chunk):
    """A size that divides the chunk, one that doesn't, and one shorter than a chunk."""
    small = max(1, chunk // 3)
    return sorted({3 * chunk, 2 * chunk + chunk // 2 + 1, small} if chunk <= 16384 else {chunk + 5, small})


def assert_matches_reference(x, gamma, chunk, random_seed=None):
    ref_values, ref_offsets, ref_bitmap = reference_pack(x, gamma, chunk, random_seed)
    for index in ("bitmap", "offsets"):
        p = dc.pack(x, gamma, chunk, index, random_seed=random_seed)
        assert p.index_kind == index
        np.testing.assert_array_equal(bit_patterns(p.values), ref_values)
        if index == "bitmap":
            np.testing.assert_array_equal(p.index.numpy(), ref_bitmap)
        else:
            np.testing.assert_array_equal(p.index.numpy(), ref_offsets)
    return p


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_pack_matches_reference(dtype, gamma, chunk):
    gen = torch.Generator().manual_seed(chunk)
    for n in sizes_for(chunk):
        x = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        assert_matches_reference(x, gamma, chunk)
        y = dc.unpack(dc.pack(x, gamma, chunk))
        np.testing.assert_array_equal(bit_patterns(y), reference_unpack(x, gamma, chunk))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("chunk", [7, 1000, 4096])
def test_adversarial_inputs(dtype, gamma, chunk):
    for name, x in adversarial(dtype, 3000).items():
        assert_matches_reference(x, gamma, chunk)


def test_ties_go_to_lower_index():
    x = torch.tensor([1.0, -3.0, 3.0, 2.0, 3.0, -3.0, 0.0, 1.0])
    p = dc.pack(x, gamma=0.75, chunk=8, index="offsets")  # keeps 2 of 8: the first two |3|s
    assert p.index.tolist() == [1, 2]
    assert p.values.tolist() == [-3.0, 3.0]


def test_nan_is_kept_above_inf():
    x = torch.tensor([math.inf, 1.0, math.nan, -math.inf, 5.0])
    y = dc.unpack(dc.pack(x, gamma=0.8, chunk=5))  # keeps 1 of 5
    assert math.isnan(y[2]) and (y[[0, 1, 3, 4]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gamma_zero_round_trip_is_bit_exact(dtype):
    x = torch.randn(5000, dtype=torch.float64).to(dtype)
    x[::17] = -0.0
    x[::101] = math.nan
    y = dc.unpack(dc.pack(x, gamma=0.0, chunk=1000))
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))


def test_random_keys_match_reference():
    x = torch.randn(2500)
    for seed in (0, 12345, 2**62 + 7):
        assert_matches_reference(x, 0.9, 1000, random_seed=seed)
    a = dc.pack(x, 0.9, 1000, random_seed=1).index
    b = dc.pack(x, 0.9, 1000, random_seed=2).index
    assert not torch.equal(a, b)


def test_empty_tensor():
    for index in ("bitmap", "offsets", "auto"):
        p = dc.pack(torch.empty(0, 3), 0.9, 16, index)
        assert p.values.numel() == 0 and p.index.numel() == 0 and p.nbytes == 0
        y = dc.unpack(p)
        assert y.shape == (0, 3) and y.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_reads_memory_order(dtype):
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64).to(dtype).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    p = dc.pack(x, 0.7, 100)
    assert p.memory_format == torch.channels_last
    y = dc.unpack(p)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    expected = reference_unpack(x, 0.7, 100)  # chunks of the NHWC order
    np.testing.assert_array_equal(bit_patterns(y), expected)
    # The same elements as packing the NHWC-contiguous tensor.
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(dc.pack(nhwc, 0.7, 100).values, p.values)


def test_channels_last_3d():
    x = torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    y = dc.unpack(dc.pack(x, 0.5, 64))
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    np.testing.assert_array_equal(bit_patterns(y), reference_unpack(x, 0.5, 64))


def test_non_contiguous_input_is_read_in_logical_order():
    base = torch.randn(40, 60)
    for x in (base.t(), base[:, ::3], base[5:30:2]):
        assert not x.is_contiguous()
        y = dc.unpack(dc.pack(x, 0.8, 64))
        assert y.shape == x.shape and y.is_contiguous()
        ref = reference_unpack(x.contiguous(), 0.8, 64)
        np.testing.assert_array_equal(bit_patterns(y), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_result_does_not_depend_on_thread_count(cpu_threads, dtype):
    # 38 chunks of 4096 (the last one short): 155K elements, so each of 4 threads gets more than
    # torch's parallel grain (32K elements) of work, and 38 chunks split unevenly over 3 and 4.
    chunk = 4096
    x = torch.randn(37 * chunk + 1234, generator=torch.Generator().manual_seed(7))
    x = (torch.round(x * 8) / 8).to(dtype)  # few distinct values: ties at every threshold
    runs = {}
    for threads in (1, 2, 3, 4):
        cpu_threads(threads)
        assert torch.get_num_threads() == threads
        for index in ("bitmap", "offsets"):
            for seed in (None, 11):
                p = dc.pack(x, 0.9, chunk, index, random_seed=seed)
                runs.setdefault((index, seed), []).append(
                    (p.values.clone(), p.index.clone(), dc.unpack(p).clone()))
    for (index, seed), outs in runs.items():
        ref_values, ref_offsets, ref_bitmap = reference_pack(x, 0.9, chunk, seed)
        ref_index = ref_bitmap if index == "bitmap" else ref_offsets
        for values, idx, dense in outs:  # every thread count gives the reference's bytes
            np.testing.assert_array_equal(bit_patterns(values), ref_values)
            np.testing.assert_array_equal(idx.numpy(), ref_index)
            assert torch.equal(dense.view(-1), outs[0][2].view(-1))
        if seed is None:
            np.testing.assert_array_equal(bit_patterns(outs[0][2]), reference_unpack(x, 0.9, chunk))


def test_auto_index_picks_the_smaller_encoding():
    x = torch.randn(10 * 4096)
    for gamma in (0.0, 0.5, 0.9, 0.9375, 0.95, 0.99):
        sizes = {k: dc.pack(x, gamma, 4096, k).index.nbytes for k in ("bitmap", "offsets")}
        auto = dc.pack(x, gamma, 4096, "auto")
        assert auto.index.nbytes == min(sizes.values())
        assert auto.index_kind == ("bitmap" if sizes["bitmap"] <= sizes["offsets"] else "offsets")
    assert dc.pack(x, 0.9, 4096).index_kind == "bitmap"
    assert dc.pack(x, 0.99, 4096).index_kind == "offsets"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nbytes_at_gamma_0_9(dtype):
    chunk, n = 16384, 16384 * 64
    p = dc.pack(torch.randn(n).to(dtype), 0.9, chunk)
    s = torch.empty(0, dtype=dtype).element_size()
    assert p.nbytes == p.values.nbytes + p.index.nbytes
    # Rounding keep() up costs at most one element per chunk.
    assert p.nbytes <= (1 - 0.9) * s * n + n / 8 + s * (n // chunk)
    assert p.nbytes < 0.2 * n * s


def test_keep_count_matches_contract():
    for length in (1, 7, 10, 1000, 16384, 65536):
        for gamma in GAMMAS + [0.3, 0.7]:
            k = dc.pack(torch.randn(length), gamma, 65536).values.numel()
            assert k == length - math.floor(gamma * length)
            assert k == len(select(np.zeros(length), 65536, gamma)[0])


# --- errors ---------------------------------------------------------------------------------

def test_bad_gamma():
    x = torch.randn(10)
    for gamma in (-0.1, 1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="gamma"):
            dc.pack(x, gamma)
    for gamma in ("0.5", None, True):
        with pytest.raises(TypeError, match="gamma"):
            dc.pack(x, gamma)


def test_bad_chunk():
    x = torch.randn(10)
    for chunk in (0, -1, 65537):
        with pytest.raises(ValueError, match="chunk"):
            dc.pack(x, 0.5, chunk)
    for chunk in (16.0, True):
        with pytest.raises(TypeError, match="chunk"):
            dc.pack(x, 0.5, chunk)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_bad_dtype(dtype):
    with pytest.raises(TypeError, match="x must be"):
        dc.pack(torch.zeros(4, dtype=dtype))


def test_bad_index_and_x():
    with pytest.raises(ValueError, match="index"):
        dc.pack(torch.randn(4), index="csr")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        dc.pack([1.0, 2.0])
    with pytest.raises(TypeError, match="p must be"):
        dc.unpack(torch.randn(3))


@pytest.mark.parametrize("make", [
    lambda x: x.to_sparse(), lambda x: x.to_sparse_csr(), lambda x: x.to_sparse_csc(),
    lambda x: torch.nested.nested_tensor([x[0], x[1, :2]]),
    lambda x: torch.nested.nested_tensor([x[0], x[1, :2]], layout=torch.jagged),
], ids=["coo", "csr", "csc", "nested", "nested_jagged"])
def test_non_strided_x_is_named(make):
    with pytest.raises(TypeError, match="x must be a dense"):
        dc.pack(make(torch.randn(3, 4)))


def test_mismatched_packed_is_rejected():
    p = dc.pack(torch.randn(1000), 0.9, 100)
    bad = {
        "values": p.with_tensors(p.values[:-1], p.index),
        "index": p.with_tensors(p.values, p.index[:-1]),
        "shape": dataclass_replace(p, shape=torch.Size([2000])),
    }
    for what, q in bad.items():
        with pytest.raises(ValueError, match="Packed"):
            dc.unpack(q)
    with pytest.raises(TypeError, match="dtype"):
        dc.unpack(p.with_tensors(p.values.double(), p.index))
    with pytest.raises(TypeError, match="index"):
        dc.unpack(p.with_tensors(p.values, p.index.long()))
    with pytest.raises(ValueError, match="index_kind"):
        dc.unpack(dataclass_replace(p, index_kind="dense"))
    with pytest.raises(ValueError, match="memory_format is torch.channels_last, which needs a 4-D shape"):
        dc.unpack(dataclass_replace(p, memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="Packed.values is on meta"):
        dc.unpack(p.with_tensors(p.values.to("meta"), p.index))


def test_corrupt_index_is_rejected_by_the_op():
    p = dc.pack(torch.randn(1000), 0.9, 100, "bitmap")
    words = p.index.clone()
    words[0] = -1  # marks 32 elements in a chunk that keeps 10
    with pytest.raises(ValueError, match="corrupt bitmap"):
        dc.unpack(p.with_tensors(p.values, words))
    q = dc.pack(torch.randn(1000), 0.9, 100, "offsets")
    offs = q.index.clone()
    offs[3] = 100
    with pytest.raises(ValueError, match="corrupt offsets"):
        dc.unpack(q.with_tensors(q.values, offs))


def _offsets_with(p, edit):
    offs = p.index.to(torch.int64)  # uint16 has no index_put
    edit(offs)
    return p.with_tensors(p.values, offs.to(torch.uint16))


# In range but not strictly ascending within chunk 1 (entries 10..19 at gamma=0.9, chunk=100).
OFFSET_TAMPERINGS = {
    "swapped": lambda o: o.__setitem__([12, 13], o[[13, 12]]),
    "duplicate": lambda o: o.__setitem__(14, o[13]),
    "reversed": lambda o: o.__setitem__(slice(10, 20), o[10:20].flip(0)),
}


@pytest.mark.parametrize("how", sorted(OFFSET_TAMPERINGS))
def test_offsets_out_of_order_are_rejected(how):
    p = dc.pack(randn(1000, torch.float32, seed=4), 0.9, 100, "offsets")
    q = _offsets_with(p, OFFSET_TAMPERINGS[how])
    with pytest.raises(ValueError, match="corrupt offsets in chunk 1: they must be strictly ascending"):
        dc.unpack(q)
    q.validate()  # the metadata is fine: only the contents tell
    with pytest.raises(ValueError, match=r"Packed.index \(offsets\) is corrupt in chunk 1: offsets must be strictly"):
        q.validate(full=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("index", ["bitmap", "offsets"])
def test_validate_full_on_cuda_tensors(index):
    """validate(full=True) is torch ops only: it needs a GPU, not the CUDA kernels."""
    p = dc.pack(randn(1000, torch.float32, seed=5), 0.9, 100, index)
    on_gpu = lambda q: dataclass_replace(q, values=q.values.cuda(), index=q.index.cuda(), device=torch.device("cuda", 0))
    on_gpu(p).validate(full=True)
    if index == "offsets":
        bad = _offsets_with(p, OFFSET_TAMPERINGS["swapped"])
    else:
        words = p.index.clone()
        words[4] ^= 1 << 3
        bad = p.with_tensors(p.values, words)
    on_gpu(bad).validate()  # the metadata is fine
    with pytest.raises(ValueError, match="is corrupt in chunk 1"):
        on_gpu(bad).validate(full=True)


def test_validate_full_checks_bitmap_contents():
    p = dc.pack(randn(990, torch.float32, seed=3), 0.9, 100, "bitmap")
    p.validate(full=True)
    words = p.index.clone()
    words[4 * 2] ^= 1  # chunk 2 (4 words a chunk) marks one element too many or too few
    with pytest.raises(ValueError, match=r"bitmap\) is corrupt in chunk 2: it marks (9|11) elements, keep is 10"):
        p.with_tensors(p.values, words).validate(full=True)
    words = p.index.clone()
    # one marked element of the last chunk (90 long, words -4..-1) moved past its end, to 127
    w = next(w for w in (-4, -3, -2) if int(words[w]) & 0x7FFFFFFF)
    words[w] ^= int(words[w]) & -int(words[w]) & 0x7FFFFFFF  # its lowest marked element
    words[-1] |= -(2**31)
    with pytest.raises(ValueError, match="corrupt in chunk 9: it marks elements past the chunk's length 90"):
        p.with_tensors(p.values, words).validate(full=True)


def dataclass_replace(p, **kw):
    import dataclasses

    return dataclasses.replace(p, **kw)


# --- torch.library integration --------------------------------------------------------------

def test_opcheck():
    x = torch.randn(3000)
    for bitmap in (True, False):
        torch.library.opcheck(torch.ops.dropit_cuda.pack.default, (x, 0.9, 1000, bitmap, None))
        values, index = torch.ops.dropit_cuda.pack(x, 0.9, 1000, bitmap, None)
        torch.library.opcheck(torch.ops.dropit_cuda.unpack.default, (values, index, 3000, 0.9, 1000, bitmap))


def test_torch_compile_traces_pack_and_unpack():
    def roundtrip(x):
        values, index = torch.ops.dropit_cuda.pack(x.reshape(-1), 0.9, 256, True, None)
        return torch.ops.dropit_cuda.unpack(values, index, x.numel(), 0.9, 256, True).view(x.shape) * 2

    x = torch.randn(8, 300)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), roundtrip(x))


def test_extension_info():
    info = dc.extension_info()
    assert info["mode"] in ("aot", "jit")
    assert isinstance(info["cuda_kernels"], bool)
    if info["cuda_kernels"]:
        assert info["cuda_archs"]
    # Under torch's OpenMP backend the CPU kernels' at::parallel_for runs on one thread unless the
    # library was compiled with OpenMP: every build path must do it.
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert info["openmp"], info
    # CI says what it built, so that a silent fallback (JIT, or no CUDA kernels) fails there.
    if os.environ.get("DROPIT_EXPECT_MODE"):
        assert info["mode"] == os.environ["DROPIT_EXPECT_MODE"]
    if os.environ.get("DROPIT_EXPECT_CUDA_KERNELS") == "1":
        assert info["cuda_kernels"] and "9.0+PTX" in info["cuda_archs"], info
