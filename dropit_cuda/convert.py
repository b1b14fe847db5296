"""``convert``: make DropIT cover a model's weights in place; ``revert`` undoes it; ``report`` tells
what it did."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .relu import MaskedReLU
from .routing import KEPT, Conversion, Layer, attach, conversion_of, detach
from .settings import (
    DEFAULT_CHUNK,
    DEFAULT_GAMMA,
    DEFAULT_STRATEGY,
    LayerSpec,
    Settings,
    check_spec,
    name_matches,
    settings_for,
)

__all__ = ["LayerReport", "Report", "convert", "report", "revert"]

Patterns = Union[str, Sequence[str], None]


# --- which weights a model has -----------------------------------------------------------------


def _claimed(module: nn.Module, attr: str) -> bool:
    """Whether ``module.attr`` is the weight of a layer type ``convert`` promises to cover."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return attr == "weight"
    if isinstance(module, nn.MultiheadAttention):
        return attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    # Hugging Face's Conv1D (GPT-2 family): addmm(bias, x, weight), weight (in, out)
    cls = type(module)
    return attr == "weight" and cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _weights(model: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
    """``(layer name, owner module, attribute, parametrized)`` for every weight of ``model`` that
    can take part in a linear/conv product: parameters of two or more dimensions (each tensor once:
    a tied weight goes to its first owner that is a covered layer type, else its first owner) and
    parametrized attributes (weight norm and the like), whose originals are not listed."""
    found: dict[int, int] = {}
    out: list[tuple[str, nn.Module, str, bool]] = []
    for mname, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList) or ".parametrizations." in f".{mname}.":
            continue
        if parametrize.is_parametrized(module):
            for attr in module.parametrizations:
                with torch.no_grad():
                    if getattr(module, attr).dim() >= 2:
                        out.append((_layer_name(mname, attr), module, attr, True))
        for attr, p in module._parameters.items():
            if p is None or p.dim() < 2:
                continue
            entry = (_layer_name(mname, attr), module, attr, False)
            i = found.get(id(p))
            if i is None:
                found[id(p)] = len(out)
                out.append(entry)
            elif _claimed(module, attr) and not _claimed(out[i][1], out[i][2]):
                out[i] = entry
    return out


def _layer_name(module_name: str, attr: str) -> str:
    if attr == "weight":
        return module_name
    return f"{module_name}.{attr}" if module_name else attr


# --- convert -------------------------------------------------------------------------------------


