"""An independent, slow and obvious NumPy model of DropIT's selection contract.

Sort-based: every chunk is stably sorted by key, descending, so ties go to the lower index; the
first keep(L) positions are the kept ones, stored in ascending order.
"""

from __future__ import annotations

import math

import numpy as np
import torch

UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
MASK64 = (1 << 64) - 1


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the contract reads ``x`` in (and unpack returns): channels_last(_3d) where ``x``
    is dense in it but not contiguous, else contiguous."""
    for rank, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == rank and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def bit_patterns(x: torch.Tensor) -> np.ndarray:
    """The tensor's elements in memory order, as unsigned integers of the same width."""
    fmt = memory_format(x)
    if fmt == torch.channels_last:
        x = x.permute(0, 2, 3, 1)
    elif fmt == torch.channels_last_3d:
        x = x.permute(0, 2, 3, 4, 1)
    flat = x.detach().cpu().contiguous().reshape(-1)
    size = flat.element_size()
    ints = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).numpy()
    return ints.view(UINT[size])


def magnitude_keys(bits: np.ndarray) -> np.ndarray:
    width = bits.dtype.itemsize * 8
    return (bits & bits.dtype.type((1 << (width - 1)) - 1)).astype(np.int64)


def random_keys(seed: int, n: int) -> np.ndarray:
    """splitmix64's finaliser over (seed, index), written with Python integers."""
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        out[i] = z >> 32
    return out


def keep(length: int, gamma: float) -> int:
    return length - math.floor(gamma * length)


def select(keys: np.ndarray, chunk: int, gamma: float) -> list[np.ndarray]:
    """Per chunk, the kept local positions in ascending order."""
    kept = []
    for start in range(0, len(keys), chunk):
        part = keys[start : start + chunk]
        order = sorted(range(len(part)), key=lambda i: (-int(part[i]), i))
        kept.append(np.array(sorted(order[: keep(len(part), gamma)]), dtype=np.int64))
    return kept


def select_fast(keys: np.ndarray, chunk: int, gamma: float) -> list[np.ndarray]:
    """``select`` vectorised over whole chunks (a stable argsort of -key), for large inputs."""
    n = len(keys)
    full = n // chunk
    kept = []
    if full:
        block = keys[: full * chunk].reshape(full, chunk)
        order = np.argsort(-block, axis=1, kind="stable")[:, : keep(chunk, gamma)]
        kept.extend(np.sort(order, axis=1))
    if n % chunk:
        kept.extend(select(keys[full * chunk :], chunk, gamma))
    return kept


def reference_pack(x: torch.Tensor, gamma: float, chunk: int, random_seed: int | None = None):
    """(values as bit patterns, uint16 offsets, int32 bitmap words) of the packed form."""
    bits = bit_patterns(x)
    keys = magnitude_keys(bits) if random_seed is None else random_keys(random_seed, len(bits))
    kept = select_fast(keys, chunk, gamma)
    words = -(-chunk // 32)
    values, offsets, bitmap = [], [], np.zeros(len(kept) * words, dtype=np.uint32)
    for c, pos in enumerate(kept):
        values.append(bits[c * chunk + pos])
        offsets.append(pos.astype(np.uint16))
        np.bitwise_or.at(bitmap, c * words + pos // 32, np.left_shift(np.uint32(1), (pos % 32).astype(np.uint32)))
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt)
    return cat(values, bits.dtype), cat(offsets, np.uint16), bitmap.view(np.int32)


def reference_unpack(x: torch.Tensor, gamma: float, chunk: int) -> np.ndarray:
    """The unpacked tensor's bit patterns, in memory order."""
    bits = bit_patterns(x)
    out = np.zeros_like(bits)
    for c, pos in enumerate(select_fast(magnitude_keys(bits), chunk, gamma)):
        out[c * chunk + pos] = bits[c * chunk + pos]
    return out
