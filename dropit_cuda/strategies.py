"""How a DropIT layer caches its input: the selection strategies of the paper's Table 2.

Every strategy turns a tensor ``x`` into a :class:`Cached`: a few tensors (which the autograd
functions hand to ``ctx.save_for_backward``) plus small metadata, and rebuilds from it the dense
tensor with the dropped elements set to zero. The formats:

``"parallel_min_k"`` (default)
    :func:`dropit_cuda.pack`: per chunk of ``chunk`` elements in memory order, the
    ``keep(L) = L - floor(gamma*L)`` largest-magnitude values plus a bitmap (or 16-bit offsets at
    very high ``gamma``). Bytes per element: ``(1-gamma)*s + 1/8``.
``"random"``
    The same kernels and format, ranked by a seeded hash instead of the magnitude: exactly
    ``keep(L)`` elements per chunk, chosen uniformly. The seed is drawn from torch's default
    (CPU) generator at every forward call, so ``torch.manual_seed`` makes runs reproducible on
    every device; CUDA generators are not touched.
``"min_k"``
    Exact min-k over the whole tensor: the ``keep(numel)`` largest-magnitude elements (the same
    key and tie rule as ``pack``: sign bit cleared, compared as unsigned, NaN above inf, ties to
    the lower memory-order position). Cached as the kept values in memory order plus a one-bit-
    per-element ``uint8`` bitmap.
``"min_k_channel"`` / ``"random_channel"``
    Whole channels: ``keep(C)`` of the ``C`` channels survive, those with the largest L2 norm over
    the mini-batch, or a uniformly random set (drawn with ``torch.randperm`` from the default CPU
    generator). The channel is dimension 1 of a conv input (its input channels) and the last
    dimension of a linear input (its features). Cached as the dense slice of kept channels plus
    their ``int32`` channel numbers.

No strategy leaves an ``int64`` tensor with one entry per kept element behind.

Under ``torch.compile`` ``"parallel_min_k"``, ``"min_k"`` and ``"min_k_channel"`` trace into the
graph (the DropIT layers compile with ``fullgraph=True``). The random draws of
``"random"`` and ``"random_channel"`` are kept out of the graph (a graph break), so a compiled model
selects exactly what the eager one selects after the same ``torch.manual_seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from . import ops
from .ops import Packed, SUPPORTED_DTYPES
from .settings import (
    DEFAULT_CHUNK,
    DEFAULT_GAMMA,
    DEFAULT_STRATEGY,
    STRATEGY_NAMES,
    Settings,
    check_strategy,
    keep_count,
)

__all__ = [
    "STRATEGIES",
    "Cached",
    "Strategy",
    "check_strategy",
    "compress",
    "get",
]


@dataclass(frozen=True)
class Cached:
    """A compressed tensor: ``tensors`` (saved for backward) and the metadata to rebuild it."""

    strategy: "Strategy"
    tensors: tuple
    meta: Any

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.nbytes for t in self.tensors)

    def with_tensors(self, tensors) -> "Cached":
        """The same metadata over other tensors (e.g. those from ``ctx.saved_tensors``)."""
        return Cached(self.strategy, tuple(tensors), self.meta)

    def unpack(self) -> torch.Tensor:
        """The dense tensor: the input's shape, dtype, device and layout, dropped elements 0."""
        return self.strategy.unpack(self.tensors, self.meta)

    def restore(self, tensors) -> torch.Tensor:
        """The dense tensor from ``tensors``, this cache's own tensors as the autograd function's
        backward gets them back (see :meth:`Strategy.restore`)."""
        return self.strategy.restore(tuple(tensors), self.meta)


class NativePack(NamedTuple):
    """A chunked strategy's pack as the native products make and take it (see
    ``dropit_cuda.functional._native_product``): cheaper to keep than a :class:`Cached`, which
    :func:`as_cached` makes of it where a Python autograd Function shares it."""

    strategy: "Strategy"
    values: torch.Tensor
    index: torch.Tensor
    bitmap: bool
    memory_order: int
    shape: torch.Size
    gamma: float
    chunk: int


