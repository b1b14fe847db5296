"""Know what you drop: how far each DropIT layer's weight gradient is from the exact one.

:func:`fidelity` runs one training forward and backward of a converted model and, from that same
pass, gets two weight gradients per DropIT layer: the one DropIT computes from its compressed
cache, and the exact one, computed beside it from the dense input (held only during the call).
It compares them per layer (cosine similarity, relative L2 error) and over the whole model.
Nothing the training loop sees changes: parameters' ``.grad``, the random state, the buffers,
the module modes, and what :func:`dropit_cuda.report` says of the last training forward.

:func:`tune` picks per layer the largest γ whose gradient stays at a cosine floor, and
:class:`FidelityMonitor` reports the fidelity every N training steps.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from . import strategies
from .convert import ByteTotals, LayerReport, report, text_table, unobserved_forward
from .memory import format_bytes
from .routing import Conversion, conversion_of, in_backward
from .settings import check_gamma

__all__ = [
    "DEFAULT_TUNE_GAMMAS",
    "FidelityMonitor",
    "FidelityReport",
    "LayerFidelity",
    "Plan",
    "PlanLayer",
    "default_loss",
    "fidelity",
    "tune",
]

DEFAULT_TUNE_GAMMAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
LossFn = Callable[[Any], torch.Tensor]


# --- recording: the exact weight gradient beside the DropIT one --------------------------------


class _Watch:
    """What one layer hands :func:`fidelity` while it records: its DropIT and exact weight
    gradients, each summed over the layer's uses in the pass (as ``.grad`` would sum them), and
    the shape, dtype and channel dimension of every input it cached."""

    def __init__(self) -> None:
        self.dropit: Optional[torch.Tensor] = None
        self.exact: Optional[torch.Tensor] = None
        self.inputs: list[tuple[tuple, torch.dtype, int]] = []

    def saw(self, x: torch.Tensor, channel_dim: int) -> None:
        if not in_backward():  # a checkpoint recompute is not another use
            self.inputs.append((tuple(x.shape), x.dtype, channel_dim))

    def add(self, dropit: torch.Tensor, exact: torch.Tensor) -> None:
        self.dropit = dropit.detach().clone() if self.dropit is None else self.dropit + dropit
        self.exact = exact.detach().clone() if self.exact is None else self.exact + exact


@contextlib.contextmanager
def _recording(conversion: Conversion) -> Iterator[dict[str, _Watch]]:
    """While active, every layer of ``conversion`` has a watch (``Layer.watch``). The ReLU masks
    and the products left dense because their input is kept elsewhere are not decided (nor a
    pending decision applied) meanwhile: the dense inputs held for the exact gradients would make
    every ReLU output and product input look kept by another op."""
    watches = {}
    for layer in conversion.layers:
        layer.watch = watches[layer.name] = _Watch()
    pending = conversion.relu_pending, conversion.kept_pending, conversion.kept_applied
    conversion.relu_pending, conversion.kept_pending, conversion.kept_applied = False, False, True
    try:
        yield watches
    finally:
        for layer in conversion.layers:
            layer.watch = None
        conversion.relu_pending, conversion.kept_pending, conversion.kept_applied = pending


def _compare(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Cosine similarity and relative L2 error ``|d - e| / |e|`` of the DropIT gradients ``d``
    against the exact ones ``e``, all pairs taken as one concatenated vector, in float64. Both
    zero: cosine 1, error 0 (they agree); one of them zero: cosine 0 (no direction in common)."""
    dot = sq_d = sq_e = sq_diff = 0.0
    for d, e in pairs:
        d, e = d.double(), e.double()
        dot += float((d * e).sum())
        sq_d += float((d * d).sum())
        sq_e += float((e * e).sum())
        sq_diff += float(((d - e) ** 2).sum())
    if sq_d == 0.0 or sq_e == 0.0:
        cosine = 1.0 if sq_d == sq_e else 0.0
    else:  # sqrt of the product, so that identical gradients give exactly 1
        cosine = max(-1.0, min(1.0, dot / math.sqrt(sq_d * sq_e)))
    if sq_e == 0.0:
        rel_error = 0.0 if sq_diff == 0.0 else math.inf
    else:
        rel_error = math.sqrt(sq_diff / sq_e)
    return cosine, rel_error


# --- the report -------------------------------------------------------------------------------


