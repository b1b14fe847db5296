"""Property tests (hypothesis) of pack/unpack and of tampered ``Packed`` objects.

The round trip is checked against tests/reference.py over random shapes, dtypes, γ, chunk sizes
and layouts. A tampered ``Packed`` is judged by an oracle written here from the format alone
(README, "Packed format"), slowly and obviously: either the tampered object is still a valid
packed form, and then ``unpack`` must decode it exactly as the format says (and, where its kept
values are nonzero, it is exactly the ``Packed`` that ``pack`` gives for the decoded tensor: an
honest one), or it is not, and then ``unpack`` and ``validate(full=True)`` must raise
ValueError/TypeError naming what is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

import dropit_cuda as dc
from reference import UINT, bit_patterns, memory_format, reference_pack, reference_unpack

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
FORMAT_RANK = {torch.contiguous_format: None, torch.channels_last: 4, torch.channels_last_3d: 5}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and element bit patterns (NaN payloads and -0 included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    size = a.element_size()
    return torch.equal(a.view(INT_OF[size]), b.view(INT_OF[size]))


# --- inputs --------------------------------------------------------------------------------------


@st.composite
def shapes(draw, max_numel: int = 1500):
    rank = draw(st.integers(0, 5))
    side = int(max_numel ** (1 / rank)) if rank else 1  # so that the product stays below max_numel
    shape = draw(st.lists(st.integers(1, side), min_size=rank, max_size=rank))
    if rank and draw(st.integers(0, 9)) == 0:  # now and then an empty tensor
        shape[draw(st.integers(0, rank - 1))] = 0
    return tuple(shape)


def fill(shape, dtype, seed: int, kind: str) -> torch.Tensor:
    """Seeded data of ``kind``: normal values, few distinct values (ties), or normal values with
    NaN, ±inf, ±0 and subnormals mixed in."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "ties":
        x = torch.randint(-2, 3, (n,), generator=g).double()
    else:
        x = torch.randn(n, generator=g, dtype=torch.float64)
        if kind == "specials":
            tiny = torch.finfo(dtype).smallest_normal
            pool = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, tiny / 4, -tiny / 2])
            where = torch.rand(n, generator=g) < 0.3
            pick = torch.randint(0, len(pool), (n,), generator=g)
            x = torch.where(where, pool[pick], x)
    return x.to(dtype).view(shape)


LAYOUTS = ["contiguous", "channels_last", "channels_last_3d", "transposed", "strided", "offset", "expanded"]


@st.composite
def tensors(draw, max_numel: int = 1500):
    """A tensor of a random shape, dtype, content and memory layout."""
    shape = draw(shapes(max_numel))
    dtype = draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "ties", "specials"]))
    rank = len(shape)
    usable = [l for l in LAYOUTS if not (
        (l == "channels_last" and rank != 4) or (l == "channels_last_3d" and rank != 5)
        or (l in ("transposed", "strided", "expanded") and rank == 0))]
    layout = draw(st.sampled_from(usable))
    if layout == "channels_last":
        x = fill(shape, dtype, seed, kind).contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = fill(shape, dtype, seed, kind).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        i, j = draw(st.integers(0, rank - 1)), draw(st.integers(0, rank - 1))
        swapped = list(shape)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        x = fill(tuple(swapped), dtype, seed, kind).transpose(i, j)
    elif layout == "strided":  # every other element along one dimension
        d = draw(st.integers(0, rank - 1))
        wide = list(shape)
        wide[d] *= 2
        x = fill(tuple(wide), dtype, seed, kind)[(slice(None),) * d + (slice(None, None, 2),)]
    elif layout == "offset":  # a view starting past its storage's first element
        x = fill((math.prod(shape) + 1,), dtype, seed, kind)[1:].view(shape)
    elif layout == "expanded":  # one dimension broadcast with stride 0
        d = draw(st.integers(0, rank - 1))
        one = list(shape)
        one[d] = 1
        x = fill(tuple(one), dtype, seed, kind).expand(shape)
    else:
        x = fill(shape, dtype, seed, kind)
    assert tuple(x.shape) == shape
    note(f"shape={shape} dtype={dtype} layout={layout} kind={kind} strides={x.stride()}")
    return x