def as_native(pack: Any) -> NativePack:
    """``pack`` (a :class:`Cached` of a chunked strategy or a :class:`NativePack`) as a
    :class:`NativePack`."""
    if isinstance(pack, NativePack):
        return pack
    meta: Packed = pack.meta
    return NativePack(pack.strategy, *pack.tensors, meta.index_kind == "bitmap",
                      ops.MEMORY_ORDERS.index(meta.memory_format), meta.shape, meta.gamma, meta.chunk)


def as_cached(pack: Any) -> Cached:
    """``pack`` (a :class:`Cached` or a :class:`NativePack`) as a :class:`Cached`."""
    if isinstance(pack, Cached):
        return pack
    p: NativePack = pack
    memory_format = ops.MEMORY_ORDERS[p.memory_order]
    meta = Packed(None, None, "bitmap" if p.bitmap else "offsets", p.shape, p.values.dtype, p.values.device,
                  memory_format, p.chunk, p.gamma)
    return Cached(p.strategy, (p.values, p.index), meta)


class Strategy:
    """How a layer's input is compressed for backward. Subclasses implement ``pack``/``unpack``
    and ``nbytes``; ``compress`` and the autograd functions call :meth:`cache`."""

    name: str
    #: whether ``channel_dim`` matters (the channel strategies)
    uses_channels: bool = False
    #: whether the cache is the chunked kernels' ``(values, index)`` with a ``Packed`` as metadata
    #: (the native products take it: see ``dropit_cuda.functional._native_strategy``)
    chunked: bool = False

    def pack(self, x: torch.Tensor, gamma: float, chunk: int, channel_dim: int) -> tuple[tuple, Any]:
        raise NotImplementedError

    def unpack(self, tensors: tuple, meta: Any) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, shape, dtype: torch.dtype, gamma: float, chunk: int, channel_dim: int = 1) -> int:
        """Bytes the cache of a tensor of ``shape`` and ``dtype`` holds at these settings."""
        raise NotImplementedError

    def restore(self, tensors: tuple, meta: Any) -> torch.Tensor:
        """``unpack`` for a cache the same forward made (the backward of a DropIT product): a
        strategy may skip checks there that guard a cache from elsewhere."""
        return self.unpack(tensors, meta)

    def cache(self, x: torch.Tensor, settings: Settings, channel_dim: int) -> Cached:
        tensors, meta = self.pack(x.detach(), settings.gamma, settings.chunk, channel_dim)
        return Cached(self, tuple(tensors), meta)

    def __repr__(self) -> str:
        return f"<strategy {self.name!r}>"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- parallel_min_k and random: the chunked kernels -------------------------------------------


def _eager(fn):
    # Random draws run eagerly under torch.compile: compiled random ops use their own generator,
    # and the draws of a compiled model must be those of the eager one.
    return torch._dynamo.disable(fn)