@dataclass
class LayerFidelity(LayerReport):
    """One covered weight: its settings and bytes in the pass (as in :func:`dropit_cuda.report`)
    and its weight gradient's fidelity.

    ``cosine`` and ``rel_error`` are None for a layer DropIT leaves dense (``dense_reason``:
    ``skip_first``, ``excluded``, ``per-layer setting``; its gradient is the exact one) and for a
    DropIT layer that computed no weight gradient in the pass (``note`` says why)."""

    cosine: Optional[float] = None
    rel_error: Optional[float] = None
    note: Optional[str] = None


@dataclass
class FidelityReport(ByteTotals):
    """What :func:`fidelity` returns: per layer (``layers``) and over the whole model (``cosine``,
    ``rel_error``: all measured DropIT layers' weight gradients as one vector; ``dense_bytes``,
    ``cached_bytes``: their inputs dense and as cached). ``str(report)`` is a table,
    ``to_dict()`` plain data, ``plot(path)`` a figure."""

    layers: list[LayerFidelity]
    cosine: Optional[float]
    rel_error: Optional[float]
    loss: float

    @property
    def measured(self) -> list[LayerFidelity]:
        """The DropIT layers with a cosine."""
        return [r for r in self.layers if r.cosine is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.layers], "cosine": self.cosine, "rel_error": self.rel_error,
                "loss": self.loss, "dense_bytes": self.dense_bytes, "cached_bytes": self.cached_bytes}

    def __str__(self) -> str:
        rows = [("layer", "op", "settings", "cosine", "rel err", "dense", "cached")]
        for r in self.layers:
            how = r.settings_text()
            cos = "-" if r.cosine is None else f"{r.cosine:.4f}"
            err = "-" if r.rel_error is None else f"{r.rel_error:.4f}"
            if r.note:
                how += f" [{r.note}]"
            dense, cached = (format_bytes(r.dense_bytes), format_bytes(r.cached_bytes)) if r.calls else ("-", "-")
            rows.append((r.name or "(model)", r.op or "-", how, cos, err, dense, cached))
        cos = "-" if self.cosine is None else f"{self.cosine:.4f}"
        err = "-" if self.rel_error is None else f"{self.rel_error:.4f}"
        rows.append(("(all DropIT layers)", "", "", cos, err, format_bytes(self.dense_bytes),
                     format_bytes(self.cached_bytes)))
        lines = [f"DropIT fidelity: weight gradients vs exact on one batch (loss {self.loss:.6g})"]
        lines += text_table(rows, "lllrrrr")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Writes a figure of the per-layer cosine and bytes (dense vs cached) to ``path`` (any
        format matplotlib saves by its extension) and returns ``path``. Needs matplotlib (an
        optional dependency: ``pip install 'dropit_cuda[demo]'``)."""
        Figure = _matplotlib_figure()
        rows = self.layers
        names = [r.name or "(model)" for r in rows]
        fig = Figure(figsize=(11, 0.35 * len(rows) + 1.8), layout="constrained")
        ax_cos, ax_bytes = fig.subplots(1, 2, sharey=True)
        ys = list(range(len(rows)))
        cos = [0.0 if r.cosine is None else r.cosine for r in rows]
        ax_cos.barh(ys, cos)
        for y, r in zip(ys, rows):  # no bar (not a cosine of 1) for a layer without a measurement
            if r.cosine is None:
                why = f"dense ({r.dense_reason})" if r.gamma is None else (r.note or "-")
                ax_cos.text(0.02, y, why, va="center", fontsize=8)
        ax_cos.set_xlim(min([0.0, *cos]), 1.0)
        ax_cos.set_yticks(ys, names, fontsize=8)
        ax_cos.invert_yaxis()
        ax_cos.set_xlabel("weight-gradient cosine vs exact")
        ax_cos.set_title(f"model cosine {self.cosine:.4f}" if self.cosine is not None else "fidelity")
        h = 0.4
        ax_bytes.barh([y - h / 2 for y in ys], [r.dense_bytes / 1024 for r in rows], h, label="dense input")
        ax_bytes.barh([y + h / 2 for y in ys], [r.cached_bytes / 1024 for r in rows], h, label="cached")
        ax_bytes.set_xlabel("KiB")
        ax_bytes.legend(fontsize=8)
        ax_bytes.set_title(f"{format_bytes(self.dense_bytes)} dense, {format_bytes(self.cached_bytes)} cached")
        fig.savefig(path, dpi=120)
        return path


def _matplotlib_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot() needs matplotlib, an optional dependency of dropit_cuda: "
                          "pip install 'dropit_cuda[demo]' (or pip install matplotlib)") from e
    return Figure


# --- fidelity ---------------------------------------------------------------------------------


def default_loss(output: Any) -> torch.Tensor:
    """The loss :func:`fidelity` uses without ``loss_fn``: ``output.loss`` when the output has one
    (a Hugging Face model given labels), else the mean square of the output tensor (or of
    ``output.logits``), in float32.

    Not a plain sum: the gradient of a sum is 1 for every output element whatever the input, so a
    linear head's weight gradient would be the same sum of inputs in every row. The mean square
    gives each output element a gradient proportional to its value. The fidelity depends on the
    loss: pass the training loss (``loss_fn=lambda out: F.cross_entropy(out, labels)``) to measure
    the gradients training uses."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = getattr(output, "logits", None)
    out = logits if isinstance(logits, torch.Tensor) else output
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        return out.float().square().mean()
    raise TypeError(f"the model returned {type(output).__name__}, which has no floating tensor, .loss or "
                    ".logits for the default loss; pass loss_fn=(output -> scalar tensor)")