def _patterns(value: Patterns, name: str) -> Optional[list[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        out = list(value)
        if all(isinstance(p, str) for p in out):
            return out
    raise TypeError(f"{name} must be a str, a sequence of str, or None, got {value!r}")


def _check_plain_spec(spec: LayerSpec, what: str) -> None:
    """Validates a one-value spec now, before the model is touched."""
    check_spec(spec, what)
    if spec is not None and not isinstance(spec, Mapping) and not (callable(spec) and not isinstance(spec, type)):
        Settings(**{what: spec})


@contextlib.contextmanager
def unobserved_forward(model: nn.Module, conversion: Conversion) -> Iterator[None]:
    """Around a training forward the user did not ask for (``example_inputs``, ``dc.fidelity``):
    afterwards the random state (CPU and the model's CUDA devices), the buffers (batch-norm
    statistics), every module's training flag and what :func:`report` says of the last training
    forward are as they were. Decisions a first training forward takes (``skip_first``, the ReLU
    masks) stay taken."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = {m: m.training for m in model.modules()}
    stats = [(layer, layer.op, layer.calls, layer.dense_bytes, layer.cached_bytes) for layer in conversion.layers]
    forwards, compiled = conversion.forwards, conversion.compiled
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes.items():
            m.training = training
        for layer, *values in stats:
            layer.op, layer.calls, layer.dense_bytes, layer.cached_bytes = values
        conversion.forwards, conversion.compiled = forwards, compiled


def _probe(model: nn.Module, conversion: Conversion, example_inputs: Any) -> None:
    """One training forward on ``example_inputs`` to decide ``skip_first`` and the ReLU masks now
    (see :func:`unobserved_forward` for what is restored)."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = {}
    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    with unobserved_forward(model, conversion), torch.enable_grad():
        model.train()
        model(*args, **kwargs)
    conversion.apply_kept()  # no backward of this forward will recompute anything
    conversion.warned = False  # the warning speaks of the first real training forward


def convert(
    model: nn.Module,
    gamma: LayerSpec = DEFAULT_GAMMA,
    strategy: LayerSpec = DEFAULT_STRATEGY,
    chunk: LayerSpec = DEFAULT_CHUNK,
    skip_first: bool = True,
    include: Patterns = None,
    exclude: Patterns = None,
    *,
    relu_mask: bool = True,
    dense_where_kept: bool = True,
    example_inputs: Any = None,
) -> nn.Module:
    """Makes DropIT cover ``model``'s weights, in place, and returns ``model``.

    Covered: every weight that requires grad and takes part in a linear/conv product while the
    model trains: ``F.linear``, ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d``, and ``addmm`` /
    ``mm`` / ``matmul`` / ``@`` with the weight as the second operand (Hugging Face's ``Conv1D``),
    called from the layer's own forward or any other (torchvision's Swin applies ``F.linear`` to
    its submodules' weights), subclasses of any layer type included, parametrized weights included
    (the weight gradient flows on to the parametrization's parameters), and the projections inside
    ``nn.MultiheadAttention``. Each such product caches a compressed input; outputs, input and bias
    gradients stay exact. No module's class or forward changes, parameters are the very same
    objects and ``state_dict`` keys are unchanged; ``revert`` removes it all. In eval mode or
    without autograd the model runs exactly as before. Frozen weights cache nothing. Converting
    again replaces the earlier conversion. :func:`report` tells what DropIT did in the last training
    forward; a warning names the weights of linear/conv/attention layers that were not used through
    DropIT in the first one.

    Args:
        model: the model, changed in place.
        gamma, strategy, chunk: the DropIT settings (see :func:`dropit_cuda.functional.linear`),
            each either one value for every layer, a dict of ``fnmatch`` patterns on layer names
            (the layer's module name, ``module.attr`` for weights not called ``weight``; a pattern
            also matches descendants) to values, where the first matching pattern wins, a layer no
            pattern matches gets the default, and ``None`` keeps the layer dense; or a callable
            ``(name, module) -> value or None``.
        skip_first: leave the first layer the input reaches dense (the paper's rule: dropping
            elements of the input data itself hurts). That is the first covered weight with
            ``requires_grad`` that a product uses in the first training forward (so GPT-2's
            first attention projection, not its ``lm_head``), or in a forward on
            ``example_inputs`` when they are given.
        include: module-name patterns (``fnmatch``, e.g. ``"layer*.conv1"``; a str or a list);
            only weights (and ReLUs) whose name or an ancestor's matches are covered.
        exclude: patterns of the same kind; matching weights and ReLUs are left alone.
        relu_mask: also turn every ``nn.ReLU`` (exact type) into a :class:`MaskedReLU`, which caches
            a 1-bit mask instead of its output (outputs and gradients unchanged, bit for bit), where
            that frees memory: a ReLU whose output is consumed only by DropIT products (or by ops
            that keep nothing) stays masked; one whose output another op keeps anyway (a max-pool,
            a batch norm, a layer left dense) is turned back into ``nn.ReLU`` after the first
            training forward (decided from what that forward saved; under ``torch.compile`` or in
            a backward recompute nothing is decided and the ReLUs stay masked). Functional ReLUs
            (``F.relu``) are not modules and stay as they are.
        dense_where_kept: leave dense each weight whose products' inputs something else keeps
            alive anyway (another op's saved tensors, such as the attention output that
            scaled-dot-product attention keeps and an output projection reads; the model's input
            or output): packing those adds the pack and frees nothing. Decided on the first eager
            training forward, like the ReLU masks; :func:`report` names them. False packs them.
        example_inputs: optional input (a tensor, a tuple of positional arguments, or a dict of
            keyword arguments) for one training forward now that decides ``skip_first``, the
            ReLU masks and ``dense_where_kept`` (random state and buffers are restored after it).

    Raises:
        TypeError/ValueError naming the argument: bad settings (a bad value in a dict or from a
        callable names its pattern or layer), patterns of the wrong type, or an
        ``include``/``exclude``/settings pattern that matches nothing in the model. Nothing is
        changed when it raises.

    Warns:
        UserWarning when there is nothing to convert.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    specs = {"gamma": gamma, "strategy": strategy, "chunk": chunk}
    for what, spec in specs.items():
        _check_plain_spec(spec, what)
    if not isinstance(skip_first, bool):
        raise TypeError(f"skip_first must be a bool, got {type(skip_first).__name__}")
    if not isinstance(relu_mask, bool):
        raise TypeError(f"relu_mask must be a bool, got {type(relu_mask).__name__}")
    if not isinstance(dense_where_kept, bool):
        raise TypeError(f"dense_where_kept must be a bool, got {type(dense_where_kept).__name__}")
    inc = _patterns(include, "include")
    exc = _patterns(exclude, "exclude")

    def selected(name: str) -> bool:
        return (inc is None or any(name_matches(name, p) for p in inc)) and not (
            exc is not None and any(name_matches(name, p) for p in exc))

    weights = _weights(model)
    relus = [(n, m) for n, m in model.named_modules() if relu_mask and type(m) in (nn.ReLU, MaskedReLU)]
    names = [w[0] for w in weights] + [n for n, _ in relus]
    for arg, pats in (("include", inc), ("exclude", exc)):
        for pat in pats or ():
            if not any(name_matches(n, pat) for n in names):
                raise ValueError(f"{arg} pattern {pat!r} matches no weight or ReLU of the model")

    # Every decision before any change, so that an error leaves the model as it was.
    layers, used = [], set()
    for name, module, attr, parametrized in weights:
        if selected(name):
            settings, matched = settings_for(specs, name, module)
            used |= matched
            reason = None if settings is not None else "per-layer setting"
        else:
            settings, reason = None, "excluded"
        layers.append(Layer(name, module, attr, settings, reason, _claimed(module, attr), parametrized))
    for what, spec in specs.items():
        if isinstance(spec, Mapping):
            for pattern in spec:
                if (what, pattern) not in used:
                    raise ValueError(f"{what} pattern {pattern!r} matches no layer of the model")

    detach(model)
    masked = [(name, MaskedReLU.from_module(module)) for name, module in relus if selected(name)]
    conversion = attach(model, layers, masked, skip_first, dense_where_kept)
    if not any(layer.settings is not None for layer in layers):
        effect = f"only its {len(masked)} selected ReLU(s) become MaskedReLU" if masked else "it is unchanged"
        warnings.warn("dropit_cuda.convert: the model has no weight to convert (no linear/conv weight "
                      f"of two or more dimensions selected); {effect}", UserWarning, stacklevel=2)
    if example_inputs is not None:
        _probe(model, conversion, example_inputs)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Removes DropIT from ``model`` in place: the conversion's hooks and records, ``MaskedReLU``
    back to ``nn.ReLU``, and DropIT modules (``DropITLinear`` ...) back to their ``torch.nn``
    classes, parameters shared, not copied. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    detach(model)
    for module in list(model.modules()):
        to_plain = getattr(type(module), "to_plain", None)
        if to_plain is not None:
            to_plain(module)
    return model


# --- report --------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    """One covered weight: its settings and what the last training forward did with it."""

    name: str
    op: Optional[str]
    gamma: Optional[float]
    strategy: Optional[str]
    chunk: Optional[int]
    dense_reason: Optional[str]
    calls: int
    dense_bytes: int
    cached_bytes: int
    #: a product against this weight that DropIT does not cover, "op: not covered: why"
    uncovered: Optional[str] = None

    def settings_text(self) -> str:
        """``g=0.9 parallel_min_k D=16384``, or ``dense (why)``."""
        if self.gamma is None:
            return f"dense ({self.dense_reason})"
        return f"g={self.gamma:g} {self.strategy} D={self.chunk}"


def text_table(rows: list[tuple[str, ...]], align: str) -> list[str]:
    """The lines of a text table: a header row, a rule, the rows; ``align`` has one letter per
    column (``l`` left, ``r`` right)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


class ByteTotals:
    """``dense_bytes`` and ``cached_bytes`` summed over ``self.layers``."""

    layers: Sequence[LayerReport]

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.layers)

    @property
    def cached_bytes(self) -> int:
        return sum(r.cached_bytes for r in self.layers)


@dataclass
class Report(ByteTotals):
    """What :func:`report` returns; ``str(report)`` is a table, ``to_dict()`` plain data."""

    layers: list[LayerReport]
    relus: dict[str, str]
    #: eager training forwards seen (compiled ones record nothing)
    forwards: int
    #: whether the last training forward ran compiled (then calls and bytes are those of the
    #: last eager one, if any)
    compiled: bool
    first: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.layers], "relus": dict(self.relus), "forwards": self.forwards,
                "compiled": self.compiled, "first": self.first,
                "dense_bytes": self.dense_bytes, "cached_bytes": self.cached_bytes}

    def __str__(self) -> str:
        from .memory import format_bytes

        if self.compiled:
            state = "the last training forward ran compiled: calls and bytes are not recorded there"
        elif not self.forwards:
            state = "no training forward yet"
        else:
            state = "calls and bytes of the last training forward"
        rows = [("layer", "op", "settings", "calls", "dense", "cached")]
        for r in self.layers:
            rows.append((r.name or "(model)", r.op or "-", r.settings_text(), str(r.calls),
                         format_bytes(r.dense_bytes), format_bytes(r.cached_bytes)))
        lines = [f"DropIT report: {state}", *text_table(rows, "lllrrr")]
        lines += [f"{r.name}: {r.uncovered}" for r in self.layers if r.uncovered]
        lines.append(f"total: {format_bytes(self.dense_bytes)} dense inputs cached as "
                     f"{format_bytes(self.cached_bytes)}")
        if self.relus:
            masked = sum(v.startswith("masked") for v in self.relus.values())
            lines.append(f"ReLUs: {masked} of {len(self.relus)} masked")
        return "\n".join(lines)


