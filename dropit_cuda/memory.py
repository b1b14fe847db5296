"""Where a forward pass keeps memory for backward, and what DropIT can free.

A conv or linear layer caches its input for the weight gradient, but that cache is freed only if
no other op keeps the same tensor: a conv whose input is a ReLU output (which the ReLU saves too)
frees nothing when it packs its copy. :func:`measure` runs one forward pass under
:func:`torch.autograd.graph.saved_tensors_hooks`, records every tensor saved for backward, and
reports:

- ``total_bytes``: the bytes of the unique storages the autograd graph holds at the end of the
  forward pass (a storage shared by several saved tensors or views counts once, with its full
  size); the model's parameters and buffers are not counted, their autocast copies are;
- per module (the innermost module whose ``forward`` was running when the tensor was saved): the
  bytes it saved, and the bytes held by it alone (storages no other module saved); for a conv or a
  linear layer the latter, less its cast weight copies, is what DropIT can pack there (it frees
  that less the size of the pack). What a conv caches and a ReLU keeps too is held by neither
  alone: converting that conv adds its pack and frees nothing.

The granularity is the module: two saves by one module (say an attention block whose output
projection reads a view of what its attention kernel keeps) are one module's bytes.

Tensors that custom autograd functions keep as ``ctx`` attributes instead of through
``ctx.save_for_backward`` are found by walking the graph and counted too.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from .dtensor import local_of

__all__ = ["LayerTypeMemory", "MemoryReport", "ModuleMemory", "measure"]

_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
ROOT_NAME = "(model)"

# Autograd nodes that only reshape or cast, walked through to tell whether a saved tensor is a
# copy of a parameter (autocast keeps such copies: ToCopy <- AccumulateGrad).
_PASS_THROUGH_NODES = {
    "ToCopyBackward0",
    "TBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "ExpandBackward0",
    "AliasBackward0",
    "CloneBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "UnsqueezeBackward0",
}


def _dropit_layers(module: nn.Module) -> dict:
    """The covered weights ``module`` owns in a conversion (see :mod:`dropit_cuda.routing`)."""
    return module.__dict__.get("_dropit_layers", {})


def is_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a conv or linear layer, or owns a weight of a layer type a DropIT
    conversion covers (Hugging Face's ``Conv1D``, attention projections)."""
    return isinstance(module, _LAYER_TYPES) or any(layer.claimed for layer in _dropit_layers(module).values())


def _is_dropit(module: nn.Module) -> bool:
    """Whether a conversion caches the inputs of ``module``'s weights through DropIT: a covered
    layer type, or a weight that a product used in the last training forward (an embedding
    table, used by no product, is not)."""
    return any(layer.settings is not None and (layer.claimed or layer.calls)
               for layer in _dropit_layers(module).values())


