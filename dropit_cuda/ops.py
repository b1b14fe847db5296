"""Python wrappers of the native ops: ``pack``, ``unpack`` and the ``Packed`` cache."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import _native
from .settings import DEFAULT_CHUNK, DEFAULT_GAMMA, MAX_CHUNK, check_chunk, check_gamma, keep_count

_native.load()

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_KINDS = ("auto", "bitmap", "offsets")


@dataclass(frozen=True)
class Geometry:
    """Sizes of the packed form of ``numel`` elements in chunks of ``chunk``."""

    numel: int
    chunk: int
    gamma: float

    @property
    def num_chunks(self) -> int:
        return (self.numel + self.chunk - 1) // self.chunk

    @property
    def keep(self) -> int:
        return keep_count(self.chunk, self.gamma)

    @property
    def last_len(self) -> int:
        """Length of the last chunk (0 when there are none)."""
        return self.numel - (self.num_chunks - 1) * self.chunk if self.num_chunks else 0

    @property
    def keep_last(self) -> int:
        return keep_count(self.last_len, self.gamma)

    @property
    def total_kept(self) -> int:
        if self.num_chunks == 0:
            return 0
        return (self.num_chunks - 1) * self.keep + self.keep_last

    @property
    def bitmap_words(self) -> int:
        return self.num_chunks * ((self.chunk + 31) // 32)

    def resolve_index(self, index: str) -> str:
        """``"auto"`` picks the smaller encoding (the bitmap on a tie)."""
        if index != "auto":
            return index
        return "bitmap" if 4 * self.bitmap_words <= 2 * self.total_kept else "offsets"


#: The memory orders a tensor is packed in, as the native ops number them.
MEMORY_ORDERS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout ``x`` is read in: channels_last(_3d) where it is dense in that layout and not
    contiguous, else contiguous (a non-dense tensor is copied to contiguous first)."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _memory_order(x: torch.Tensor) -> tuple[torch.Tensor, torch.memory_format]:
    """``x`` as a 1-D tensor in its memory order, and that order's memory format."""
    fmt = memory_format_of(x)
    if fmt == torch.channels_last:
        return x.permute(0, 2, 3, 1).reshape(-1), fmt
    if fmt == torch.channels_last_3d:
        return x.permute(0, 2, 3, 4, 1).reshape(-1), fmt
    return x.contiguous().view(-1), fmt


def from_memory_order(flat: torch.Tensor, shape, memory_format: torch.memory_format) -> torch.Tensor:
    """The inverse of ``_memory_order``: 1-D ``flat`` viewed as ``shape`` in ``memory_format``."""
    shape = tuple(shape)
    if memory_format == torch.channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    if memory_format == torch.channels_last_3d:
        n, c, d, h, w = shape
        return flat.view(n, d, h, w, c).permute(0, 4, 1, 2, 3)
    return flat.view(shape)


def check_float_tensor(x, name: str = "x") -> None:
    """Raises TypeError unless ``x`` is a dense (strided) tensor of a dtype the kernels take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _check_strided(x, name)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_strided(x: torch.Tensor, name: str) -> None:
    # sparse and nested tensors have no memory order of their elements to chunk
    if x.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")


def dense_input(x: torch.Tensor, name: str = "input") -> torch.Tensor:
    """``x`` as the strided tensor a DropIT layer caches: sparse tensors densified (the layers
    take what ``F.linear`` takes), nested ones refused with a TypeError naming ``name``."""
    if x.layout != torch.strided and not x.is_nested:
        return x.to_dense()
    _check_strided(x, name)
    return x


# The rank each memory format of a Packed needs (None: any).
_FORMAT_RANK = {torch.contiguous_format: None, torch.channels_last: 4, torch.channels_last_3d: 5}


def _popcount32(v: torch.Tensor) -> torch.Tensor:
    """Set bits of each element of an int64 tensor holding values in [0, 2**32) (SWAR count)."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) >> 24) & 0xFF


