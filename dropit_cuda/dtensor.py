"""DropIT products on DTensors: tensor and sequence parallelism, alone or with FSDP2 (2-D).

A model parallelized with ``torch.distributed.tensor.parallel`` (``ColwiseParallel``,
``RowwiseParallel``, ``SequenceParallel``) hands its linear layers DTensors: the weight sharded
or replicated over a mesh, the input replicated or sharded. The autograd functions of
:mod:`dropit_cuda.functional` keep working on them with two changes, both made here:

* what a rank packs is its **local** input (:meth:`DTensor.to_local`): a replicated input whole
  on every rank, a sharded one its own shard, so the chunks of the chunked strategies (and the
  ranking of the others) run over the local tensor only. Packing needs no collective.
* in backward the unpacked local input is wrapped back into a DTensor with the input's own mesh,
  placements and global shape (:func:`rewrap`), and the gradients are computed with the very
  DTensor ops the plain op's backward runs. So the sharding propagation, the collectives and the
  gradients' placements (a ``Partial`` weight gradient where the plain one is partial) are the
  plain plan's: DropIT adds no collective to the forward or the backward, and at ``gamma = 0``
  every gradient equals the plain plan's bit for bit.

The bytes :func:`dropit_cuda.report` and :func:`dropit_cuda.memory.measure` count for a DTensor
are this rank's (its local tensor's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: there are no DTensors to meet
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["Layout", "is_dtensor", "local", "local_of", "on_local", "rewrap"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of ``t`` (outside autograd): its local tensor for a DTensor,
    else ``t`` itself."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


@dataclass(frozen=True)
class Layout:
    """Where a DTensor's local tensor sits in the global one: enough to wrap a tensor of the
    local shape (an unpacked cache) back into a DTensor like the original."""

    mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple
    local_shape: torch.Size


def local(x: torch.Tensor) -> tuple[torch.Tensor, Optional[Layout]]:
    """``x``'s local tensor and its :class:`Layout` for a DTensor; ``(x, None)`` for any other
    tensor."""
    if not is_dtensor(x):
        return x, None
    loc = local_of(x)
    return loc, Layout(x.device_mesh, tuple(x.placements), x.shape, tuple(x.stride()), loc.shape)


def rewrap(layout: Optional[Layout], t: torch.Tensor) -> torch.Tensor:
    """``t`` (of the local shape) as a DTensor laid out as ``layout`` says; ``t`` itself when
    ``layout`` is None. No collective: every rank wraps its own local tensor."""
    if layout is None:
        return t
    return DTensor.from_local(t, layout.mesh, layout.placements, run_check=False,
                              shape=layout.shape, stride=layout.stride)


def on_local(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """``fn`` (an elementwise function) applied to DTensor ``x``'s local tensor, differentiably,
    the result laid out as ``x``; None where that would not equal ``fn`` on the global tensor
    (a ``Partial`` placement: the local tensors are addends of the global one)."""
    if any(p.is_partial() for p in x.placements):
        return None
    return DTensor.from_local(fn(x.to_local()), x.device_mesh, x.placements, run_check=False,
                              shape=x.shape, stride=x.stride())