def _check_loss_fn(loss_fn: Any) -> LossFn:
    if loss_fn is None:
        return default_loss
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (output -> scalar tensor) or None, got {type(loss_fn).__name__}")
    return loss_fn


def _converted(model: Any, what: str) -> Conversion:
    """``model``'s conversion, checked for :func:`fidelity`-like calls (``what`` names the caller)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    conversion = conversion_of(model)
    if conversion is None:
        raise ValueError(f"{what}: model is not converted (call dropit_cuda.convert(model) first)")
    if not model.training:
        raise ValueError(f"{what}: model must be in training mode (model.train()): DropIT caches "
                         "nothing in eval mode")
    return conversion


def _trainable_weights(conversion: Conversion) -> list[torch.Tensor]:
    """The leaf tensors behind the DropIT layers' weights that require grad (a parametrized
    weight's original parameters), each once."""
    out: dict[int, torch.Tensor] = {}
    for layer in conversion.layers:
        if layer.settings is None:
            continue
        if layer.parametrized:
            params = list(layer.module.parametrizations[layer.attr].parameters())
        else:
            w = layer.current()
            params = [] if w is None else [w]
        for p in params:
            if p.requires_grad:
                out.setdefault(id(p), p)
    return list(out.values())


def _measure(model: nn.Module, conversion: Conversion, inputs: tuple, kwargs: dict,
             loss_fn: LossFn) -> tuple[FidelityReport, dict[str, _Watch]]:
    """One recorded forward and backward: the report, and each layer's watch."""
    with unobserved_forward(model, conversion), _recording(conversion) as watches, torch.enable_grad():
        output = model(*inputs, **kwargs)
        loss = loss_fn(output)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar (one element), got shape {tuple(loss.shape)}")
        rows = report(model).layers  # what this forward cached, before the state is restored
        weights = _trainable_weights(conversion)
        if weights:
            if not loss.requires_grad:
                raise ValueError("loss_fn's loss does not depend on the model's trainable weights")
            # gradients returned, not accumulated: no parameter's .grad is touched
            torch.autograd.grad(loss, weights, allow_unused=True)
        loss_value = float(loss.detach())
        del output, loss  # frees the dense inputs kept for the exact gradients
    layers, pairs = [], []
    for r in rows:
        watch = watches[r.name]
        cosine = rel_error = note = None
        if r.gamma is not None:
            if watch.exact is not None:
                cosine, rel_error = _compare([(watch.dropit, watch.exact)])
                pairs.append((watch.dropit, watch.exact))
            else:
                note = "not used in this pass" if not r.calls else "no weight gradient (frozen or not in the loss)"
        layers.append(LayerFidelity(**asdict(r), cosine=cosine, rel_error=rel_error, note=note))
    cosine, rel_error = _compare(pairs) if pairs else (None, None)
    return FidelityReport(layers, cosine, rel_error, loss_value), watches