@_eager
def draw_seed() -> int:
    """A 62-bit seed from torch's default CPU generator (so ``torch.manual_seed`` fixes it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


class _Chunked(Strategy):
    """Per chunk of ``chunk`` elements in memory order, the kept values plus their index
    (:func:`dropit_cuda.pack`)."""

    chunked = True

    def seed(self) -> Optional[int]:
        return None

    def pack(self, x, gamma, chunk, channel_dim):
        # settings were checked when made; the metadata keeps no tensor (they go to save_for_backward)
        values, index, kind, memory_format = ops.pack_tensors(x, gamma, chunk, random_seed=self.seed())
        return (values, index), Packed(None, None, kind, x.shape, x.dtype, x.device, memory_format, chunk, gamma)

    def unpack(self, tensors, meta: Packed):
        return ops.unpack(meta.with_tensors(*tensors))

    def restore(self, tensors, meta: Packed):
        return ops.unpack_trusted(tensors[0], tensors[1], meta)

    def nbytes(self, shape, dtype, gamma, chunk, channel_dim=1):
        g = ops.Geometry(_numel(shape), chunk, gamma)
        values = g.total_kept * _itemsize(dtype)
        if g.resolve_index("auto") == "bitmap":
            return values + 4 * g.bitmap_words
        return values + 2 * g.total_kept


class ParallelMinK(_Chunked):
    name = "parallel_min_k"


class Random(_Chunked):
    name = "random"

    def seed(self) -> Optional[int]:
        return draw_seed()


# --- min_k: exact over the whole tensor -------------------------------------------------------

_KEY_VIEW = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}


@dataclass(frozen=True)
class _FlatMeta:
    shape: torch.Size
    dtype: torch.dtype
    memory_format: torch.memory_format
    numel: int


def magnitude_keys(flat: torch.Tensor) -> torch.Tensor:
    """The magnitude key of each element of a 1-D float tensor, as a non-negative integer tensor.

    The bit pattern with the sign bit cleared: orders by ``|x|``, +0 == -0, NaN above inf.
    16-bit keys are widened to int32.
    """
    if flat.dtype not in _KEY_VIEW:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {flat.dtype}")
    int_dtype, mask = _KEY_VIEW[flat.dtype]
    keys = flat.view(int_dtype) & mask
    return keys.to(torch.int32) if int_dtype == torch.int16 else keys


def _bit_shifts(device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def min_k_mask(flat: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest-magnitude elements of 1-D ``flat`` (ties: lower index)."""
    n = flat.numel()
    if keep >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    if keep <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    keys = magnitude_keys(flat)
    # the keep-th largest key is the (n - keep + 1)-th smallest
    threshold = torch.kthvalue(keys, n - keep + 1).values
    above = keys > threshold
    tied = keys == threshold
    room = keep - above.sum()
    return above | (tied & (torch.cumsum(tied, 0) <= room))


class MinK(Strategy):
    """The ``keep(numel)`` largest-magnitude elements of the whole tensor: the kept values in
    memory order plus a one-bit-per-element ``uint8`` bitmap."""

    name = "min_k"

    def pack(self, x, gamma, chunk, channel_dim):
        flat, memory_format = ops._memory_order(x)
        n = flat.numel()
        keep = keep_count(n, gamma)
        mask = min_k_mask(flat, keep)
        # the kept values in order, with static shapes (no boolean indexing, so torch.compile
        # traces it): dropped elements are scattered to a spare slot past the end
        slot = torch.where(mask, torch.cumsum(mask, 0) - 1, keep)
        values = flat.new_zeros(keep + 1).scatter_(0, slot, flat)[:keep]
        padded = torch.nn.functional.pad(mask, (0, (-n) % 8)).view(-1, 8).to(torch.uint8)
        bitmap = (padded << _bit_shifts(x.device)).sum(dim=1, dtype=torch.uint8)
        return (values, bitmap), _FlatMeta(x.shape, x.dtype, memory_format, n)

    def unpack(self, tensors, meta: _FlatMeta):
        values, bitmap = tensors
        bits = (bitmap.unsqueeze(1) >> _bit_shifts(bitmap.device)) & 1
        mask = bits.view(-1)[: meta.numel].bool()
        if values.numel() == 0:
            flat = values.new_zeros(meta.numel)
        else:
            slot = (torch.cumsum(mask, 0) - 1).clamp_(min=0)
            flat = torch.where(mask, values[slot], values.new_zeros(()))
        return ops.from_memory_order(flat, meta.shape, meta.memory_format)

    def nbytes(self, shape, dtype, gamma, chunk, channel_dim=1):
        n = _numel(shape)
        return keep_count(n, gamma) * _itemsize(dtype) + (n + 7) // 8


# --- channel strategies -----------------------------------------------------------------------


@dataclass(frozen=True)
class _ChannelMeta:
    shape: torch.Size
    dim: int
    memory_format: torch.memory_format