@dataclass(frozen=True)
class Packed:
    """The kept values of a tensor and their index; ``unpack`` rebuilds the sparse copy.

    ``values`` holds, for chunk ``c``, its kept values at ``values[c*K : c*K + keep(L_c)]`` in
    ascending index order (``K = keep(chunk)``). ``index`` is ``bitmap`` (int32 words,
    ``ceil(chunk/32)`` per chunk, bit ``j`` of word ``w`` marks element ``32*w + j``) or
    ``offsets`` (uint16 local positions, aligned with ``values``). ``tensors`` and
    ``with_tensors`` let autograd functions pass the tensors through ``ctx.save_for_backward``.
    """

    values: torch.Tensor
    index: torch.Tensor
    index_kind: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    memory_format: torch.memory_format
    chunk: int
    gamma: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed tensors."""
        return self.values.nbytes + self.index.nbytes

    @property
    def bitmap(self) -> Optional[torch.Tensor]:
        return self.index if self.index_kind == "bitmap" else None

    @property
    def offsets(self) -> Optional[torch.Tensor]:
        return self.index if self.index_kind == "offsets" else None

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.numel, self.chunk, self.gamma)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.values, self.index

    def with_tensors(self, values: torch.Tensor, index: torch.Tensor) -> "Packed":
        """The same metadata over other tensors (e.g. those from ``ctx.saved_tensors``)."""
        return replace(self, values=values, index=index)

    def validate(self, full: bool = False) -> None:
        """Raises ValueError/TypeError, naming the field, where the ``Packed`` is inconsistent.

        Checks every metadata field's type and range (``shape``, ``dtype``, ``device``,
        ``memory_format`` against the rank of ``shape``, ``chunk``, ``gamma``, ``index_kind``) and
        the tensors' dtype, length, layout and device against the geometry they imply. With
        ``full`` it also reads the index: offsets strictly ascending and below the chunk's length
        in every chunk; a bitmap marking exactly ``keep(L_c)`` elements of chunk ``c``, none past
        its length. That costs a pass over the index and, on CUDA, one host sync, so it is
        opt-in; the CPU ``unpack`` makes the same checks itself in its kernel.
        """
        self._check_metadata()
        if full:
            self._check_index_contents()

    def _check_metadata(self) -> None:
        for name, t in (("values", self.values), ("index", self.index)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Packed.{name} must be a torch.Tensor, got {type(t).__name__}")
        check_gamma(self.gamma, "Packed.gamma")
        check_chunk(self.chunk, "Packed.chunk")
        if not isinstance(self.index_kind, str):
            raise TypeError(f"Packed.index_kind must be a str, got {type(self.index_kind).__name__}")
        if self.index_kind not in ("bitmap", "offsets"):
            raise ValueError(f"Packed.index_kind must be 'bitmap' or 'offsets', got {self.index_kind!r}")
        if not isinstance(self.shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in self.shape
        ):
            raise TypeError(f"Packed.shape must be a torch.Size or a tuple of ints, got {self.shape!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"Packed.shape must not have negative sizes, got {tuple(self.shape)}")
        if not isinstance(self.dtype, torch.dtype) or self.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"Packed.dtype must be float16, bfloat16, float32 or float64, got {self.dtype!r}")
        if not isinstance(self.device, torch.device):
            raise TypeError(f"Packed.device must be a torch.device, got {type(self.device).__name__}")
        if not isinstance(self.memory_format, torch.memory_format):
            raise TypeError(f"Packed.memory_format must be a torch.memory_format, got {self.memory_format!r}")
        if self.memory_format not in _FORMAT_RANK:
            raise ValueError(
                f"Packed.memory_format must be contiguous_format, channels_last or channels_last_3d, "
                f"got {self.memory_format}"
            )
        rank = _FORMAT_RANK[self.memory_format]
        if rank is not None and len(self.shape) != rank:
            raise ValueError(
                f"Packed.memory_format is {self.memory_format}, which needs a {rank}-D shape, "
                f"got shape {tuple(self.shape)}"
            )
        g = self.geometry
        if self.values.dtype != self.dtype:
            raise TypeError(f"Packed.values has dtype {self.values.dtype}, metadata says {self.dtype}")
        if self.values.dim() != 1 or self.values.numel() != g.total_kept:
            raise ValueError(
                f"Packed.values has shape {tuple(self.values.shape)}, expected ({g.total_kept},) "
                f"for shape {tuple(self.shape)}, gamma={self.gamma}, chunk={self.chunk}"
            )
        want = (torch.int32, g.bitmap_words) if self.index_kind == "bitmap" else (torch.uint16, g.total_kept)
        if self.index.dtype != want[0]:
            raise TypeError(f"Packed.index ({self.index_kind}) must be {want[0]}, got {self.index.dtype}")
        if self.index.dim() != 1 or self.index.numel() != want[1]:
            raise ValueError(
                f"Packed.index ({self.index_kind}) has shape {tuple(self.index.shape)}, expected ({want[1]},)"
            )
        for name, t in (("values", self.values), ("index", self.index)):
            if t.layout != torch.strided or not t.is_contiguous():
                raise ValueError(f"Packed.{name} must be a contiguous strided tensor")
            if t.device != self.device:
                raise ValueError(f"Packed.{name} is on {t.device}, metadata says {self.device}")

    def _check_index_contents(self) -> None:
        """The content checks of ``validate(full=True)``, with torch ops on the index's device."""
        g = self.geometry
        if g.num_chunks == 0:
            return
        dev = self.index.device
        last = g.num_chunks - 1
        if self.index_kind == "offsets":
            offs = self.index.to(torch.int64)
            pos = torch.arange(offs.numel(), device=dev)
            chunk_of = pos // g.keep  # every chunk but the last holds K entries
            length = torch.where(chunk_of == last, g.last_len, g.chunk)
            prev = torch.cat([offs.new_full((1,), -1), offs[:-1]])
            past = offs >= length
            bad = past | ((pos % g.keep != 0) & (offs <= prev))
            if not bool(bad.any()):  # the host sync
                return
            i = int(bad.int().argmax())
            c = int(chunk_of[i])
            why = (f"offset {int(offs[i])} is past the chunk's length {int(length[i])}" if past[i]
                   else f"offsets must be strictly ascending, got {int(offs[i])} after {int(prev[i])}")
        else:
            words = (self.index.to(torch.int64) & 0xFFFFFFFF).view(g.num_chunks, -1)
            length = torch.full((g.num_chunks, 1), g.chunk, device=dev)
            length[last] = g.last_len
            valid_bits = (length - 32 * torch.arange(words.shape[1], device=dev)).clamp(0, 32)
            past = ((words & ~((1 << valid_bits) - 1)) != 0).any(dim=1)
            marked = _popcount32(words).sum(dim=1)
            keep = torch.full((g.num_chunks,), g.keep, device=dev)
            keep[last] = g.keep_last
            bad = past | (marked != keep)
            if not bool(bad.any()):  # the host sync
                return
            c = int(bad.int().argmax())
            why = (f"it marks elements past the chunk's length {int(length[c])}" if past[c]
                   else f"it marks {int(marked[c])} elements, keep is {int(keep[c])}")
        raise ValueError(f"Packed.index ({self.index_kind}) is corrupt in chunk {c}: {why}")


