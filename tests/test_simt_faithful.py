"""The host SIMT layer is faithful: leaving out any one barrier of the pack or unpack bodies gives a
wrong answer (or an access the layer rejects) under it, while the bodies with every barrier give
the right one.

The barriers are found independently of the code under test: their names are read from the enums
in the kernel headers, every one must be called by the runs below, and the headers may not call
the barrier primitive directly (only through the policy that names the barrier).
"""

import re
from pathlib import Path

import pytest
import torch

import dropit_cuda  # noqa: F401
from cases import randn
from simt.build import load

CUDA = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
ORDERS = ["forward", "reverse", "shuffled:1", "shuffled:2"]


@pytest.fixture(scope="module")
def simt():
    return load()


def enum_ids(header: str, enum: str) -> dict[str, int]:
    """The enumerators of `enum` in a header, with their values (the first is 1, then counting up)."""
    body = re.search(r"enum\s+" + enum + r"\s*:\s*int\s*\{(.*?)\};", (CUDA / header).read_text(), re.S).group(1)
    names = re.findall(r"^\s*(k\w+)", body, re.M)
    assert names and "= 1" in body.split(",")[0]
    return {name: i + 1 for i, name in enumerate(names)}


def same(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def crowded_bucket(n: int) -> torch.Tensor:
    """float32 values that all share their top 12 key bits, with distinct low bits: more than the
    candidate buffer holds, so the select refines over the whole chunk."""
    low = torch.randperm(1 << 19, generator=torch.Generator().manual_seed(5))[:n].to(torch.int32)
    return (torch.tensor(1.0).view(torch.int32) + low).view(torch.float32)


# (input, gamma, chunk, keyword arguments): the select over candidates, a bucket kept whole after
# the wide digit, the fallback over a crowded bucket, and blocks that stride over several chunks
# (also a misaligned bf16 view: chunks staged by asynchronous copies with a head and a tail);
# then chunks of a warp each (chunk <= 1024): warps of one block, and warps that stride over
# several chunks. (kChunkCopied, the wait for the asynchronous copies, is left out like a barrier.)
PACK_CASES = [
    (lambda: randn(4096, torch.float32, 11), 0.9, 4096, {}),
    (lambda: randn(4096, torch.float32, 12).clamp_min(0), 0.5, 4096, {}),
    (lambda: crowded_bucket(8192), 0.7, 8192, {}),
    (lambda: randn(3 * 2000 + 123, torch.float32, 13), 0.8, 2000, {"grid": 1}),
    (lambda: randn(2 * 2000 + 7, torch.bfloat16, 17)[3:], 0.8, 2000, {"grid": 1}),
    (lambda: randn(3 * 1000 + 123, torch.float32, 15), 0.8, 1000, {"grid": 1}),
    (lambda: randn(20 * 100 + 37, torch.float32, 16), 0.8, 100, {"grid": 1}),
]


def pack_right(simt, case, order, drop):
    make, gamma, chunk, kw = case
    x = make()
    ref = torch.ops.dropit_cuda.pack(x, gamma, chunk, True, None)
    try:
        values, index = simt.pack(x, gamma, chunk, True, threads=256, order=order, drop_barrier=drop, **kw)
    except RuntimeError:  # an access the layer rejects
        return False
    return same(values, ref[0]) and same(index, ref[1])


def unpack_right(simt, bitmap, order, drop):
    # Chunks of 128 words over 4 warps (every warp's position depends on the scan), and one block
    # striding over three chunks.
    x = randn(2 * 4096 + 1234, torch.float32, 14)
    values, index = torch.ops.dropit_cuda.pack(x, 0.8, 4096, bitmap, None)
    ref = torch.ops.dropit_cuda.unpack(values, index, x.numel(), 0.8, 4096, bitmap)
    try:
        out = simt.unpack(values, index, x.numel(), 0.8, 4096, bitmap, threads=128, grid=1, order=order,
                          drop_barrier=drop)
    except RuntimeError:
        return False
    return same(out, ref)


def test_headers_call_barriers_only_through_the_policy():
    # (The wait for asynchronous copies too: the policy names it, so that it can be left out.)
    for header in ("pack.cuh", "unpack.cuh", "select.cuh", "bitmap.cuh", "relu_mask.cuh"):
        text = (CUDA / header).read_text()
        assert "simt::sync()" not in text and "copy_async_wait_all" not in text, header


def test_every_pack_barrier_is_needed(simt):
    ids = enum_ids("select.cuh", "PackBarrier")
    called = set()
    for case in PACK_CASES:
        for order in ORDERS:
            assert pack_right(simt, case, order, 0), (case, order)
        called |= set(simt.last_barrier_ids())
    assert called == set(ids.values()), f"barriers never reached: {set(ids) - {n for n, i in ids.items() if i in called}}"
    for name, i in ids.items():
        broken = any(not pack_right(simt, case, order, i) for case in PACK_CASES for order in ORDERS)
        assert broken, f"pack without barrier {name} still gives the right answer"


def test_every_unpack_barrier_is_needed(simt):
    ids = enum_ids("unpack.cuh", "UnpackBarrier")
    called = set()
    for bitmap in (True, False):
        for order in ORDERS:
            assert unpack_right(simt, bitmap, order, 0)
        called |= set(simt.last_barrier_ids())
    assert called == set(ids.values())
    for name, i in ids.items():
        broken = any(not unpack_right(simt, bitmap, order, i) for bitmap in (True, False) for order in ORDERS)
        assert broken, f"unpack without barrier {name} still gives the right answer"
