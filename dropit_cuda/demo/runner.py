"""What every demo task shares: settings, the training loop, the byte count, the summary, the check.

A task (:class:`Task`) says what to train on and how to score it: its data, its model, the
batches of each round of training, the model's inputs and targets for a batch and its loss, and
the metrics evaluated after every round. :func:`run_task` trains, from the same initial weights
and on the same batches, one baseline and one run per DropIT setting (and, with ``tune``, one
with a γ per layer from :func:`dropit_cuda.tune`), for every seed, and returns (and writes as
JSON) every figure, including each DropIT run's gradient fidelity (:func:`dropit_cuda.fidelity`)
at its first and last step; :mod:`.report` prints and plots them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
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
from ..fidelity import DEFAULT_TUNE_GAMMAS, FidelityReport, Plan, check_min_cosine
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
    """One training configuration: the baseline (``strategy=None``), a DropIT setting with one
    ``gamma`` for every layer, or (``min_cosine`` set, ``gamma`` None) a γ per layer that
    :func:`dropit_cuda.tune` picks for that cosine floor on each seed's first training batch."""

    strategy: Optional[str] = None
    gamma: Optional[float] = 0.0
    min_cosine: Optional[float] = None

    @property
    def tuned(self) -> bool:
        return self.min_cosine is not None

    @property
    def name(self) -> str:
        if self.strategy is None:
            return "baseline"
        return f"tuned (cos≥{self.min_cosine:g})" if self.tuned else f"{self.strategy} γ={self.gamma:g}"

    @property
    def key(self) -> str:
        """An ASCII name for files and JSON keys."""
        if self.strategy is None:
            return "baseline"
        return f"tuned@{self.min_cosine:g}" if self.tuned else f"{self.strategy}@{self.gamma:g}"


@dataclass
class DemoConfig:
    """The settings every task has; each task subclasses it with its own fields and defaults.

    ``relu_mask`` is passed to :func:`dropit_cuda.convert` (the DropIT runs swap ``nn.ReLU`` for
    ``MaskedReLU``, so a conv's input is held by the conv alone and packing it frees it).
    ``threads``: CPU threads torch may use (``None``: leave torch's setting); the demo networks
    are small enough that one thread is about as fast as two and steadier on a busy machine.
    ``fidelity``: measure every DropIT run's weight-gradient fidelity (:func:`dropit_cuda.fidelity`,
    with the task's loss) on its first and last training batch; ``fidelity_detail``: print the
    per-layer tables too, not only the summary. ``tune``: a cosine floor; adds a run with the γ per
    layer that :func:`dropit_cuda.tune` picks on each seed's first training batch (None: no such run).
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
    fidelity: bool = True
    fidelity_detail: bool = False
    tune: Optional[float] = None

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
        if self.tune is not None:
            check_min_cosine(self.tune, "tune")
        if self.fidelity_detail and not self.fidelity:
            raise ValueError("fidelity_detail prints the fidelity reports, which fidelity=False turns off")
        return self

    def runs(self) -> list[RunSpec]:
        """Baseline first, then ``strategy`` at each γ, then the contrast run (if not a duplicate),
        then the tuned run (with ``tune``)."""
        specs = [RunSpec()] + [RunSpec(self.strategy, g) for g in self.gammas]
        if self.contrast is not None:
            extra = RunSpec(*self.contrast)
            if extra not in specs:
                specs.append(extra)
        if self.tune is not None:
            specs.append(RunSpec(self.strategy, None, self.tune))
        return specs

    def tune_gammas(self) -> tuple[float, ...]:
        """The candidate γ of the tuned run: :func:`dropit_cuda.tune`'s defaults and ``gammas``.
        With the uniform runs' γ among them, the plan caches no more than any uniform run whose
        every layer meets the floor on the tuning batch (each layer's γ is at least that run's)."""
        return tuple(sorted(set(DEFAULT_TUNE_GAMMAS) | set(self.gammas)))

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

    def inputs_and_targets(self, data: Any, cfg: Any, batch: Any) -> tuple[tuple, Any]:
        """The model's inputs for ``batch`` (what the saved bytes, the fidelity and the tuning are
        measured on too) and the targets :meth:`criterion` compares its output with."""
        raise NotImplementedError

    def criterion(self, output: Any, targets: Any) -> torch.Tensor:
        """The training loss of the model's ``output`` (the fidelity passes measure its gradients)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Any, cfg: Any) -> dict[str, float]:
        """The values of ``metrics`` (called in eval mode, without gradients)."""
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


