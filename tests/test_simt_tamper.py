"""The CUDA unpack bodies on a tampered index, under the host SIMT layer, which checks every global
access against the launch's buffers (and fails the launch on any outside them): whatever the
index holds, the bodies stay in bounds, and the output is what unpack.cuh's comment promises,
worked out here independently:

- bitmap: the marked elements among a chunk's first L take the chunk's values in index order,
  marked elements past the chunk's keep count get +0, everything else +0;
- offsets: an element named by offsets below L holds the value of one of those offsets (which
  one is not specified), every other element +0.
"""

import math

import numpy as np
import pytest
import torch

import dropit_cuda  # noqa: F401
from cases import randn
from reference import bit_patterns
from simt.build import load

# (elements, chunk, gamma): a short last chunk, full chunks, a chunk of 65536.
GEOMETRIES = [(2500, 1000, 0.8), (3 * 4096 + 100, 4096, 0.9), (65536 + 77, 65536, 0.5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.fixture(scope="module")
def simt():
    return load()


def chunks(n, chunk, gamma):
    """(first element, length, first value, keep) of each chunk."""
    keep_full = chunk - math.floor(gamma * chunk)
    for c in range(-(-n // chunk)):
        length = min(chunk, n - c * chunk)
        yield c * chunk, length, c * keep_full, length - math.floor(gamma * length)


def expected_from_bitmap(values, words, n, chunk, gamma):
    vals = bit_patterns(values)
    w = words.numpy().view(np.uint32)
    per_chunk = -(-chunk // 32)
    out = np.zeros(n, dtype=vals.dtype)
    for c, (start, length, v0, keep) in enumerate(chunks(n, chunk, gamma)):
        marked = [e for e in range(length) if (int(w[c * per_chunk + e // 32]) >> (e % 32)) & 1]
        for j, e in enumerate(marked[:keep]):
            out[start + e] = vals[v0 + j]
    return out


def bitmap_tampered(words, kind, gen):
    w = words.clone()
    if kind == "random":
        w = torch.randint(-(2**31), 2**31, w.shape, generator=gen, dtype=torch.int64).to(torch.int32)
    elif kind == "all_ones":
        w.fill_(-1)
    elif kind == "all_zeros":
        w.zero_()
    elif kind == "extra_bits":  # more marked than kept, also past each chunk's length
        w |= torch.randint(0, 2**31, w.shape, generator=gen, dtype=torch.int64).to(torch.int32)
    elif kind == "fewer_bits":
        w &= torch.randint(0, 2**31, w.shape, generator=gen, dtype=torch.int64).to(torch.int32)
    return w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,chunk,gamma", GEOMETRIES)
@pytest.mark.parametrize("kind", ["random", "all_ones", "all_zeros", "extra_bits", "fewer_bits"])
def test_bitmap_tampered(simt, dtype, n, chunk, gamma, kind):
    x = randn(n, dtype, n + chunk)
    values, words = torch.ops.dropit_cuda.pack(x, gamma, chunk, True, None)
    bad = bitmap_tampered(words, kind, torch.Generator().manual_seed(n))
    out = simt.unpack(values, bad, n, gamma, chunk, True, threads=256, grid=2)
    np.testing.assert_array_equal(bit_patterns(out), expected_from_bitmap(values, bad, n, chunk, gamma))


def offsets_tampered(offsets, n, chunk, gamma, kind, gen):
    o = offsets.numpy().astype(np.int64).copy()
    for start, length, v0, keep in chunks(n, chunk, gamma):
        part = o[v0:v0 + keep]
        if kind == "shuffled":
            part[:] = part[torch.randperm(keep, generator=gen).numpy()]
        elif kind == "reversed":
            part[:] = part[::-1].copy()
        elif kind == "duplicates":
            part[1::2] = part[0:keep - 1:2]
        elif kind == "past_length":
            part[::3] = length + torch.randint(0, 65536 - length, (len(part[::3]),), generator=gen).numpy() \
                if length < 65536 else part[::3]
        elif kind == "random":
            part[:] = torch.randint(0, 65536, (keep,), generator=gen).numpy()
    return torch.from_numpy(o.astype(np.uint16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,chunk,gamma", GEOMETRIES)
@pytest.mark.parametrize("kind", ["shuffled", "reversed", "duplicates", "past_length", "random"])
def test_offsets_tampered(simt, dtype, n, chunk, gamma, kind):
    x = randn(n, dtype, n + 2 * chunk)
    values, offsets = torch.ops.dropit_cuda.pack(x, gamma, chunk, False, None)
    bad = offsets_tampered(offsets, n, chunk, gamma, kind, torch.Generator().manual_seed(n))
    out = bit_patterns(simt.unpack(values, bad, n, gamma, chunk, False, threads=256, grid=2))
    vals = bit_patterns(values)
    o = bad.numpy().astype(np.int64)
    for start, length, v0, keep in chunks(n, chunk, gamma):
        named = {}
        for r in range(keep):
            if o[v0 + r] < length:
                named.setdefault(int(o[v0 + r]), set()).add(int(vals[v0 + r]))
        got = out[start:start + length]
        for e in range(length):
            assert int(got[e]) in named.get(e, {0}), (start, e)