@dataclass
class ModuleMemory:
    """What one module saved for backward during the measured forward pass.

    ``saved_bytes``: unique storages saved while this module was the innermost one running.
    ``exclusive_bytes``: those that no other module saved, i.e. freed if this module kept nothing.
    ``weight_copy_bytes``: the part of ``saved_bytes`` that copies a parameter (autocast casts).
    ``freeable_bytes``: ``exclusive_bytes`` less exclusive weight copies: for a conv/linear layer,
    the cached activations that DropIT packs (on a DropIT layer, the packed cache itself).
    """

    name: str
    type: str
    is_layer: bool
    is_dropit: bool
    calls: int
    num_tensors: int
    saved_bytes: int
    exclusive_bytes: int
    weight_copy_bytes: int
    freeable_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LayerTypeMemory:
    """The modules of one class together (``saved_bytes`` counts a storage they share once)."""

    type: str
    modules: int
    saved_bytes: int
    exclusive_bytes: int
    freeable_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MemoryReport:
    """Result of :func:`measure`; ``str(report)`` is a table, ``to_dict()`` a plain dict."""

    total_bytes: int
    num_storages: int
    weight_copy_bytes: int
    input_bytes: int
    modules: list[ModuleMemory]
    by_type: dict[str, LayerTypeMemory]
    top: int = field(default=10, repr=False)

    @property
    def layer_freeable_bytes(self) -> int:
        """Bytes held by plain conv/linear layers alone: what converting all of them could free
        (DropIT at rate gamma keeps about ``1 - gamma`` of it plus its index)."""
        return sum(m.freeable_bytes for m in self.modules if m.is_layer and not m.is_dropit)

    @property
    def dropit_bytes(self) -> int:
        """Bytes held by DropIT layers alone (their packed caches)."""
        return sum(m.freeable_bytes for m in self.modules if m.is_dropit)

    def module(self, name: str) -> ModuleMemory:
        """The row of the module called ``name`` (``"(model)"`` for the root); KeyError if it saved nothing."""
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"no module named {name!r} saved tensors for backward")

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "num_storages": self.num_storages,
            "weight_copy_bytes": self.weight_copy_bytes,
            "input_bytes": self.input_bytes,
            "layer_freeable_bytes": self.layer_freeable_bytes,
            "dropit_bytes": self.dropit_bytes,
            "by_type": {k: v.to_dict() for k, v in self.by_type.items()},
            "modules": [m.to_dict() for m in self.modules],
        }

    def table(self, top: Optional[int] = None) -> str:
        """The report as text: totals, one row per module class, then the ``top`` largest layers."""
        top = self.top if top is None else top
        total = self.total_bytes

        def pct(b: int) -> str:
            return f"{100.0 * b / total:5.1f}%" if total else "   - "

        lines = [
            f"saved for backward: {format_bytes(total)} in {self.num_storages} storages"
            f" (weight copies {format_bytes(self.weight_copy_bytes)}, model inputs {format_bytes(self.input_bytes)})",
            f"held by conv/linear layers alone: {format_bytes(self.layer_freeable_bytes)} ({pct(self.layer_freeable_bytes).strip()})"
            + (f"; by DropIT layers: {format_bytes(self.dropit_bytes)} ({pct(self.dropit_bytes).strip()})"
               if any(m.is_dropit for m in self.modules) else ""),
            "",
        ]
        head = f"{'module type':<28} {'count':>5} {'saved':>11} {'share':>6} {'alone':>11} {'share':>6}"
        lines += [head, "-" * len(head)]
        for t in sorted(self.by_type.values(), key=lambda t: (-t.saved_bytes, t.type)):
            lines.append(
                f"{t.type[:28]:<28} {t.modules:>5} {format_bytes(t.saved_bytes):>11} {pct(t.saved_bytes)}"
                f" {format_bytes(t.exclusive_bytes):>11} {pct(t.exclusive_bytes)}"
            )
        if top > 0:
            order = {id(m): i for i, m in enumerate(self.modules)}
            mods = sorted(self.modules, key=lambda m: (-m.saved_bytes, order[id(m)]))[:top]
            lines += ["", f"largest {len(mods)} modules ('alone' = bytes no other module holds;"
                          " for conv/linear, 'freeable' = what DropIT packs)"]
            head = f"{'module':<48} {'type':<20} {'saved':>11} {'alone':>11} {'freeable':>11}"
            lines += [head, "-" * len(head)]
            for m in mods:
                free = format_bytes(m.freeable_bytes) if m.is_layer else "-"
                lines.append(
                    f"{_clip(m.name, 48):<48} {m.type[:20]:<20} {format_bytes(m.saved_bytes):>11}"
                    f" {format_bytes(m.exclusive_bytes):>11} {free:>11}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def format_bytes(nbytes: int) -> str:
    """``nbytes`` in B/KiB/MiB/GiB."""
    if nbytes < 1024:
        return f"{nbytes} B"
    if nbytes < 1024**2:
        return f"{nbytes / 1024:.1f} KiB"
    if nbytes < 1024**3:
        return f"{nbytes / 1024**2:.2f} MiB"
    return f"{nbytes / 1024**3:.2f} GiB"


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]


def _storage_key(t: torch.Tensor) -> tuple[tuple, int]:
    """(key identifying the memory ``t`` lives in, bytes of that memory)."""
    t = local_of(t)  # a DTensor's memory on this rank is its local tensor's
    try:
        st = t.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if ptr != 0:
            return ("ptr", str(t.device), ptr), nbytes
        return ("storage", getattr(st, "_cdata", id(t))), nbytes
    except (RuntimeError, NotImplementedError, TypeError):
        # Sparse and other storage-less layouts: count the tensor's own elements once.
        if t.layout in (torch.sparse_coo,):
            parts = [t._indices(), t._values()]
            return ("tensor", id(t)), sum(p.numel() * p.element_size() for p in parts)
        return ("tensor", id(t)), t.numel() * t.element_size()