def convert_run(task: Task, model: nn.Module, cfg: DemoConfig, inputs: tuple, strategy: str,
                gamma: Any) -> nn.Module:
    """``model`` converted (in place) for a DropIT run: ``gamma`` one value or a per-layer spec
    (a :class:`dropit_cuda.Plan`), the run's strategy, the config's chunk and ReLU setting, the
    task's options. ``example_inputs``: the first layer and the ReLU masks are decided now, so the
    bytes measured before training are those of every training step."""
    import dropit_cuda as dc

    return dc.convert(model, gamma=gamma, strategy=strategy, chunk=cfg.chunk, relu_mask=cfg.relu_mask,
                      example_inputs=inputs, **task.convert_options(cfg))


def measure_fidelity(task: Task, model: nn.Module, cfg: DemoConfig, device: torch.device, inputs: tuple,
                     targets: Any) -> FidelityReport:
    """:func:`dropit_cuda.fidelity` of a converted ``model`` on one batch, with the task's loss and
    autocast: the weight gradients that training step computes, against the exact ones."""
    import dropit_cuda as dc

    with task.autocast(cfg, device):
        return dc.fidelity(model, *inputs, loss_fn=functools.partial(task.criterion, targets=targets))


def tune_plan(task: Task, initial: nn.Module, cfg: DemoConfig, device: torch.device, inputs: tuple,
              targets: Any) -> Plan:
    """The tuned run's plan: :func:`dropit_cuda.tune` with floor ``cfg.tune`` over
    :meth:`DemoConfig.tune_gammas`, on a copy of ``initial`` converted with the run's strategy and
    chunk, on one batch (the first of training), with the task's loss and autocast."""
    import dropit_cuda as dc

    # converted at any γ: tune sets every candidate in turn
    model = convert_run(task, copy.deepcopy(initial).train(), cfg, inputs, cfg.strategy, max(cfg.tune_gammas()))
    with task.autocast(cfg, device):
        return dc.tune(model, *inputs, loss_fn=functools.partial(task.criterion, targets=targets),
                       min_cosine=cfg.tune, gammas=cfg.tune_gammas())