chunks = st.one_of(st.integers(1, 100), st.sampled_from([127, 128, 129, 1000, 65536]))
gammas = st.one_of(st.just(0.0), st.floats(0.0, 1.0, exclude_max=True), st.sampled_from([0.5, 0.9, 0.99]))


# --- pack/unpack against the reference -----------------------------------------------------------


@given(x=tensors(), gamma=gammas, chunk=chunks, seeded=st.booleans())
def test_pack_unpack_match_reference(x, gamma, chunk, seeded):
    seed = 12345 if seeded else None
    ref_values, ref_offsets, ref_bitmap = reference_pack(x, gamma, chunk, seed)
    for index in ("bitmap", "offsets", "auto"):
        p = dc.pack(x, gamma, chunk, index, random_seed=seed)
        if index == "auto":  # the smaller encoding (the bitmap on a tie)
            assert p.index_kind == ("bitmap" if ref_bitmap.nbytes <= ref_offsets.nbytes else "offsets")
        assert p.shape == x.shape and p.dtype == x.dtype and p.memory_format == memory_format(x)
        np.testing.assert_array_equal(bit_patterns(p.values), ref_values)
        want = ref_bitmap if p.index_kind == "bitmap" else ref_offsets
        np.testing.assert_array_equal(p.index.numpy(), want)
        p.validate(full=True)
        y = dc.unpack(p)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.is_contiguous(memory_format=memory_format(x))
        if seed is None:
            np.testing.assert_array_equal(bit_patterns(y), reference_unpack(x, gamma, chunk))
        if gamma == 0.0:  # γ = 0 gives the input back bit for bit
            assert same_bits(y, x.contiguous())


# --- the oracle: the packed format, from the README -----------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def chunk_plan(p):
    """(lengths, keeps, K) of each chunk, for metadata already found well-typed."""
    n, D = math.prod(p.shape), p.chunk
    lengths = [min(D, n - s) for s in range(0, n, D)]
    return lengths, [L - math.floor(p.gamma * L) for L in lengths], D - math.floor(p.gamma * D)


