"""What every demo task shares: settings, the training loop, the byte count, the summary, the check.

A task (:class:`Task`) says what to train on and how to score it: its data, its model, the
batches of each round of training, the loss of a batch and the metrics evaluated after every
round. :func:`run_task` trains, from the same initial weights and on the same batches, one
baseline and one run per DropIT setting, for every seed, and returns (and writes as JSON) every
figure; :mod:`.report` prints and plots them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.nn as nn

from .. import STRATEGIES as _STRATEGIES
from ..ops import check_chunk, check_gamma

STRATEGIES = tuple(_STRATEGIES)

#: The chunk size the demos use. The paper's D = 16384 suits activations of millions of elements;
#: the demos' layer inputs hold 1024-2048 elements per image or 8 tokens' worth per 1024, so 16384
#: would put 8-16 images in one chunk. The bytes cached do not depend on D (values plus one bit per
#: element either way).
DEFAULT_CHUNK = 1024


# ------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class RunSpec:
    """One training configuration: the baseline (``strategy=None``) or a DropIT setting."""

    strategy: Optional[str] = None
    gamma: float = 0.0

    @property
    def name(self) -> str:
        return "baseline" if self.strategy is None else f"{self.strategy} γ={self.gamma:g}"

    @property
    def key(self) -> str:
        """An ASCII name for files and JSON keys."""
        return "baseline" if self.strategy is None else f"{self.strategy}@{self.gamma:g}"


@dataclass
class DemoConfig:
    """The settings every task has; each task subclasses it with its own fields and defaults.

    ``relu_mask`` is passed to :func:`dropit_cuda.convert` (the DropIT runs swap ``nn.ReLU`` for
    ``MaskedReLU``, so a conv's input is held by the conv alone and packing it frees it).
    ``threads``: CPU threads torch may use (``None``: leave torch's setting); the demo networks
    are small enough that one thread is about as fast as two and steadier on a busy machine.
    """

    gammas: tuple[float, ...] = (0.8, 0.9)
    strategy: str = "parallel_min_k"
    contrast: Optional[tuple[str, float]] = ("random", 0.8)
    seeds: int = 1
    seed: int = 0
    device: str = "auto"
    out: str = "demo-out"
    batch_size: int = 64
    lr: float = 0.05
    chunk: int = DEFAULT_CHUNK
    threads: Optional[int] = 1
    relu_mask: bool = True
    progress: bool = True
    check: bool = False

    #: fields that must be positive ints (subclasses add theirs)
    positive_ints = ("seeds", "batch_size")

    def validate(self) -> "DemoConfig":
        """Raises ValueError/TypeError naming the field that is out of range; returns ``self``."""
        for g in self.gammas:
            check_gamma(g, "gammas")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.contrast is not None:
            if self.contrast[0] not in STRATEGIES:
                raise ValueError(f"contrast strategy must be one of {STRATEGIES}, got {self.contrast[0]!r}")
            check_gamma(self.contrast[1], "contrast gamma")
        check_chunk(self.chunk)
        for name in self.positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        return self

    def runs(self) -> list[RunSpec]:
        """Baseline first, then ``strategy`` at each γ, then the contrast run (if not a duplicate)."""
        specs = [RunSpec()] + [RunSpec(self.strategy, g) for g in self.gammas]
        if self.contrast is not None:
            extra = RunSpec(*self.contrast)
            if extra not in specs:
                specs.append(extra)
        return specs

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


@dataclass(frozen=True)
class Metric:
    """A figure a task evaluates after every round of training."""

    key: str  # JSON key
    header: str  # table column and plot label
    decimals: int
    higher_is_better: bool
    #: the plot's y axis spans at most this much from the best value (None: all of it)
    plot_span: Optional[float] = None


@dataclass(frozen=True)
class Check:
    """The acceptance test of a task: DropIT ``parallel_min_k`` at ``gamma`` against the baseline,
    on the task's headline metric averaged over ``seeds``. ``gap`` is how much worse DropIT is:
    in the metric's units, or with ``relative`` in percent of the baseline's value."""

    tolerance: float
    relative: bool
    gamma: float = 0.8
    seeds: int = 3

    @property
    def unit(self) -> str:
        return "%" if self.relative else "points"

    def gap(self, metric: Metric, baseline: float, dropit: float) -> float:
        worse = baseline - dropit if metric.higher_is_better else dropit - baseline
        return 100.0 * worse / abs(baseline) if self.relative else worse


class Task:
    """One demo task. Subclasses set the class attributes and implement the methods."""

    name: str
    title: str  # for the plot
    config_class: type = DemoConfig
    #: evaluated after every round; the first is the headline figure (and the check's)
    metrics: tuple[Metric, ...] = ()
    check: Check
    round_label: str = "epoch"  # the x axis of the curves counts these
    grad_clip: Optional[float] = None
    needs: tuple[str, ...] = ()  # modules of the [demo] extra that this task imports

    def round_size(self, cfg: Any) -> int:
        """How far one round moves the curves' x axis (1 epoch, or ``eval_every`` steps)."""
        return 1

    def load(self, cfg: Any, device: torch.device) -> Any:
        raise NotImplementedError

    def describe(self, data: Any, cfg: Any) -> dict[str, Any]:
        """Facts about the data for the JSON (``"log"``: the line printed before training)."""
        raise NotImplementedError

    def build_model(self, cfg: Any) -> nn.Module:
        """A freshly initialised model (from torch's global generator)."""
        raise NotImplementedError

    def convert_options(self, cfg: Any) -> dict[str, Any]:
        """Extra keyword arguments of :func:`dropit_cuda.convert`."""
        return {}

    def schedule(self, data: Any, cfg: Any, seed: int) -> list[list[Any]]:
        """The batches of each round; every run of a seed walks the same ones."""
        raise NotImplementedError

    def optimizer(self, model: nn.Module, cfg: Any, total_steps: int):
        """``(optimizer, lr_scheduler)``; the scheduler is stepped after every step."""
        raise NotImplementedError

    def loss(self, model: nn.Module, data: Any, cfg: Any, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Any, cfg: Any) -> dict[str, float]:
        """The values of ``metrics`` (called in eval mode, without gradients)."""
        raise NotImplementedError

    def probe_inputs(self, data: Any, cfg: Any, batch: Any) -> tuple:
        """The model's inputs for ``batch``: what the saved bytes are measured on."""
        raise NotImplementedError

    def autocast(self, cfg: Any, device: torch.device) -> ContextManager:
        """The context the forward passes run in (mixed precision, or nothing)."""
        return contextlib.nullcontext()


def cosine_schedule(total_steps: int, warmup: int = 0, floor: float = 0.0) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up, then cosine from 1 down to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(step - warmup, total_steps - warmup) / max(1, total_steps - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the first GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device: not a torch device: {name!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} was asked for but torch sees no CUDA device")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------- bytes


def dropit_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers whose inputs DropIT caches in a converted ``model`` (from
    :func:`dropit_cuda.report`; convert with ``example_inputs`` so the first layer is decided)."""
    import dropit_cuda as dc

    return [r.name for r in dc.report(model).layers if r.gamma is not None]


def saved_bytes(model: nn.Module, inputs: tuple, layers: Sequence[str]) -> tuple[int, int]:
    """Bytes saved for backward by one training forward of ``model``: in all, and by ``layers``.

    From :func:`dropit_cuda.memory.measure`: ``total_bytes`` counts every storage once (a conv
    input that the preceding ReLU saves too counts once); a layer's figure is what it saved itself
    (its dense input, or its packed cache), less copies of its weights. Measured on a copy, so
    BatchNorm's running statistics of ``model`` are left alone.
    """
    from .. import memory

    report = memory.measure(copy.deepcopy(model).train(), *inputs)
    wanted = set(layers)
    by_layers = sum(m.saved_bytes - m.weight_copy_bytes for m in report.modules if m.name in wanted)
    return int(report.total_bytes), int(by_layers)


# ------------------------------------------------------------------------------------ training


def train_run(task: Task, model: nn.Module, data: Any, rounds: list[list[Any]], cfg: DemoConfig,
              device: torch.device, seed: int, label: str = "") -> dict[str, Any]:
    """Trains ``model`` (in place) on ``rounds``' batches; returns its curves and figures.

    ``torch.manual_seed(seed)`` is set first, so the ``random`` strategy draws the same keys on
    every call with the same seed. The task's metrics are evaluated after every round.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.to(device).train()
    total_steps = sum(len(r) for r in rounds)
    opt, sched = task.optimizer(model, cfg, total_steps)
    curves: dict[str, list[float]] = {"train_loss": [], **{m.key: [] for m in task.metrics}}
    step_times = []
    bar = tqdm(total=total_steps, desc=label, disable=not cfg.progress, leave=True, file=sys.stderr)
    for batches in rounds:
        model.train()
        loss_sum = 0.0
        for batch in batches:
            _sync(device)
            t0 = time.perf_counter()
            with task.autocast(cfg, device):
                loss = task.loss(model, data, cfg, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if task.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), task.grad_clip)
            opt.step()
            _sync(device)
            step_times.append(time.perf_counter() - t0)
            sched.step()
            loss_sum += float(loss.detach())
            bar.update(1)
        curves["train_loss"].append(loss_sum / len(batches))
        model.eval()
        with torch.no_grad(), task.autocast(cfg, device):
            for key, value in task.evaluate(model, data, cfg).items():
                curves[key].append(value)
        model.train()
        head = task.metrics[0]
        bar.set_postfix(loss=f"{curves['train_loss'][-1]:.4f}", **{head.key: f"{curves[head.key][-1]:.{head.decimals}f}"})
    bar.close()
    warm = step_times[min(len(step_times) - 1, 5):]  # the first steps include one-time set-up
    result: dict[str, Any] = dict(curves)
    result.update({f"final_{key}": values[-1] for key, values in curves.items()})
    result["step_ms"] = 1000.0 * statistics.median(warm)
    return result


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_task(task: Task, cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains every run of ``cfg`` for every seed; writes ``results.json`` and ``curves.png`` to
    ``cfg.out``; returns the results (as in the JSON)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_task(task, cfg, device, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_task(task: Task, cfg: DemoConfig, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    import dropit_cuda as dc

    from .report import plot_curves

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = task.load(cfg, device)
    dataset = task.describe(data, cfg)
    specs = cfg.runs()
    log(f"{task.name}: {dataset['log']}; device {device}, seeds {cfg.seed_list()}, chunk {cfg.chunk}, "
        f"{torch.get_num_threads()} CPU thread(s)")
    per_run: dict[str, dict[str, Any]] = {
        s.key: {"name": s.name, "strategy": s.strategy, "gamma": s.gamma, "seeds": {}} for s in specs
    }
    dropit_names: list[str] = []
    t_start = time.perf_counter()
    for seed in cfg.seed_list():
        torch.manual_seed(seed)
        initial = task.build_model(cfg).to(device)  # one initialisation per seed, shared by every run
        rounds = task.schedule(data, cfg, seed)
        probe = task.probe_inputs(data, cfg, rounds[0][0])
        if not dropit_names:
            # the layers DropIT converts; the baseline's bytes are counted over the same (dense) layers
            with task.autocast(cfg, device):
                dropit_names = dropit_layer_names(dc.convert(
                    copy.deepcopy(initial), chunk=cfg.chunk, example_inputs=probe, **task.convert_options(cfg)))
        for spec in specs:
            model = copy.deepcopy(initial)
            if spec.strategy is not None:
                # example_inputs: the first layer and the ReLU masks are decided now, so the bytes
                # below are those of every training step
                dc.convert(model, gamma=spec.gamma, strategy=spec.strategy, chunk=cfg.chunk,
                           relu_mask=cfg.relu_mask, example_inputs=probe, **task.convert_options(cfg))
            entry = per_run[spec.key]
            if "saved_bytes" not in entry:  # shapes are the same for every seed: measure once
                with task.autocast(cfg, device):
                    entry["saved_bytes"], entry["layer_bytes"] = saved_bytes(model, probe, dropit_names)
            label = f"{task.name}: {spec.name} seed {seed}"
            entry["seeds"][str(seed)] = train_run(task, model, data, rounds, cfg, device, seed, label)
    elapsed = time.perf_counter() - t_start

    for entry in per_run.values():
        seeds = list(entry["seeds"].values())
        for key in ["train_loss", *(m.key for m in task.metrics)]:
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std([r[f"final_{key}"] for r in seeds])
        entry["step_ms"] = statistics.median(r["step_ms"] for r in seeds)
    results = {
        "task": task.name,
        "config": {**asdict(cfg), "device": str(device)},
        "dataset": {k: v for k, v in dataset.items() if k != "log"},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "elapsed_s": elapsed,
        "round": {"label": task.round_label, "size": task.round_size(cfg)},
        "metrics": [asdict(m) for m in task.metrics],
        "dropit_layers": dropit_names,
        "runs": per_run,
    }
    if cfg.check:
        results["check"] = check_result(task, per_run, cfg)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    n = len(cfg.seed_list())
    seeds_text = "1 seed" if n == 1 else f"mean of {n} seeds, band: min to max"
    plot_curves(results, out / "curves.png", title=f"{task.title} ({device}, {seeds_text})")
    return results


def check_result(task: Task, per_run: dict[str, dict[str, Any]], cfg: DemoConfig) -> dict[str, Any]:
    """The acceptance figure: how much worse ``parallel_min_k`` at the check's γ is than the
    baseline on the headline metric, averaged over the seeds."""
    check, metric = task.check, task.metrics[0]
    key = RunSpec("parallel_min_k", check.gamma).key
    if key not in per_run:
        raise ValueError(f"check: no {key} run in this configuration")
    base, dropit = per_run["baseline"][f"{metric.key}_mean"], per_run[key][f"{metric.key}_mean"]
    gap = check.gap(metric, base, dropit)
    return {
        "run": key,
        "metric": metric.key,
        "seeds": cfg.seeds,
        "baseline": base,
        "dropit": dropit,
        "gap": gap,
        "unit": check.unit,
        "tolerance": check.tolerance,
        "passed": gap <= check.tolerance,
    }