def train_run(task: Task, model: nn.Module, data: Any, rounds: list[list[Any]], cfg: DemoConfig,
              device: torch.device, seed: int, label: str = "",
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains ``model`` (in place) on ``rounds``' batches; returns its curves and figures.

    ``torch.manual_seed(seed)`` is set first, so the ``random`` strategy draws the same keys on
    every call with the same seed. The task's metrics are evaluated after every round.

    With ``cfg.fidelity`` and a converted ``model``, :func:`measure_fidelity` runs on the first
    step's batch and on the last step's, each just before that step's forward, so each measures
    the gradient that step trains on; ``result["fidelity"]`` holds both reports (``to_dict()``) and
    their time, which the step times leave out, and a summary is logged after the run (the full
    per-layer tables too with ``cfg.fidelity_detail``). The passes leave training as it is: the
    weights, the random stream and the batch-norm statistics come out bit for bit the same.
    """
    from tqdm.auto import tqdm

    from ..routing import conversion_of
    from .report import fidelity_summary

    torch.manual_seed(seed)
    model.to(device).train()
    total_steps = sum(len(r) for r in rounds)
    measured_steps = (0, total_steps - 1) if cfg.fidelity and conversion_of(model) is not None else ()
    reports: dict[int, FidelityReport] = {}
    fidelity_s = 0.0
    opt, sched = task.optimizer(model, cfg, total_steps)
    curves: dict[str, list[float]] = {"train_loss": [], **{m.key: [] for m in task.metrics}}
    step_times = []
    step = 0
    bar = tqdm(total=total_steps, desc=label, disable=not cfg.progress, leave=True, file=sys.stderr)
    for batches in rounds:
        model.train()
        loss_sum = 0.0
        for batch in batches:
            inputs, targets = task.inputs_and_targets(data, cfg, batch)
            if step in measured_steps:
                t0 = time.perf_counter()
                reports[step] = measure_fidelity(task, model, cfg, device, inputs, targets)
                fidelity_s += time.perf_counter() - t0
            _sync(device)
            t0 = time.perf_counter()
            with task.autocast(cfg, device):
                loss = task.criterion(model(*inputs), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if task.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), task.grad_clip)
            opt.step()
            _sync(device)
            step_times.append(time.perf_counter() - t0)
            sched.step()
            loss_sum += float(loss.detach())
            step += 1
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
    if reports:
        first, last = reports[measured_steps[0]], reports[measured_steps[1]]
        result["fidelity"] = {"steps": list(measured_steps), "first": first.to_dict(), "last": last.to_dict(),
                              "seconds": fidelity_s}
        log(fidelity_summary(label, result["fidelity"]))
        if cfg.fidelity_detail:
            log(f"{label}, step 1 of {total_steps}:\n{first}\n{label}, step {total_steps} of {total_steps}:\n{last}")
    return result


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


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

    from .report import plan_summary, plot_curves

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
    for s in specs:
        if s.tuned:
            per_run[s.key].update(min_cosine=s.min_cosine, tune_gammas=list(cfg.tune_gammas()))
    dropit_names: list[str] = []
    tune_s = 0.0
    t_start = time.perf_counter()
    for seed in cfg.seed_list():
        torch.manual_seed(seed)
        initial = task.build_model(cfg).to(device)  # one initialisation per seed, shared by every run
        rounds = task.schedule(data, cfg, seed)
        probe, probe_targets = task.inputs_and_targets(data, cfg, rounds[0][0])
        if not dropit_names:
            # the layers DropIT converts; the baseline's bytes are counted over the same (dense) layers
            with task.autocast(cfg, device):
                dropit_names = dropit_layer_names(dc.convert(
                    copy.deepcopy(initial), chunk=cfg.chunk, example_inputs=probe, **task.convert_options(cfg)))
        plan = None
        if cfg.tune is not None:
            t0 = time.perf_counter()
            plan = tune_plan(task, initial, cfg, device, probe, probe_targets)
            tune_s += time.perf_counter() - t0
            log(plan_summary(f"{task.name}: tuned plan, seed {seed}", plan))
            if cfg.fidelity_detail:
                log(str(plan))
        for spec in specs:
            model = copy.deepcopy(initial)
            if spec.strategy is not None:
                convert_run(task, model, cfg, probe, spec.strategy, plan if spec.tuned else spec.gamma)
            entry = per_run[spec.key]
            label = f"{task.name}: {spec.name} seed {seed}"
            result = {}
            if spec.tuned:  # each seed has its own plan, so its own bytes
                with task.autocast(cfg, device):
                    result["saved_bytes"], result["layer_bytes"] = saved_bytes(model, probe, dropit_names)
                result["plan"] = plan.to_dict()
            elif "saved_bytes" not in entry:  # shapes are the same for every seed: measure once
                with task.autocast(cfg, device):
                    entry["saved_bytes"], entry["layer_bytes"] = saved_bytes(model, probe, dropit_names)
            result.update(train_run(task, model, data, rounds, cfg, device, seed, label, log))
            entry["seeds"][str(seed)] = result
    elapsed = time.perf_counter() - t_start

    fidelity_s = 0.0
    for entry in per_run.values():
        seeds = list(entry["seeds"].values())
        for key in ["train_loss", *(m.key for m in task.metrics)]:
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std([r[f"final_{key}"] for r in seeds])
        entry["step_ms"] = statistics.median(r["step_ms"] for r in seeds)
        if "saved_bytes" not in entry:  # the tuned run: the mean over the seeds' plans
            for key in ("saved_bytes", "layer_bytes"):
                entry[key] = round(statistics.fmean(r[key] for r in seeds))
        measured = [r["fidelity"] for r in seeds if "fidelity" in r]
        if measured:
            for when in ("first", "last"):
                entry[f"cosine_{when}_mean"] = _mean_or_none([f[when]["cosine"] for f in measured])
            fidelity_s += sum(f["seconds"] for f in measured)
    results = {
        "task": task.name,
        "config": {**asdict(cfg), "device": str(device)},
        "dataset": {k: v for k, v in dataset.items() if k != "log"},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "elapsed_s": elapsed,
        "fidelity_s": fidelity_s,
        "tune_s": tune_s,
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