class _Saved:
    """What the pack hook stores in the graph: the tensor (detached, so an op saving its own output
    makes no reference cycle). A weak reference to it tells whether the graph still holds it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


@dataclass
class _Record:
    ref: Any  # weakref to _Saved, or a strong holder for ctx-attribute tensors
    key: tuple
    nbytes: int
    module: int  # index into the module table
    weight_copy: bool


def _param_copy_of(t: torch.Tensor, params: set[int]) -> bool:
    """Whether ``t`` is a cast/view of a parameter, judged from its autograd history."""
    node = t.grad_fn
    for _ in range(8):
        if node is None:
            return False
        name = type(node).__name__
        if name == "AccumulateGrad":
            return id(node.variable) in params
        if name not in _PASS_THROUGH_NODES:
            return False
        nexts = [n for n, _ in node.next_functions if n is not None]
        if len(nexts) != 1:
            return False
        node = nexts[0]
    return False


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside ``obj``: itself, list/tuple/dict items, dataclass fields and object
    attributes, three levels deep (enough for a packed cache held as a ctx attribute)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth >= 3 or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.dtype,
                                      torch.device, torch.Size, nn.Module)):
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        items: Iterable[Any] = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    elif hasattr(obj, "__dict__") and not callable(obj):
        items = vars(obj).values()
    else:
        return
    for item in items:
        yield from _tensors_in(item, depth + 1)


def _grad_fns(obj: Any) -> list:
    leaves, _ = torch.utils._pytree.tree_flatten(obj)
    return [t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn is not None]


def measure(model: nn.Module, *example_inputs: Any, top: int = 10, **kwargs: Any) -> MemoryReport:
    """Run ``model(*example_inputs, **kwargs)`` once with gradients enabled and report the memory
    its autograd graph holds for backward.

    Args:
        model: the module to measure, in the mode it is in (call ``model.train()`` first to see
            what training keeps: dropout and batch norm save differently in eval mode).
        example_inputs: positional inputs of ``model``; a batch of the size you train with, or a
            smaller one (saved bytes grow linearly with the batch).
        top: how many of the largest modules ``str(report)`` lists.
        kwargs: keyword inputs of ``model``.

    The forward pass runs under whatever autocast context the caller opened (autocast's cast
    copies are saved and counted). Counted: the unique storages of the tensors saved for backward
    (by built-in ops and by ``ctx.save_for_backward``) or kept as tensor attributes of a custom
    function's ``ctx``, that the graph still holds when the forward returns. Not counted: the
    model's parameters and buffers (and views of them). The model inputs, if saved, are counted
    (``report.input_bytes`` says how much of the total they are).

    Returns:
        A :class:`MemoryReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be a non-negative int, got {top!r}")

    names: list[str] = []
    mods: list[nn.Module] = []
    index_of: dict[int, int] = {}
    for name, mod in model.named_modules(remove_duplicate=True):
        index_of[id(mod)] = len(mods)
        names.append(name or ROOT_NAME)
        mods.append(mod)
    calls = [0] * len(mods)
    # the classes as the forward pass met them (a conversion may turn a MaskedReLU back into a
    # ReLU once its first training forward is over)
    types = [type(m).__name__ for m in mods]

    own_keys = set()
    params: set[int] = set()
    for p in model.parameters():
        params.add(id(p))
        own_keys.add(_storage_key(p)[0])
    for b in model.buffers():
        own_keys.add(_storage_key(b)[0])

    in_leaves, _ = torch.utils._pytree.tree_flatten((example_inputs, kwargs))
    input_keys = {_storage_key(t)[0] for t in in_leaves if isinstance(t, torch.Tensor)}

    stack: list[int] = []
    records: list[_Record] = []
    # Custom-function nodes (their ctx objects) claimed by the innermost module whose forward
    # created them, to attribute tensors kept as ctx attributes. Held weakly: holding a node
    # would keep its saved tensors alive after the graph dropped it.
    ctx_owner: dict[int, tuple[int, Any]] = {}
    entry_nodes: list[list[Any]] = []

    def owner_of(n: Any) -> Optional[int]:
        got = ctx_owner.get(id(n))
        return got[0] if got is not None and got[1]() is n else None

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        i = index_of[id(mod)]
        calls[i] += 1
        stack.append(i)
        entry_nodes.append(_grad_fns(args))  # held until the forward returns: stable ids

    def post_hook(mod: nn.Module, args: tuple, output: Any) -> None:
        i = stack.pop() if stack else index_of[id(mod)]
        boundary = {id(n) for n in (entry_nodes.pop() if entry_nodes else [])}
        visited: dict[int, Any] = {}
        todo = _grad_fns(output)
        while todo:
            n = todo.pop()
            if id(n) in visited or id(n) in boundary:
                continue
            visited[id(n)] = n
            if getattr(n, "__dict__", None) is not None and owner_of(n) is None:
                ctx_owner[id(n)] = (i, weakref.ref(n))  # not claimed by an inner module
            todo.extend(m for m, _ in n.next_functions if m is not None)

    def pack(t: torch.Tensor) -> _Saved:
        key, nbytes = _storage_key(t)
        if key not in own_keys:
            owner = stack[-1] if stack else 0
            holder = _Saved(t.detach())
            records.append(_Record(weakref.ref(holder), key, nbytes, owner, _param_copy_of(t, params)))
            return holder
        return _Saved(t.detach())

    def unpack(h: _Saved) -> torch.Tensor:
        return h.tensor

    handles = []
    try:
        for mod in mods:
            handles.append(mod.register_forward_pre_hook(pre_hook))
            handles.append(mod.register_forward_hook(post_hook, always_call=True))
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            output = model(*example_inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()

    # Tensors kept as attributes of custom functions' ctx (walk the whole graph from the output).
    seen: set[int] = set()
    todo = _grad_fns(output)
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        todo.extend(m for m, _ in n.next_functions if m is not None)
        attrs = getattr(n, "__dict__", None)
        if not attrs:
            continue
        owner = owner_of(n)
        owner = 0 if owner is None else owner
        for t in _tensors_in(list(attrs.values())):
            key, nbytes = _storage_key(t)
            if key not in own_keys:
                records.append(_Record(lambda t=t: t, key, nbytes, owner, _param_copy_of(t, params)))

    live = [r for r in records if r.ref() is not None]
    report = _build_report(live, names, mods, types, calls, input_keys, top)
    del output
    return report


def _build_report(live: list[_Record], names: list[str], mods: list[nn.Module], types: list[str], calls: list[int],
                  input_keys: set, top: int) -> MemoryReport:
    size: dict[tuple, int] = {}
    holders: dict[tuple, set[int]] = defaultdict(set)
    weight_copy: dict[tuple, bool] = {}
    per_module_keys: dict[int, set[tuple]] = defaultdict(set)
    per_module_tensors: dict[int, int] = defaultdict(int)
    for r in live:
        size[r.key] = max(size.get(r.key, 0), r.nbytes)
        holders[r.key].add(r.module)
        weight_copy[r.key] = weight_copy.get(r.key, False) or r.weight_copy
        per_module_keys[r.module].add(r.key)
        per_module_tensors[r.module] += 1

    rows: list[ModuleMemory] = []
    for i in sorted(per_module_keys):
        keys = per_module_keys[i]
        alone = [k for k in keys if len(holders[k]) == 1]
        rows.append(ModuleMemory(
            name=names[i],
            type=types[i],
            is_layer=is_layer(mods[i]),
            is_dropit=_is_dropit(mods[i]),
            calls=calls[i],
            num_tensors=per_module_tensors[i],
            saved_bytes=sum(size[k] for k in keys),
            exclusive_bytes=sum(size[k] for k in alone),
            weight_copy_bytes=sum(size[k] for k in keys if weight_copy[k]),
            freeable_bytes=sum(size[k] for k in alone if not weight_copy[k]),
        ))

    by_type: dict[str, LayerTypeMemory] = {}
    type_keys: dict[str, set[tuple]] = defaultdict(set)
    for row, i in zip(rows, sorted(per_module_keys)):
        type_keys[row.type] |= per_module_keys[i]
        t = by_type.setdefault(row.type, LayerTypeMemory(row.type, 0, 0, 0, 0))
        t.modules += 1
        t.exclusive_bytes += row.exclusive_bytes
        t.freeable_bytes += row.freeable_bytes
    for name, keys in type_keys.items():
        by_type[name].saved_bytes = sum(size[k] for k in keys)

    return MemoryReport(
        total_bytes=sum(size.values()),
        num_storages=len(size),
        weight_copy_bytes=sum(size[k] for k in size if weight_copy[k]),
        input_bytes=sum(size[k] for k in size if k in input_keys),
        modules=rows,
        by_type=by_type,
        top=top,
    )