def kept_positions(p, c: int, L: int, k: int, K: int) -> list[int]:
    """Chunk c's positions as its index states them (offsets, or the set bits in order)."""
    if p.index_kind == "offsets":
        return [int(v) for v in p.index[c * K : c * K + k].to(torch.int64)]
    words = -(-p.chunk // 32)
    ws = [int(w) & 0xFFFFFFFF for w in p.index[c * words : (c + 1) * words]]
    return [j for j in range(32 * words) if ws[j // 32] >> (j % 32) & 1]


def format_violations(p) -> list[str]:
    """What makes ``p`` not a valid packed form: names of the fields at fault (empty if valid).
    Field checks come first; the cross-checks need well-typed metadata."""
    bad = [f"Packed.{f}" for f in ("values", "index") if not isinstance(getattr(p, f), torch.Tensor)]
    if not (isinstance(p.gamma, (int, float)) and not isinstance(p.gamma, bool) and 0 <= p.gamma < 1):
        bad.append("Packed.gamma")
    if not (_is_int(p.chunk) and 1 <= p.chunk <= 65536):
        bad.append("Packed.chunk")
    if not (isinstance(p.index_kind, str) and p.index_kind in ("bitmap", "offsets")):
        bad.append("Packed.index_kind")
    if not (isinstance(p.shape, tuple) and all(_is_int(d) and d >= 0 for d in p.shape)):
        bad.append("Packed.shape")
    if not (isinstance(p.dtype, torch.dtype) and p.dtype in FLOATS):
        bad.append("Packed.dtype")
    if not isinstance(p.device, torch.device):
        bad.append("Packed.device")
    if not isinstance(p.memory_format, torch.memory_format) or p.memory_format not in FORMAT_RANK or (
        "Packed.shape" not in bad and FORMAT_RANK[p.memory_format] not in (None, len(p.shape))
    ):
        bad.append("Packed.memory_format")
    if bad:
        return bad
    lengths, keeps, K = chunk_plan(p)
    words = -(-p.chunk // 32)
    v, i = p.values, p.index
    if v.dtype != p.dtype or v.dim() != 1 or v.numel() != sum(keeps) or not v.is_contiguous():
        bad.append("Packed.values")
    want_dtype, want_len = (torch.int32, len(lengths) * words) if p.index_kind == "bitmap" else (
        torch.uint16, sum(keeps))
    if i.dtype != want_dtype or i.dim() != 1 or i.numel() != want_len or not i.is_contiguous():
        bad.append("Packed.index")
    bad += [f"Packed.{f}" for f, t in (("values", v), ("index", i)) if t.device != p.device]
    if bad:
        return bad
    for c, (L, k) in enumerate(zip(lengths, keeps)):
        pos = kept_positions(p, c, L, k, K)
        if len(pos) != k or any(q >= L for q in pos) or pos != sorted(set(pos)):
            return [p.index_kind]  # the kernels and validate name the index encoding
    return []


def decode(p) -> torch.Tensor:
    """The dense tensor a valid ``p`` stands for: chunk c's r-th kept value at its r-th stated
    position, zeros elsewhere, laid out in ``p.memory_format``."""
    lengths, keeps, K = chunk_plan(p)
    size = p.values.element_size()
    vals = p.values.view(INT_OF[size]).numpy().view(UINT[size])
    out = np.zeros(math.prod(p.shape), dtype=UINT[size])
    for c, (L, k) in enumerate(zip(lengths, keeps)):
        for r, q in enumerate(kept_positions(p, c, L, k, K)):
            out[c * p.chunk + q] = vals[c * K + r]
    flat = torch.from_numpy(out.view(np.dtype(f"int{8 * size}"))).view(p.dtype)
    if p.memory_format == torch.channels_last:
        n, ch, h, w = p.shape
        return flat.view(n, h, w, ch).permute(0, 3, 1, 2)
    if p.memory_format == torch.channels_last_3d:
        n, ch, d, h, w = p.shape
        return flat.view(n, d, h, w, ch).permute(0, 4, 1, 2, 3)
    return flat.view(p.shape)


# --- tamperings ----------------------------------------------------------------------------------


def _signed32(word: int) -> int:
    """An unsigned 32-bit word as the int32 a bitmap holds."""
    return word - 2**32 if word >= 2**31 else word


def _set(tensor: torch.Tensor, i: int, value) -> torch.Tensor:
    """A copy of 1-D ``tensor`` with element i set (via int64: uint16 has no index_put)."""
    t = tensor.to(torch.int64)
    t[i] = value
    return t.to(tensor.dtype)


TAMPERINGS = ["values_bits", "values_swap_chunks", "values_len", "values_dtype", "values_layout",
              "values_device", "index_corrupt", "index_reselect", "index_dtype", "index_len", "shape",
              "dtype", "memory_format", "device", "chunk", "gamma", "index_kind"]


@st.composite
def tampered(draw, p, field: str):
    """``p`` with ``field`` changed: to something invalid, or to another valid packed form."""
    replace = lambda **kw: dataclasses.replace(p, **kw)
    v, idx, g = p.values, p.index, p.geometry
    if field == "values_bits":  # undetectable by design: no checksum over the values
        assume(v.numel() > 0)
        bits = v.view(INT_OF[v.element_size()]).clone()
        bits[draw(st.integers(0, v.numel() - 1))] ^= 1 << draw(st.integers(0, 8 * v.element_size() - 2))
        return p.with_tensors(bits.view(v.dtype), idx)
    if field == "values_swap_chunks":  # undetectable: chunks of one geometry hold any values
        full = g.num_chunks - (1 if g.keep_last != g.keep else 0)
        assume(full >= 2)
        a, b = draw(st.integers(0, full - 1)), draw(st.integers(0, full - 1))
        blocks = list(v.split(g.keep))
        blocks[a], blocks[b] = blocks[b], blocks[a]
        return p.with_tensors(torch.cat(blocks), idx)
    if field == "values_len":
        n = v.numel() + draw(st.sampled_from([-1, 1, 7]))
        assume(n >= 0)
        return p.with_tensors(torch.cat([v, v.new_ones(7)])[:n], idx)
    if field == "values_dtype":
        return p.with_tensors(v.to(draw(st.sampled_from(
            [t for t in FLOATS if t != v.dtype] + [torch.int32, torch.complex64]))), idx)
    if field == "values_layout":  # 2-D, or 1-D with stride 2
        if draw(st.booleans()):
            return p.with_tensors(v.view(1, -1), idx)
        return p.with_tensors(torch.stack([v, v], 1)[:, 0], idx)
    if field == "values_device":
        return p.with_tensors(v.to("meta"), idx)
    if field == "index_corrupt":  # offsets swapped, duplicated, reversed or overwritten; bits flipped
        assume(idx.numel() > 0)
        i = draw(st.integers(0, idx.numel() - 1))
        if p.index_kind == "bitmap":  # flip some bits of one word
            word = (int(idx[i]) & 0xFFFFFFFF) ^ draw(st.integers(1, 2**32 - 1))
            return p.with_tensors(v, _set(idx, i, _signed32(word)))
        start = i // g.keep * g.keep
        end = min(start + g.keep, idx.numel())
        offs = idx.to(torch.int64)
        how = draw(st.sampled_from(["swap", "duplicate", "reverse", "overwrite"]))
        if how == "overwrite" or end - start < 2:
            offs[i] = draw(st.integers(0, 65535))
        elif how == "swap":
            offs[[start, start + 1]] = offs[[start + 1, start]]
        elif how == "duplicate":
            offs[start + 1] = offs[start]
        else:
            offs[start:end] = offs[start:end].flip(0)
        return p.with_tensors(v, offs.to(torch.uint16))
    if field == "index_reselect":  # other positions of one chunk, still a valid index
        assume(g.num_chunks > 0)
        c = draw(st.integers(0, g.num_chunks - 1))
        L, k = (g.chunk, g.keep) if c + 1 < g.num_chunks else (g.last_len, g.keep_last)
        pos = sorted(draw(st.lists(st.integers(0, L - 1), min_size=k, max_size=k, unique=True)))
        if p.index_kind == "offsets":
            offs = idx.to(torch.int64)
            offs[c * g.keep : c * g.keep + k] = torch.tensor(pos)
            return p.with_tensors(v, offs.to(torch.uint16))
        words = -(-p.chunk // 32)
        t = idx.clone()
        for w in range(words):
            t[c * words + w] = _signed32(sum(1 << (j % 32) for j in pos if j // 32 == w))
        return p.with_tensors(v, t)
    if field == "index_dtype":
        return p.with_tensors(v, idx.to(draw(st.sampled_from([t for t in (
            torch.int32, torch.uint16, torch.int64, torch.int16, torch.uint8, torch.float32) if t != idx.dtype]))))
    if field == "index_len":
        n = idx.numel() + draw(st.sampled_from([-1, 1]))
        assume(n >= 0)
        return p.with_tensors(v, torch.cat([idx, idx.new_zeros(1)])[:n])
    if field == "shape":
        how = draw(st.sampled_from(["reshape", "random", "negative", "float", "list"]))
        if how == "reshape":  # same numel: undetectable; the same memory order in another shape
            n = p.numel
            a = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0] or [0]))
            shape = (a, n // a) if n else (0, draw(st.integers(0, 5)))
            if p.memory_format != torch.contiguous_format:  # keep the rank the format needs
                shape = shape + (1,) * (len(p.shape) - 2)
            return replace(shape=torch.Size(shape))
        if how == "random":
            return replace(shape=torch.Size(draw(shapes())))
        if how == "negative":
            return replace(shape=(-1,) + tuple(p.shape)[1:])
        if how == "float":
            return replace(shape=tuple(float(d) for d in p.shape) or (1.0,))
        return replace(shape=list(p.shape))
    if field == "dtype":
        return replace(dtype=draw(st.sampled_from([t for t in FLOATS if t != p.dtype] + [torch.int32, "float32"])))
    if field == "memory_format":
        return replace(memory_format=draw(st.sampled_from([
            torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format,
            "channels_last"])))
    if field == "device":
        return replace(device=draw(st.sampled_from([torch.device("meta"), "cpu"])))
    if field == "chunk":
        return replace(chunk=draw(st.one_of(st.integers(-2, 70000), st.sampled_from(
            [p.chunk + 1, max(1, p.chunk - 1), 2 * p.chunk, float(p.chunk), True]))))
    if field == "gamma":
        return replace(gamma=draw(st.one_of(st.floats(-0.5, 1.5), st.sampled_from(
            [p.gamma + 1e-9, p.gamma + 0.01, 1.0, math.nan, True, "0.5"]))))
    assert field == "index_kind"
    return replace(index_kind=draw(st.sampled_from(["bitmap", "offsets", "auto", "dense", None])))


@pytest.mark.parametrize("field", TAMPERINGS)
@given(data=st.data(), x=tensors(max_numel=400), gamma=gammas, index=st.sampled_from(["bitmap", "offsets"]))
def test_tampered_packed_raises_or_unpacks_as_an_honest_one(field, data, x, gamma, index):
    # small chunks where the tampering needs several of them
    chunk = data.draw(st.integers(1, 16) if field == "values_swap_chunks" else chunks, label="chunk")
    p = dc.pack(x, gamma, chunk, index)
    assert format_violations(p) == []  # the oracle accepts what pack makes
    q = data.draw(tampered(p, field), label="tampered")
    faults = format_violations(q)
    note(f"faults {faults}")
    event("rejected" if faults else "valid")  # see --hypothesis-show-statistics
    if faults:
        for check in (lambda: dc.unpack(q), lambda: q.validate(full=True)):
            with pytest.raises((ValueError, TypeError)) as err:
                check()
            assert any(f in str(err.value) for f in faults), (faults, str(err.value))
        return
    y = dc.unpack(q)
    q.validate(full=True)
    want = decode(q)
    assert same_bits(y, want)
    assert y.numel() == 0 or y.is_contiguous(memory_format=q.memory_format)  # (no layout if empty)
    kept = q.values.view(INT_OF[q.values.element_size()])
    sign = 1 << (8 * q.values.element_size() - 1)
    if not ((kept & (sign - 1)) == 0).any():  # no kept ±0, so the selection of y is unique:
        r = dc.pack(y, q.gamma, q.chunk, q.index_kind)  # q is exactly pack's Packed of y
        assert same_bits(r.values, q.values) and torch.equal(r.index, q.index)
        assert r.shape == q.shape


# --- the undetectable cases, stated directly -----------------------------------------------------


@pytest.mark.parametrize("index", ["bitmap", "offsets"])
def test_swapped_tensors_of_one_geometry_are_undetectable(index):
    """Two Packed objects of one geometry: each one's metadata over the other's tensors is a
    valid Packed, and unpacks to the other's tensor exactly (nothing ties values to a tensor)."""
    a = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    b = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    pa, pb = dc.pack(a, 0.8, 64, index), dc.pack(b, 0.8, 64, index)
    crossed = pa.with_tensors(*pb.tensors())
    crossed.validate(full=True)
    assert same_bits(dc.unpack(crossed), dc.unpack(pb))
    # values swapped between two chunks of one Packed: an honest Packed of the swapped tensor
    K = pa.geometry.keep
    blocks = list(pa.values.split(K))
    blocks[0], blocks[1] = blocks[1], blocks[0]
    swapped = pa.with_tensors(torch.cat(blocks), pa.index)
    y = dc.unpack(swapped)
    honest = dc.pack(y, 0.8, 64, index)
    assert same_bits(honest.values, swapped.values) and torch.equal(honest.index, swapped.index)