def report(model: nn.Module) -> Report:
    """Per covered weight of a converted ``model``: the op that used it, its settings (or why it is
    dense), how many times DropIT cached its input in the last training forward, and the bytes of
    those inputs dense vs cached. Weights of layer types ``convert`` covers are always listed;
    other weights only if a product used them. Raises ValueError if ``model`` is not converted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    conversion = conversion_of(model)
    if conversion is None:
        raise ValueError("model is not converted (call dropit_cuda.convert(model) first)")
    rows = []
    for layer in conversion.layers:
        if not (layer.claimed or layer.calls or layer.uncovered or layer.dense_reason in ("skip_first", KEPT)):
            continue
        s = None if layer.keep_input else layer.settings
        uncovered = None if layer.uncovered is None else f"{layer.uncovered[0]}: not covered: {layer.uncovered[1]}"
        rows.append(LayerReport(layer.name, layer.op, s and s.gamma, s and s.strategy, s and s.chunk,
                                layer.dense_reason, layer.calls, layer.dense_bytes, layer.cached_bytes, uncovered))
    relus = {name: conversion.relu_decisions.get(name, "masked (undecided: no eager training forward yet)")
             for name, _ in conversion.relus}
    return Report(rows, relus, conversion.forwards, conversion.compiled, conversion.first)
