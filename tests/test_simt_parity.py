"""The CUDA kernel bodies (csrc/cuda/*.cuh), run on the CPU by the host SIMT layer, against the
CPU ops: packed buffers and unpacked tensors must be byte-identical.

The test-only extension (tests/simt/) is compiled just in time by the ``simt`` fixture. Sizes
are chosen so the emulation (a fiber per GPU thread) stays within a few minutes on two cores:
big chunks come with few chunks. (About 30 s on two cores, plus about 90 s to compile the extension.)
"""


import math

import numpy as np
import pytest
import torch

import dropit_cuda  # noqa: F401  (loads the ops)
from cases import adversarial, randn
from reference import bit_patterns, select_fast
from simt.build import load

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
GAMMAS = [0.0, 0.5, 0.9, 0.99]
PACK_THREADS = [256, 512]
UNPACK_THREADS = [128, 256]


@pytest.fixture(scope="module")
def simt():
    return load()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def check(simt, x, gamma, chunk, bitmap, seed=None, threads=0, unpack_threads=0, **kw):
    """Emulated pack == CPU pack, and emulated unpack of it == CPU unpack, byte for byte."""
    ops = torch.ops.dropit_cuda
    values, index = simt.pack(x, gamma, chunk, bitmap, seed, threads=threads, **kw)
    ref_values, ref_index = ops.pack(x, gamma, chunk, bitmap, seed)
    where = f"dtype={x.dtype} n={x.numel()} gamma={gamma} chunk={chunk} bitmap={bitmap} seed={seed} threads={threads} {kw}"
    assert same_bytes(values, ref_values), "values differ: " + where
    assert same_bytes(index, ref_index), "index differs: " + where
    more = {k: v for k, v in kw.items() if k in ("grid", "order")}
    out = simt.unpack(ref_values, ref_index, x.numel(), gamma, chunk, bitmap, threads=unpack_threads, **more)
    assert same_bytes(out, ops.unpack(ref_values, ref_index, x.numel(), gamma, chunk, bitmap)), "unpack: " + where


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_small_chunks(simt, dtype, chunk):
    # A size that divides the chunk, one that doesn't, one shorter than a chunk (few chunks for
    # the tiny ones: every chunk is a block of >= 256 fibers).
    sizes = {1: [3, 5], 7: [21, 7 * 4 + 3, 5], 32: [96, 32 * 2 + 17, 10], 1000: [3000, 2501, 333]}[chunk]
    for gamma in GAMMAS:
        for i, n in enumerate(sizes):
            x = randn(n, dtype, 1000 * chunk + i)
            for bitmap in (True, False):
                for t, ut in zip(PACK_THREADS, UNPACK_THREADS):
                    check(simt, x, gamma, chunk, bitmap, threads=t, unpack_threads=ut)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_16384(simt, dtype):
    for n in (3 * 16384, 2 * 16384 + 8193, 16384 // 3):  # divides D, doesn't, one short chunk
        x = randn(n, dtype, 16384 + n)
        for gamma in GAMMAS:
            for bitmap in (True, False):
                for t, ut, order in ((256, 256, "forward"), (512, 1024, "shuffled:4")):
                    check(simt, x, gamma, 16384, bitmap, threads=t, unpack_threads=ut, order=order)
    # The launcher's own block size.
    check(simt, randn(2 * 16384, dtype, 9), 0.9, 16384, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_65536(simt, dtype):
    # float32 and float64 chunks of 65536 don't fit in shared memory: the global-memory path.
    for n in (2 * 65536, 65536 + 5, 65536 // 3):
        x = randn(n, dtype, 65536 + n)
        for gamma in GAMMAS:
            for bitmap, t, ut in ((True, 512, 1024), (False, 256, 256)):
                check(simt, x, gamma, 65536, bitmap, threads=t, unpack_threads=ut)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk,n", [(7, 336), (1000, 2400), (4096, 8200)])
def test_adversarial_inputs(simt, dtype, chunk, n):
    for name, x in adversarial(dtype, n).items():
        for gamma in (0.5, 0.9, 0.99):
            for bitmap, t in ((True, 256), (False, 512)):
                check(simt, x, gamma, chunk, bitmap, threads=t, unpack_threads=t // 2)


def test_ties_on_a_bucket_edge(simt):
    # Keys equal in their top digits but different below: every radix pass matters.
    base = torch.tensor(1.0).view(torch.int32).item()
    ints = torch.tensor([base + (i % 5) for i in range(2000)], dtype=torch.int32)
    x = ints.view(torch.float32) * torch.tensor([1.0, -1.0]).repeat(1000)
    for gamma in (0.3, 0.5, 0.61, 0.9):
        for bitmap in (True, False):
            check(simt, x, gamma, 2000, bitmap, threads=256)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_keys(simt, dtype):
    for chunk, n in ((7, 40), (1000, 2100), (16384, 16390)):
        x = randn(n, dtype, chunk)
        for seed in (0, 12345, 2**62 + 7):
            for bitmap, t, ut in ((True, 256, 256), (False, 512, 1024)):
                check(simt, x, 0.9, chunk, bitmap, seed=seed, threads=t, unpack_threads=ut)
    check(simt, randn(3000, dtype, 3), 0.5, 1000, True, seed=99, threads=512)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_and_global_key_paths(simt, dtype):
    # Both ways of reading the keys, forced, at every dtype (source 0: staged in shared memory,
    # 1: re-read from global memory every radix pass), and the automatic choice under a small
    # shared-memory limit.
    x = randn(3 * 1000 + 123, dtype, 5)
    for source in (0, 1):
        check(simt, x, 0.9, 1000, True, threads=256, source=source)
        check(simt, x, 0.7, 1000, False, threads=512, source=source)
    check(simt, x, 0.9, 1000, True, threads=256, smem_limit=1024)


def test_grid_stride_and_schedule_order(simt):
    # Fewer blocks than chunks (each block loops over chunks); fibers resumed in other orders.
    x = randn(9 * 100 + 37, torch.float32, 6)
    for grid in (1, 2, 4):
        for bitmap in (True, False):
            check(simt, x, 0.8, 100, bitmap, threads=256, unpack_threads=128, grid=grid)
    for order in ("reverse", "shuffled:3"):
        check(simt, x, 0.8, 100, True, threads=256, order=order)
        check(simt, x, 0.8, 100, False, threads=512, order=order)


def test_empty(simt):
    for bitmap in (True, False):
        check(simt, torch.empty(0), 0.9, 16, bitmap)


def test_layer_really_synchronises(simt):
    # The layer's counters on one 16384 chunk at 512 threads: block barriers (wide digit,
    # candidates, selection, compaction), warp barriers (warp 0's select on the candidates), and
    # the compaction's two ballots per bitmap word (plus at most one vote per warp elsewhere).
    simt.pack(randn(16384, torch.float32, 7), 0.9, 16384, True, threads=512)
    stats = simt.last_stats()
    assert stats["blocks"] == 1 and stats["barriers"] >= 8 and stats["warp_syncs"] > 0
    assert 2 * 16384 // 32 <= stats["ballots"] <= 2 * 16384 // 32 + 512 // 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_path_stages_by_async_copies(simt, dtype):
    # pack_block with the chunk staged in shared memory (sm_80+, which the host layer emulates):
    # the 16-byte aligned middle of each chunk moves by asynchronous copies, the elements before
    # and after it by scalar loads, and each input byte is read from global memory once. Aligned
    # and misaligned views; every copy is waited for (else the layer fails the launch).
    es = torch.tensor([], dtype=dtype).element_size()
    D, chunks = 4096, 2
    base = randn(chunks * D + 16, dtype, 23)
    for offset in (0, 1, 3):
        x = base[offset:offset + chunks * D]
        check(simt, x, 0.9, D, True, threads=256)
        simt.pack(x, 0.9, D, True, threads=256)
        stats = simt.last_stats()
        copies = 0
        for c in range(chunks):
            head = (-(x.data_ptr() + c * D * es) % 16) // es  # elements before a 16-byte boundary
            copies += (D - head) * es // 16
        assert stats["async_copies"] == copies
        assert stats["global_load_bytes"] == x.numel() * es
        assert stats["global_loads"] - copies == x.numel() - copies * 16 // es  # the heads and tails
    # Not where the keys are re-read from global memory, nor in the per-warp kernel (D <= 1024).
    simt.pack(base[:chunks * D], 0.9, D, True, threads=256, source=1)
    assert simt.last_stats()["async_copies"] == 0
    simt.pack(base[:3000], 0.9, 1000, True)
    assert simt.last_stats()["async_copies"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_small_chunks_one_to_a_warp(simt, dtype):
    # Chunks up to 1024 elements go one to a warp: 8 chunks a block of 256 threads, warp barriers
    # only (the layer's own counters say so), at any block size and with warps striding over chunks.
    es = torch.empty(0, dtype=dtype).element_size()
    for D, per_warp in ((1, True), (1000, True), (1024, True), (1025, False)):
        assert simt.pack_plan(9 * D, 0.9, D, es)["per_warp"] == per_warp, D
    x = randn(9 * 1000 + 17, dtype, 31)
    simt.pack(x, 0.9, 1000, True)
    stats = simt.last_stats()
    assert stats["blocks"] == 2 and stats["barriers"] == 0 and stats["warp_syncs"] > 0
    for threads, grid in ((32, 0), (64, 1), (128, 2), (512, 0)):
        for bitmap in (True, False):
            check(simt, x, 0.9, 1000, bitmap, threads=threads, grid=grid)
            check(simt, x, 0.5, 1000, bitmap, seed=7, threads=threads, grid=grid)


def random_keys_from(seed, first, count):
    """The random key (splitmix64's finaliser of seed and global index) of indices first.., here."""
    mask = (1 << 64) - 1
    out = np.empty(count, dtype=np.int64)
    for j in range(count):
        z = (seed + (first + j + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out[j] = z >> 32
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_chunks_past_2_31_elements(simt, dtype):
    # The last chunks of a tensor of more than 2^31 elements: the layer runs only their blocks, on
    # pointers that stand for the whole tensor, so every chunk offset needs 64 bits.
    D = 16384
    n = (1 << 31) + 3 * D + 123
    start = (n // D - 2) * D
    tail = randn(n - start, dtype, 31)
    ops = torch.ops.dropit_cuda
    for bitmap in (True, False):
        values, index = simt.pack(tail, 0.9, D, bitmap, threads=512, start=start)
        ref_values, ref_index = ops.pack(tail, 0.9, D, bitmap)  # chunks are independent
        assert same_bytes(values, ref_values) and same_bytes(index, ref_index)
        out = simt.unpack(ref_values, ref_index, n, 0.9, D, bitmap, start=start)
        assert same_bytes(out, ops.unpack(ref_values, ref_index, tail.numel(), 0.9, D, bitmap))
    # Random keys hash the global index.
    seed = 77
    values, index = simt.pack(tail, 0.9, D, False, seed, threads=512, start=start)
    bits = bit_patterns(tail)
    kept = select_fast(random_keys_from(seed, start, tail.numel()), D, 0.9)
    np.testing.assert_array_equal(bit_patterns(values), np.concatenate([bits[c * D + p] for c, p in enumerate(kept)]))
    np.testing.assert_array_equal(index.numpy().astype(np.int64), np.concatenate(kept))


# ---- inputs that used to push the kernels off their fast paths (issue 21) ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views(simt, dtype):
    # Views with a storage offset: the chunk's first element sits at every offset from a 16-byte
    # boundary, and with D not a multiple of the 16-byte vector width every chunk starts
    # elsewhere. The layer registers only the view's own bytes, so a load before its first
    # element or past its last fails the launch; a misaligned vector access fails it too.
    per16 = 16 // torch.tensor([], dtype=dtype).element_size()
    base = randn(3 * 1001 + 2 * per16, dtype, 21)
    for offset in range(per16 + 1):
        for chunk, n in ((1001, 3 * 1001), (1000, 2 * 1000 + 3), (4096, 4096 + 5)):
            x = base[offset:offset + n]
            assert x.storage_offset() == offset and x.is_contiguous()
            for bitmap in (True, False):
                check(simt, x, 0.9, chunk, bitmap, threads=256, unpack_threads=128)
    # Unpack into and from views too: values and the bitmap at an offset.
    x = randn(3 * 4096, dtype, 22)
    values, index = torch.ops.dropit_cuda.pack(x, 0.9, 4096, True, None)
    shifted = torch.cat([values[:1], values])[1:]  # same values, one element further on
    out = simt.unpack(shifted, index, x.numel(), 0.9, 4096, True)
    assert same_bytes(out, torch.ops.dropit_cuda.unpack(values, index, x.numel(), 0.9, 4096, True))


def constant_column(rows: int, cols: int, col: int, rank: int, dtype, seed: int, first: int) -> torch.Tensor:
    """A (rows, cols) normal matrix (in `dtype`) with column `col` set to the `rank`-th largest
    magnitude of the other columns in the `first` rows, flattened: its ties repeat every `cols`
    elements, so they fall on the same lanes of every warp."""
    m = randn(rows * cols, torch.float64, seed).view(rows, cols).to(dtype).double()
    others = torch.cat([m[:first, :col], m[:first, col + 1:]], dim=1).abs().flatten()
    m[:, col] = others.sort(descending=True).values[rank]
    return m.flatten().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_constant_column_on_the_threshold(simt, dtype):
    # 16384-element chunks of a 64-column matrix whose column 3 holds one magnitude 256 times per
    # chunk, just above the keep-th largest of the rest: the threshold falls among its ties, which
    # all sit on the same lanes (more than a lane's share of the candidate buffer). Checked here on
    # the input, independently of the kernels.
    D, gamma = 16384, 0.9
    keep = D - math.floor(gamma * D)
    x = constant_column(2 * D // 64, 64, 3, keep - 100, dtype, 23, first=D // 64)
    mags = x[:D].double().abs()
    tie = mags[3].item()
    assert (mags > tie).sum() < keep <= (mags >= tie).sum() and (mags == tie).sum() >= 256
    for bitmap in (True, False):
        for threads, order in ((256, "forward"), (512, "forward"), (512, "shuffled:5")):
            check(simt, x, gamma, D, bitmap, threads=threads, unpack_threads=512, order=order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_equal_magnitudes_large_chunks(simt, dtype):
    # Every key in the threshold's bucket: the most crowded bucket there is, at the chunk sizes
    # where the fast paths matter.
    for D in (16384, 65536):
        x = torch.tensor([1.5, -1.5]).repeat(D).to(dtype)
        for bitmap in (True, False):
            check(simt, x, 0.9, D, bitmap, threads=512, unpack_threads=1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_and_inf_large_chunks(simt, dtype):
    # NaN (both signs) above +inf above every finite key, scattered through normal data.
    D = 16384
    x = randn(2 * D, torch.float64, 24)
    idx = torch.randperm(2 * D, generator=torch.Generator().manual_seed(25))
    x[idx[:300]] = math.nan
    x[idx[300:400]] = -math.nan
    x[idx[400:900]] = math.inf
    x[idx[900:1000]] = -math.inf
    for gamma in (0.9, 0.99):
        for bitmap in (True, False):
            check(simt, x.to(dtype), gamma, D, bitmap, threads=512, unpack_threads=512)


# Chunk sizes from 1 to the largest: powers of two, one either side, and odd ones.
CHUNK_SIZES = [1, 2, 3, 5, 8, 31, 32, 33, 100, 255, 256, 257, 1023, 1024, 1025, 2047, 4095, 4096, 4097, 8191,
               16383, 16384, 16385, 32768, 65535, 65536]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_chunk_size(simt, dtype):
    for D in CHUNK_SIZES:
        n = 2 * D + max(1, D // 3) if D < 4096 else D + D // 3  # a short last chunk
        x = randn(n, dtype, 26 + D)
        for bitmap in (True, False):
            check(simt, x, 0.9, D, bitmap)


def window_chunks(kind: str, L: int, dtype, seed: int, chunks: int = 3) -> torch.Tensor:
    """`chunks` chunks of L elements that put pack_warps' first digit (a window of bins placed by a
    sample of the chunk: the key at floor(l * L / 32) of each lane l, pack.cuh's WindowDigit) on
    its clamped bins: "above": the kept keys lie far above anything sampled, in the window's top
    bin; "below": distinct keys far below the sampled ones, and zeros, hold the threshold for a
    small gamma (bin 0 and the keys equal to its prefix); "edges": zeros sampled and the dtype's
    largest finite values, inf and NaN between (the window at the bottom of the key range)."""
    gen = torch.Generator().manual_seed(seed)
    sampled = torch.zeros(L, dtype=torch.bool)
    sampled[[lane * L // 32 for lane in range(32)]] = True
    largest = torch.finfo(dtype).max if dtype in (torch.float16, torch.bfloat16) else 6e4
    i = torch.arange(L)
    out = []
    for _ in range(chunks):
        x = torch.randn(L, generator=gen, dtype=torch.float64)
        scale = 2.0 ** (6 * torch.rand(L, generator=gen, dtype=torch.float64))  # six binades
        if kind == "above":  # a sixth of the chunk 1e4 times the rest (more than 1 - gamma of it)
            x = x * 1e-2
            x[torch.nonzero(~sampled).flatten()[: L // 6]] *= 1e4 * scale[: L // 6]
        elif kind == "below":  # half the chunk (every sampled key) large, a quarter tiny, a quarter 0
            big = (i % 2 == 0) | sampled
            x = x * 1e-5 * scale
            x[i % 4 == 3] = 0.0
            x[big] = 1e2 * torch.randn(int(big.sum()), generator=gen, dtype=torch.float64)
        else:
            x = largest * torch.rand(L, generator=gen, dtype=torch.float64) * torch.sign(x)
            x[i % 7 == 1] = math.inf
            x[i % 11 == 2] = -math.nan
            x[sampled] = 0.0
        out.append(x)
    return torch.cat(out).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_digit_clamped_bins(simt, dtype):
    # The per-warp kernel's first digit is exact whatever bin the threshold falls in, including
    # the window's two clamped ones (their buckets are not fixed-bit buckets).
    es = torch.empty(0, dtype=dtype).element_size()
    for L in (1000, 1024):
        assert simt.pack_plan(3 * L, 0.9, L, es)["per_warp"]
        for kind, gammas in (("above", (0.9, 0.99)), ("below", (0.1, 0.3, 0.9)), ("edges", (0.5, 0.9))):
            x = window_chunks(kind, L, dtype, 27 + L)
            for gamma in gammas:
                for bitmap in (True, False):
                    check(simt, x, gamma, L, bitmap, threads=256)
