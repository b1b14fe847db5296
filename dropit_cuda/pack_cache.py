"""One packed copy per distinct input in a converted model's training forward.

q, k and v (or gate and up) read one tensor; each product would otherwise pack its own copy of it.
While a converted model runs a training forward (:mod:`dropit_cuda.routing` opens a scope around
it), :func:`cache` hands a product the pack an earlier product made of the same tensor: the same
storage, storage offset, shape, strides, dtype and version (an in-place change makes a new
version), packed with the same settings along the same channel dimension. An autocast copy of a
tensor counts as that tensor (each product casts its own copy; the copies are equal). The scope is
per thread and ends with the forward; nothing is shared under ``torch.compile`` (a graph holds no
Python state) or in a checkpoint's recompute during backward (each recomputed product packs
anew, as the first forward's did not need to).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Optional

import torch

from . import strategies
from .settings import Settings

__all__ = ["Scope", "alias", "cache", "find", "find_eager", "keep"]


class _Local(threading.local):
    scope: Optional["Scope"] = None  # (a class default: no failed attribute lookup per product)


_local = _Local()


def _current() -> Optional["Scope"]:
    return _local.scope


def _key(t: torch.Tensor) -> Optional[tuple[int, tuple]]:
    """Where ``t``'s values are: its storage's address, and the rest (device, storage offset,
    shape, strides, dtype, version); None for a tensor without a storage of its own (a
    ``torch.func`` wrapper, a subclass): such tensors are not shared."""
    try:
        return (t.untyped_storage().data_ptr(),
                (t.device, t.storage_offset(), t.shape, t.stride(), t.dtype, t._version))
    except (NotImplementedError, RuntimeError, TypeError):
        return None


class Scope:
    """The packs of one forward; enter with :meth:`open`, leave with :meth:`close`."""

    def __init__(self) -> None:
        #: storage address -> [(the rest of the key: see find, weak storage ref of the packed
        #: tensor, the pack)]; keyed by the address alone, an int, so that the common lookup (a
        #: tensor packed by no earlier product) hashes one int
        self.packs: dict[int, list[tuple[tuple, Any, Any]]] = {}
        #: id(autocast copy) -> (weak ref of the copy, key of its source with the target dtype
        #: added to its rest, weak storage ref of the source)
        self.aliases: dict[int, tuple[Any, tuple, Any]] = {}
        self.refs: list[Any] = []
        self.outer: Optional[Scope] = None

    def open(self) -> "Scope":
        self.outer, _local.scope = _current(), self
        return self

    def close(self) -> None:
        _local.scope = self.outer
        for ref in self.refs:
            torch.UntypedStorage._free_weak_ref(ref)
        self.refs.clear()
        self.packs.clear()
        self.aliases.clear()


def alias(source: torch.Tensor, copy: torch.Tensor) -> None:
    """Records that ``copy`` is an autocast cast of ``source`` (equal values, another storage)."""
    if torch.compiler.is_compiling():  # checked first: reading the thread's state would add guards
        return
    scope = _current()
    key = _key(source) if scope is not None and copy is not source else None
    if key is not None:
        ref = source.untyped_storage()._weak_ref()
        scope.refs.append(ref)
        scope.aliases[id(copy)] = (weakref.ref(copy), (key[0], key[1] + (copy.dtype,)), ref)


def find(x: torch.Tensor, settings: Settings, channel_dim: int) -> tuple[Optional[tuple], Optional[Any]]:
    """Where the pack of ``x`` at these settings is kept in this forward (None: nowhere, it is not
    shared), and the pack an earlier product made of it (None: none yet; :func:`keep` it)."""
    if torch.compiler.is_compiling():  # checked first: reading the thread's state would add guards
        return None, None
    return find_eager(x, settings, channel_dim)


def find_eager(x: torch.Tensor, settings: Settings, channel_dim: int) -> tuple[Optional[tuple], Optional[Any]]:
    """:func:`find` for a caller that knows it runs outside ``torch.compile``."""
    scope = _local.scope
    if scope is None or torch._C._current_graph_task_id() != -1 or x.layout != torch.strided \
            or torch._C._functorch.peek_interpreter_stack() is not None:  # torch.func: tensors are wrappers
        return None, None
    aliased = scope.aliases.get(id(x))
    if aliased is not None and aliased[0]() is x:  # an autocast copy: its source decides
        base, ref = aliased[1], aliased[2]
    else:
        base, ref = _key(x), None
    if base is None:
        return None, None
    address, rest = base
    uses_channels = strategies.REGISTRY[settings.strategy].uses_channels  # settings are validated
    rest += (settings.gamma, settings.strategy, settings.chunk, channel_dim % x.dim() if uses_channels else None)
    where = (address, rest, ref)
    for kept_rest, kept_ref, pack in scope.packs.get(address, ()):
        if kept_rest == rest and not torch.UntypedStorage._expired(kept_ref):
            return where, pack
    return where, None


def keep(where: tuple, x: torch.Tensor, pack: Any) -> None:
    """Keeps ``pack`` of ``x`` (a ``Cached`` or a :class:`strategies.NativePack`) for the later
    products of this forward, ``where`` :func:`find` said."""
    scope = _current()
    address, rest, ref = where
    if ref is None:
        ref = x.untyped_storage()._weak_ref()
        scope.refs.append(ref)
    scope.packs.setdefault(address, []).append((rest, ref, pack))


def cache(x: torch.Tensor, settings: Settings, channel_dim: int) -> tuple[strategies.Cached, bool]:
    """``x`` packed as ``settings`` say, and whether the pack is shared with an earlier product."""
    where, cached = find(x, settings, channel_dim)
    if cached is not None:
        return strategies.as_cached(cached), True
    cached = strategies.REGISTRY[settings.strategy].cache(x, settings, channel_dim)
    if where is not None:
        keep(where, x, cached)
    return cached, False