def fidelity(model: nn.Module, *inputs: Any, loss_fn: Optional[LossFn] = None, **kwargs: Any) -> FidelityReport:
    """How far each DropIT layer's weight gradient is from the exact one, on one batch.

    Runs ``loss_fn(model(*inputs, **kwargs))`` forward and backward once. In that one pass every
    DropIT layer computes its weight gradient from its compressed cache, as in training, and, from
    the dense input it is handed (held only until the call returns), the exact weight gradient
    too: the one the plain model computes, given the same gradient of the layer's output (DropIT
    leaves input gradients exact, so every layer's output gradient is the plain model's). A layer
    used several times in the forward (shared weights) sums its gradients over its uses.

    Per covered weight the report gives γ, strategy, the cosine similarity and relative L2 error
    ``|g_dropit - g_exact| / |g_exact|`` of the weight gradient, and the bytes of its inputs dense
    and as cached; and the same over all DropIT layers (their gradients as one vector). Layers
    DropIT leaves dense (``skip_first``, ``excluded``, a per-layer ``None``) are listed as dense,
    with no cosine. For a parametrized weight the gradient compared is that of the weight the
    product used.

    Left as they were: every parameter's ``.grad`` (gradients are returned by
    ``torch.autograd.grad``, never accumulated), the random state (CPU and the model's CUDA
    devices), the buffers (batch-norm statistics), the module modes, and :func:`dropit_cuda.report`.
    If this is the model's first training forward, ``skip_first`` is decided here, but the ReLU
    masks are left to the next one (the dense inputs held here would make every ReLU output look
    kept by another op). Needs eager execution (under ``torch.compile`` nothing is recorded).

    Args:
        model: a model converted by :func:`dropit_cuda.convert`, in training mode.
        *inputs, **kwargs: the model's arguments for one batch.
        loss_fn: ``output -> scalar tensor``; default :func:`default_loss` (``output.loss`` if
            present, else the mean square of the output or of ``output.logits``). Pass the training
            loss to measure the gradients training uses.

    Raises:
        TypeError/ValueError naming the argument: ``model`` not a module, not converted or not in
        training mode; ``loss_fn`` not callable, or its result not a scalar tensor.
    """
    conversion = _converted(model, "fidelity")
    fn = _check_loss_fn(loss_fn)
    return _measure(model, conversion, inputs, kwargs, fn)[0]


# --- tune -------------------------------------------------------------------------------------