class _Channels(Strategy):
    """Whole channels: ``keep(C)`` of the ``C`` channels (dimension ``channel_dim``) survive,
    cached as the dense slice of kept channels plus their ``int32`` channel numbers."""

    uses_channels = True

    def pick(self, x: torch.Tensor, dim: int, keep: int) -> torch.Tensor:
        """The kept channels: int64, sorted ascending, on ``x.device``."""
        raise NotImplementedError

    def pack(self, x, gamma, chunk, channel_dim):
        dim = channel_dim % x.dim() if x.dim() > 0 else 0
        keep = keep_count(x.shape[dim], gamma)
        idx = self.pick(x, dim, keep)
        kept = x.index_select(dim, idx)
        return (kept, idx.to(torch.int32)), _ChannelMeta(x.shape, dim, ops.memory_format_of(x))

    def unpack(self, tensors, meta: _ChannelMeta):
        kept, idx = tensors
        out = torch.empty(meta.shape, dtype=kept.dtype, device=kept.device,
                          memory_format=meta.memory_format).zero_()
        return out.index_copy_(meta.dim, idx.long(), kept)

    def nbytes(self, shape, dtype, gamma, chunk, channel_dim=1):
        shape = tuple(shape)
        if not shape:
            return keep_count(1, gamma) * (_itemsize(dtype) + 4)
        channels = shape[channel_dim % len(shape)]
        keep = keep_count(channels, gamma)
        per_channel = _numel(shape) // channels if channels else 0
        return keep * (per_channel * _itemsize(dtype) + 4)


class MinKChannel(_Channels):
    """The channels with the largest L2 norm over the mini-batch (NaN counts as largest)."""

    name = "min_k_channel"

    def pick(self, x, dim, keep):
        others = [d for d in range(x.dim()) if d != dim]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        norms = torch.linalg.vector_norm(x, dim=others, dtype=acc) if others else x.to(acc).abs()
        norms = torch.nan_to_num(norms, nan=float("inf"))
        idx = torch.topk(norms, keep, sorted=False).indices
        return torch.sort(idx).values


@_eager
def _random_channels(channels: int, keep: int) -> torch.Tensor:
    perm = torch.randperm(channels)  # default CPU generator
    return torch.sort(perm[:keep]).values


class RandomChannel(_Channels):
    """A uniformly random set of channels (``torch.randperm`` on the default CPU generator)."""

    name = "random_channel"

    def pick(self, x, dim, keep):
        return _random_channels(x.shape[dim], keep).to(x.device)


# --- registry ---------------------------------------------------------------------------------

#: every strategy by name (look names from elsewhere up with :func:`get`, which checks them)
REGISTRY: dict[str, Strategy] = {
    s.name: s for s in (ParallelMinK(), MinK(), Random(), MinKChannel(), RandomChannel())
}
assert tuple(REGISTRY) == STRATEGY_NAMES
STRATEGIES = STRATEGY_NAMES


def get(name: str) -> Strategy:
    """The strategy object called ``name`` (TypeError/ValueError naming ``strategy`` otherwise)."""
    return REGISTRY[check_strategy(name)]


def compress(
    x: torch.Tensor,
    strategy: str = DEFAULT_STRATEGY,
    gamma: float = DEFAULT_GAMMA,
    chunk: int = DEFAULT_CHUNK,
    channel_dim: int = 1,
) -> Cached:
    """Compresses ``x`` the way a DropIT layer caches its input.

    Args:
        x: a floating tensor.
        strategy: one of :data:`STRATEGIES` (see the module docstring for the formats).
        gamma: dropping rate in ``[0, 1)``.
        chunk: chunk size of the chunked strategies, in ``[1, 65536]`` (checked for all).
        channel_dim: the channel dimension of the channel strategies (1 for conv inputs, -1 for
            linear inputs); checked only for those strategies.
    Returns:
        a :class:`Cached`; ``.unpack()`` gives the dense copy with the dropped elements zero.
    """
    ops.check_float_tensor(x)
    settings = Settings(gamma, strategy, chunk)
    impl = get(settings.strategy)
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
    if impl.uses_channels and not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"channel_dim {channel_dim} is out of range for a {x.dim()}-D tensor")
    return impl.cache(x, settings, channel_dim)