def pack(
    x: torch.Tensor,
    gamma: float = DEFAULT_GAMMA,
    chunk: int = DEFAULT_CHUNK,
    index: str = "auto",
    *,
    random_seed: Optional[int] = None,
) -> Packed:
    """Keeps the largest-magnitude ``1 - gamma`` fraction of every ``chunk`` elements of ``x``.

    ``x`` is read in memory order (contiguous, or channels_last where it is dense in that layout).
    A chunk of length ``L`` keeps ``L - floor(gamma*L)`` elements: those with the largest
    ``|x|`` (NaN counts above inf; ties go to the lower index). With ``random_seed`` the elements
    are ranked by a hash of ``(random_seed, position)`` instead: the "random" strategy.
    """
    check_float_tensor(x)
    gamma = check_gamma(gamma)
    chunk = check_chunk(chunk)
    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
    if random_seed is not None and (isinstance(random_seed, bool) or not isinstance(random_seed, int)):
        raise TypeError(f"random_seed must be an int or None, got {type(random_seed).__name__}")
    values, idx, kind, memory_format = pack_tensors(x, gamma, chunk, index, random_seed)
    return Packed(values, idx, kind, x.shape, x.dtype, x.device, memory_format, chunk, gamma)


def pack_tensors(x: torch.Tensor, gamma: float, chunk: int, index: str = "auto",
                 random_seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, str, torch.memory_format]:
    """:func:`pack` of arguments already checked (a DropIT layer's validated settings), as
    ``(values, index, index_kind, memory_format)``."""
    flat, memory_format = _memory_order(x.detach())
    if index == "auto":
        n = flat.numel()
        # memoised for eager calls (this runs on every DropIT product); traced as it is
        if torch.compiler.is_compiling():
            index = Geometry(n, chunk, gamma).resolve_index(index)
        else:
            index = auto_index(n, chunk, gamma)
    seed = None if random_seed is None else random_seed & 0x7FFFFFFFFFFFFFFF
    values, idx = torch.ops.dropit_cuda.pack(flat, gamma, chunk, index == "bitmap", seed)
    return values, idx, index, memory_format