def _escape(name: str) -> str:
    """``name`` as an ``fnmatch`` pattern that matches exactly it."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _cache_bytes(inputs: list[tuple[tuple, torch.dtype, int]], strategy: str, chunk: int, gamma: float) -> int:
    """Bytes a layer caches for these inputs at these settings, predicted by the strategy."""
    impl = strategies.get(strategy)
    return sum(impl.nbytes(shape, dtype, gamma, chunk, channel_dim) for shape, dtype, channel_dim in inputs)


@dataclass
class PlanLayer:
    """One layer of a :class:`Plan`: the γ chosen (None: dense), its cosine at every candidate γ,
    the bytes its inputs take dense and as the plan caches them, and why."""

    name: str
    gamma: Optional[float]
    cosine: Optional[float]
    cosines: dict[float, float]
    strategy: Optional[str]
    chunk: Optional[int]
    dense_bytes: int
    cached_bytes: int
    reason: str
    #: whether the plan names the layer (not a layer the conversion excluded)
    planned: bool = True


@dataclass
class UniformGamma:
    """Every tuned layer at one γ: its bytes and its worst layer."""

    gamma: float
    cached_bytes: int
    worst_cosine: float
    worst_layer: str

    def meets(self, min_cosine: float) -> bool:
        return self.worst_cosine >= min_cosine


class Plan(Mapping):
    """What :func:`tune` returns: a γ per layer, usable as ``dc.convert(model, gamma=plan)``.

    As a mapping it is a per-layer ``gamma`` spec: exact layer names (``fnmatch``
    metacharacters escaped, deeper names first so that no name's pattern catches a child layer)
    to γ, or None for a layer kept dense. It names the layers of the conversion it was tuned on
    (all but the excluded ones): convert with the same ``strategy``, ``chunk``, ``include`` and
    ``exclude``. ``layers`` explains each choice; ``uniform`` gives, per candidate γ, the bytes and
    the worst layer's cosine with every layer at that γ; ``cached_bytes`` is what the plan caches,
    over the same layers."""

    def __init__(self, layers: list[PlanLayer], uniform: list[UniformGamma], min_cosine: float) -> None:
        self.layers = layers
        self.uniform = uniform
        self.min_cosine = min_cosine
        named = [r for r in layers if r.planned]
        named.sort(key=lambda r: -r.name.count("."))  # stable: deeper names first
        self._spec = {_escape(r.name): r.gamma for r in named}

    def __getitem__(self, pattern: str) -> Optional[float]:
        return self._spec[pattern]

    def __iter__(self) -> Iterator[str]:
        return iter(self._spec)

    def __len__(self) -> int:
        return len(self._spec)

    @property
    def tuned(self) -> list[PlanLayer]:
        """The layers measured at every candidate γ (those counted in the bytes)."""
        return [r for r in self.layers if r.cosines]

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.tuned)

    @property
    def cached_bytes(self) -> int:
        return sum(r.cached_bytes for r in self.tuned)

    @property
    def best_uniform(self) -> Optional[UniformGamma]:
        """The largest uniform γ whose worst layer meets the floor, if any."""
        ok = [u for u in self.uniform if u.meets(self.min_cosine)]
        return max(ok, key=lambda u: u.gamma) if ok else None

    def to_dict(self) -> dict[str, Any]:
        return {"min_cosine": self.min_cosine, "gamma": dict(self._spec),
                "layers": [asdict(r) for r in self.layers], "uniform": [asdict(u) for u in self.uniform],
                "dense_bytes": self.dense_bytes, "cached_bytes": self.cached_bytes}

    def __repr__(self) -> str:
        return f"Plan({self._spec!r})"

    def __str__(self) -> str:
        rows = [("layer", "gamma", "cosine", "cached", "why")]
        for r in self.layers:
            rows.append((r.name or "(model)", "dense" if r.gamma is None else f"{r.gamma:g}",
                         "-" if r.cosine is None else f"{r.cosine:.4f}",
                         format_bytes(r.cached_bytes) if r.cosines else "-", r.reason))
        lines = [f"DropIT plan: per layer the largest γ whose weight-gradient cosine is >= {self.min_cosine:g}"]
        lines += text_table(rows, "lrrrl")
        lines.append(f"plan: {format_bytes(self.cached_bytes)} cached of {format_bytes(self.dense_bytes)} dense")
        best = self.best_uniform
        if best is not None:
            lines.append(f"best uniform γ that meets the floor: {best.gamma:g}, {format_bytes(best.cached_bytes)} "
                         f"cached (the plan: {100 * self.cached_bytes / max(best.cached_bytes, 1):.0f}% of it)")
        for u in self.uniform:
            mark = "meets" if u.meets(self.min_cosine) else "misses"
            lines.append(f"uniform γ={u.gamma:g}: {format_bytes(u.cached_bytes)} cached, worst cosine "
                         f"{u.worst_cosine:.4f} ({u.worst_layer}), {mark} the floor")
        return "\n".join(lines)


def _check_gammas(gammas: Any) -> list[float]:
    if isinstance(gammas, (str, bytes)) or not isinstance(gammas, Sequence):
        raise TypeError(f"gammas must be a sequence of floats in [0, 1), got {type(gammas).__name__}")
    if not gammas:
        raise ValueError("gammas must name at least one candidate γ")
    return sorted({check_gamma(g, f"gammas[{i}]") for i, g in enumerate(gammas)})


def check_min_cosine(min_cosine: Any, name: str = "min_cosine") -> float:
    """``min_cosine`` as a float in ``[-1, 1]``; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(min_cosine, bool) or not isinstance(min_cosine, numbers.Real):
        raise TypeError(f"{name} must be a float in [-1, 1], got {type(min_cosine).__name__}")
    if not -1.0 <= min_cosine <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [-1, 1], got {min_cosine}")
    return float(min_cosine)


@contextlib.contextmanager
def _all_at(conversion: Conversion, gamma: float) -> Iterator[None]:
    """Every DropIT layer at ``gamma`` (its strategy and chunk kept) while active."""
    saved = [(layer, layer.settings) for layer in conversion.layers if layer.settings is not None]
    for layer, s in saved:
        layer.settings = type(s)(gamma, s.strategy, s.chunk)
    try:
        yield
    finally:
        for layer, s in saved:
            if layer.settings is not None:  # not made dense by skip_first meanwhile
                layer.settings = s


def _choose(cosines: dict[float, float], min_cosine: float) -> tuple[Optional[float], str]:
    """The largest γ whose cosine meets the floor, and why."""
    passing = [g for g, c in cosines.items() if c >= min_cosine]
    if not passing:
        g_best = max(cosines, key=lambda g: cosines[g])
        return None, (f"below the floor at every γ (best {cosines[g_best]:.4f} at γ={g_best:g}): kept dense, "
                      "whose gradient is exact; a γ below the candidates may pass")
    chosen = max(passing)
    why = f"largest γ with cosine >= {min_cosine:g}"
    larger = sorted(g for g in cosines if g > chosen)
    if larger:
        why += f" (γ={larger[0]:g}: {cosines[larger[0]]:.4f})"
    tied = [g for g in passing if g != chosen and cosines[g] == cosines[chosen]]
    if tied:
        why += f"; tie with γ={', '.join(f'{g:g}' for g in sorted(tied))}: the largest caches least"
    failed_below = [g for g in cosines if g < chosen and g not in passing]
    if failed_below:
        why += (f"; γ={', '.join(f'{g:g}' for g in sorted(failed_below))} missed it: on one batch the "
                "cosine need not fall monotonically with γ")
    return chosen, why


def tune(model: nn.Module, *inputs: Any, loss_fn: Optional[LossFn] = None, min_cosine: float = 0.9,
         gammas: Sequence[float] = DEFAULT_TUNE_GAMMAS, **kwargs: Any) -> Plan:
    """Per layer of a converted model, the largest γ whose weight-gradient cosine on this batch
    stays at or above ``min_cosine``.

    One :func:`fidelity` pass per candidate γ, with every DropIT layer at that γ (each keeps its
    strategy and chunk), is enough: layers do not interact. A layer's weight gradient is the
    product of its output gradient and its cached input, and DropIT leaves every input gradient
    exact, so each layer's output gradient is the exact one whatever the other layers' γ; its
    cosine depends only on its own cache. The plan therefore gives each layer the cosine it had in
    the pass at its γ, and a model converted with it meets the floor layer by layer on this batch.

    The choice per layer (``plan.layers[i].reason`` says which applied):

    - the largest candidate γ that meets the floor; where several meet it with the same cosine
      (a tie: a very sparse input can lose nothing at several γ), the largest, which caches least;
      a smaller γ that misses the floor while a larger one meets it is reported (a single batch
      need not give a cosine that falls monotonically with γ);
    - a layer that misses the floor at every candidate is kept dense (None): its gradient is then
      exact, and it caches its whole input (no more than γ = 0 would);
    - layers the conversion keeps dense (``skip_first``, a per-layer ``None``) stay dense; a
      DropIT layer that computed no weight gradient in the pass (unused, frozen) keeps its γ.

    Bytes (``plan.cached_bytes``, ``plan.uniform``) are predicted by each layer's strategy
    (``nbytes``) from the shapes of the inputs it cached in the pass, over the tuned layers, each
    layer's packs counted for it: layers that read one tensor with the same settings share one
    pack in training, so they cache at most the prediction.

    Args:
        model: a model converted by :func:`dropit_cuda.convert`, in training mode.
        *inputs, **kwargs: the model's arguments for one batch.
        loss_fn: as in :func:`fidelity`.
        min_cosine: the floor, in [-1, 1].
        gammas: the candidate γ values, each in [0, 1).

    Returns:
        a :class:`Plan`; ``dc.convert(model, gamma=plan)`` applies it (with the strategy, chunk,
        include and exclude of the conversion it was tuned on). The model's settings are as they
        were; everything :func:`fidelity` leaves untouched stays untouched.
    """
    conversion = _converted(model, "tune")
    fn = _check_loss_fn(loss_fn)
    floor = check_min_cosine(min_cosine)
    candidates = _check_gammas(gammas)
    passes: dict[float, tuple[FidelityReport, dict[str, _Watch]]] = {}
    for g in candidates:
        with _all_at(conversion, g):
            passes[g] = _measure(model, conversion, inputs, kwargs, fn)
    first, watches = passes[candidates[0]]
    layers = []
    for row in first.layers:
        dense = row.dense_bytes
        if row.gamma is None:
            excluded = row.dense_reason == "excluded"
            reason = "excluded: not in the plan" if excluded else f"dense in the conversion ({row.dense_reason})"
            layers.append(PlanLayer(row.name, None, None, {}, None, None, dense, dense, reason, not excluded))
            continue
        setting = next(layer.settings for layer in conversion.layers if layer.name == row.name)
        if row.cosine is None:
            layers.append(PlanLayer(row.name, setting.gamma, None, {}, row.strategy, row.chunk, row.dense_bytes,
                                    row.cached_bytes, f"{row.note}: keeps its γ={setting.gamma:g}"))
            continue
        cosines = {g: next(r.cosine for r in passes[g][0].layers if r.name == row.name) for g in candidates}
        gamma, reason = _choose(cosines, floor)
        cached = dense if gamma is None else _cache_bytes(watches[row.name].inputs, row.strategy, row.chunk, gamma)
        layers.append(PlanLayer(row.name, gamma, None if gamma is None else cosines[gamma], cosines,
                                row.strategy, row.chunk, dense, cached, reason))
    uniform = []
    tuned = [r for r in layers if r.cosines]
    for g in candidates if tuned else ():
        worst = min(tuned, key=lambda r: r.cosines[g])
        cached = sum(_cache_bytes(watches[r.name].inputs, r.strategy, r.chunk, g) for r in tuned)
        uniform.append(UniformGamma(g, cached, worst.cosines[g], worst.name))
    return Plan(layers, uniform, floor)


# --- monitoring during training ---------------------------------------------------------------


class FidelityMonitor:
    """Reports the fidelity of a converted model every ``every`` training steps.

    Call :meth:`step` once per training step with that step's model inputs (anywhere in the loop:
    before the forward, or between ``backward()`` and ``optimizer.step()``). On steps 0,
    ``every``, ``2*every``, ... (counted from ``start_step``) it runs :func:`fidelity` on them (one
    extra forward and backward) and hands the report to ``callback(step, report)`` and/or to
    ``writer`` (a TensorBoard ``SummaryWriter`` or anything with ``add_scalar(tag, value, step)``:
    ``dropit/cosine/<layer>``, ``dropit/rel_error/<layer>``, ``dropit/model/cosine``,
    ``dropit/model/rel_error``, ``dropit/model/cached_bytes``). The training step is untouched:
    ``.grad``, the random state, the buffers and the report stay as they were, so a run with a
    monitor trains exactly as one without.

    ``monitor.last`` is the last report (None before the first).
    """

    def __init__(self, model: nn.Module, every: int, loss_fn: Optional[LossFn] = None, writer: Any = None,
                 callback: Optional[Callable[[int, FidelityReport], Any]] = None, start_step: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if conversion_of(model) is None:
            raise ValueError("FidelityMonitor: model is not converted (call dropit_cuda.convert(model) first)")
        for name, value in (("every", every), ("start_step", start_step)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must have an add_scalar(tag, value, step) method (a SummaryWriter), "
                            f"got {type(writer).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a callable (step, report), got {type(callback).__name__}")
        self.model = model
        self.every = every
        self.loss_fn = _check_loss_fn(loss_fn)
        self.writer = writer
        self.callback = callback
        self.next_step = start_step
        self.last: Optional[FidelityReport] = None

    def step(self, *inputs: Any, **kwargs: Any) -> Optional[FidelityReport]:
        """Counts one training step; on every ``every``-th, reports on ``model(*inputs, **kwargs)``
        and returns the report (else None)."""
        step, self.next_step = self.next_step, self.next_step + 1
        if step % self.every:
            return None
        rep = fidelity(self.model, *inputs, loss_fn=self.loss_fn, **kwargs)
        self.last = rep
        if self.writer is not None:
            self._write(step, rep)
        if self.callback is not None:
            self.callback(step, rep)
        return rep

    def _write(self, step: int, rep: FidelityReport) -> None:
        for r in rep.measured:
            self.writer.add_scalar(f"dropit/cosine/{r.name}", r.cosine, step)
            self.writer.add_scalar(f"dropit/rel_error/{r.name}", r.rel_error, step)
        if rep.cosine is not None:
            self.writer.add_scalar("dropit/model/cosine", rep.cosine, step)
            self.writer.add_scalar("dropit/model/rel_error", rep.rel_error, step)
        self.writer.add_scalar("dropit/model/cached_bytes", rep.cached_bytes, step)