@functools.lru_cache(maxsize=4096)
def auto_index(numel: int, chunk: int, gamma: float) -> str:
    """The index kind ``"auto"`` resolves to for ``numel`` elements (memoised: every eager DropIT
    product asks)."""
    return Geometry(numel, chunk, gamma).resolve_index("auto")


def unpack(p: Packed) -> torch.Tensor:
    """The dense tensor of ``p``: its shape, dtype, device and layout, dropped elements 0.

    ``p.validate()`` checks the metadata first (TypeError/ValueError naming the field). On the
    CPU the kernel then checks the index contents too (offsets strictly ascending and in range,
    bitmaps marking exactly ``keep`` elements per chunk) and raises ValueError naming the chunk.
    On CUDA the contents are not checked (that would need a host sync): the kernels stay in
    bounds whatever the index holds, and ``p.validate(full=True)`` checks the contents on demand.
    """
    if not isinstance(p, Packed):
        raise TypeError(f"p must be a dropit_cuda.Packed, got {type(p).__name__}")
    p.validate()
    return unpack_trusted(p.values, p.index, p)


def unpack_trusted(values: torch.Tensor, index: torch.Tensor, meta: Packed) -> torch.Tensor:
    """:func:`unpack` of ``values`` and ``index`` under ``meta``'s metadata, without the Python
    validation: for a cache that the very forward which packed it hands to its backward (the
    metadata is the forward's own; the op itself still checks the tensors' dtypes and sizes
    against it, and the CPU kernel the index contents)."""
    flat = torch.ops.dropit_cuda.unpack(values, index, meta.numel, meta.gamma, meta.chunk,
                                        meta.index_kind == "bitmap")
    return from_memory_order(flat, meta.shape, meta.memory_format)


# The fakes compute their sizes from symbolic ints under torch.compile(dynamic=True): the pack
# sizes follow from x.numel(), and unpack's ``numel`` is a SymInt in the schema, so one graph
# serves every batch size and sequence length.
@torch.library.register_fake("dropit_cuda::pack")
def _pack_fake(x, gamma, chunk, bitmap, seed=None):
    g = Geometry(x.numel(), chunk, gamma)
    values = x.new_empty(g.total_kept)
    if bitmap:
        return values, x.new_empty(g.bitmap_words, dtype=torch.int32)
    return values, x.new_empty(g.total_kept, dtype=torch.uint16)


@torch.library.register_fake("dropit_cuda::unpack")
def _unpack_fake(values, index, numel, gamma, chunk, bitmap):
    return values.new_empty(numel)
