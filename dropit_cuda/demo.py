"""Train a small ResNet on scikit-learn's handwritten digits with and without DropIT.

``python -m dropit_cuda demo`` (or the ``dropit-cuda demo`` console script) trains the same
network, from the same initial weights and on the same batches, once as a baseline and once per
DropIT setting: ``parallel_min_k`` at every ``--gammas`` value and, for contrast, ``random`` at
γ = 0.8. It prints a table (test accuracy, final training loss, bytes saved for backward by the
whole model and by its converted layers, time per step) and writes loss/accuracy curves (PNG)
and every figure (JSON) to ``--out``.

The data is ``sklearn.datasets.load_digits`` (1797 8x8 grey images bundled with scikit-learn),
so nothing is downloaded. ``--check`` runs the acceptance test of the demo: the mean test
accuracy of DropIT γ = 0.8 ``parallel_min_k`` over 3 seeds must be within 1.5 points of the
baseline's; the exit status says whether it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .strategies import STRATEGIES as _STRATEGIES

STRATEGIES = tuple(_STRATEGIES)

#: The demo's chunk size. The paper's D = 16384 suits activations of millions of elements; here a
#: conv input holds 1024-2048 elements per image, so 16384 would put 8-16 images in one chunk and
#: split a batch into a handful of chunks (a handful of thread blocks on a GPU). 1024 keeps every
#: conv chunk inside one image (each image keeps its own top 1-γ) and gives each batch 64-128
#: chunks. The bytes cached do not depend on D (values plus one bit per element either way).
DEFAULT_CHUNK = 1024
DEFAULT_GAMMAS = (0.5, 0.8, 0.9)
DEFAULT_CONTRAST = "random:0.8"
CHECK_GAMMA = 0.8
CHECK_SEEDS = 3
CHECK_TOLERANCE = 1.5  # accuracy points


# --------------------------------------------------------------------------------------- data


@dataclass
class Digits:
    """The digits split into train and test tensors, standardised with train statistics."""

    x_train: torch.Tensor  # (N, 1, 8, 8) float32
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device) -> "Digits":
        return Digits(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """scikit-learn's digits, split (stratified) by ``seed``; pixels standardised by the train set."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=test_fraction, random_state=seed, stratify=data.target
    )
    idx_train, idx_test = torch.tensor(idx_train), torch.tensor(idx_test)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return Digits((x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test])


def batch_orders(seed: int, n: int, epochs: int, batch_size: int) -> list[list[torch.Tensor]]:
    """Per epoch, the index batches of a seeded shuffle of ``n`` samples (last partial batch dropped).

    Every run of a seed walks these same batches, so runs differ only in what DropIT changes.
    """
    gen = torch.Generator().manual_seed(seed)
    orders = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        steps = n // batch_size
        orders.append([perm[i * batch_size : (i + 1) * batch_size] for i in range(steps)])
    return orders


# -------------------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small ResNet for 8x8 images: a 3x3 stem, two stages of residual blocks, a linear head.

    ``width`` channels at 8x8, ``2*width`` at 4x4; global average pooling; ``num_classes`` logits.
    """

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------- runs


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
    """Everything a demo invocation depends on (``main`` builds it from the flags).

    ``relu_mask`` is passed to :func:`dropit_cuda.convert`: the DropIT runs also swap ``nn.ReLU``
    for ``MaskedReLU``, so that a conv's input is held by the conv alone and packing it frees it.
    ``threads``: CPU threads torch may use during the demo (``None``: leave torch's setting). One
    is the default: the network is so small that its kernels gain little from more threads, and a
    single thread keeps the timings steady on a busy machine.
    """

    gammas: tuple[float, ...] = DEFAULT_GAMMAS
    strategy: str = "parallel_min_k"
    contrast: Optional[tuple[str, float]] = ("random", 0.8)
    epochs: int = 10
    seeds: int = 1
    seed: int = 0
    device: str = "auto"
    out: str = "demo-out"
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    width: int = 32
    chunk: int = DEFAULT_CHUNK
    threads: Optional[int] = 1
    relu_mask: bool = True
    progress: bool = True
    check: bool = False

    def validate(self) -> "DemoConfig":
        """Raises ValueError/TypeError naming the field that is out of range; returns ``self``."""
        from .ops import check_chunk, check_gamma

        for g in self.gammas:
            check_gamma(g, "gammas")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.contrast is not None:
            if self.contrast[0] not in STRATEGIES:
                raise ValueError(f"contrast strategy must be one of {STRATEGIES}, got {self.contrast[0]!r}")
            check_gamma(self.contrast[1], "contrast gamma")
        check_chunk(self.chunk)
        for name in ("epochs", "seeds", "batch_size", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.batch_size > 1000:
            raise ValueError(f"batch_size must be at most 1000 (the training set has ~1350 images), got {self.batch_size}")
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


def converted_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers DropIT covers in a converted ``model`` whose first layer is decided
    (after a training forward, or converted with ``example_inputs``)."""
    from .convert import report

    return [r.name for r in report(model).layers if r.gamma is not None]


def saved_bytes(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> tuple[int, int]:
    """Bytes saved for backward by one training forward of ``model`` on ``x``: in all, and by ``layers``.

    From :func:`dropit_cuda.memory.measure`: ``total_bytes`` counts every storage once (a conv
    input that the preceding ReLU saves too counts once); a layer's figure is what it saved itself
    (its dense input, or its packed cache), less copies of its weights. Measured on a copy, so
    BatchNorm's running statistics of ``model`` are left alone.
    """
    from . import memory

    probe = copy.deepcopy(model).train()
    report = memory.measure(probe, x)
    wanted = set(layers)
    by_layers = sum(m.saved_bytes - m.weight_copy_bytes for m in report.modules if m.name in wanted)
    return int(report.total_bytes), int(by_layers)


def train_run(
    model: nn.Module,
    data: Digits,
    orders: list[list[torch.Tensor]],
    cfg: DemoConfig,
    device: torch.device,
    seed: int,
    label: str = "",
) -> dict[str, Any]:
    """Trains ``model`` (in place) on ``orders``' batches; returns its curves and figures.

    SGD with momentum 0.9, weight decay, and a cosine learning rate over all steps; the test set
    is evaluated after every epoch. ``torch.manual_seed(seed)`` is set first, so the ``random``
    strategy draws the same keys on every call with the same seed.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True
    )
    total_steps = sum(len(epoch) for epoch in orders)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    x_train, y_train = data.x_train, data.y_train
    train_loss, test_acc, step_times = [], [], []
    bar = tqdm(total=total_steps, desc=label, disable=not cfg.progress, leave=True, file=sys.stderr)
    for epoch in orders:
        model.train()
        loss_sum, count = 0.0, 0
        for idx in epoch:
            idx = idx.to(device)
            xb, yb = x_train[idx], y_train[idx]
            _sync(device)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            step_times.append(time.perf_counter() - t0)
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            count += len(idx)
            bar.update(1)
        train_loss.append(loss_sum / count)
        test_acc.append(evaluate(model, data.x_test, data.y_test))
        bar.set_postfix(loss=f"{train_loss[-1]:.4f}", acc=f"{test_acc[-1]:.2f}%")
    bar.close()
    warm = step_times[min(len(step_times) - 1, 5) :]  # the first steps include one-time set-up
    return {
        "train_loss": train_loss,
        "test_acc": test_acc,
        "final_train_loss": train_loss[-1],
        "final_test_acc": test_acc[-1],
        "step_ms": 1000.0 * statistics.median(warm),
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(y)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains every run of ``cfg`` for every seed; writes the JSON and PNG; returns the results."""

    cfg.validate()
    device = resolve_device(cfg.device)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg, device, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_demo(cfg: DemoConfig, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    import dropit_cuda as dc

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(cfg.seed).to(device)
    specs = cfg.runs()
    log(
        f"digits: {len(data.y_train)} train / {len(data.y_test)} test images, device {device}, "
        f"{cfg.epochs} epochs x {len(data.y_train) // cfg.batch_size} steps of {cfg.batch_size}, "
        f"seeds {cfg.seed_list()}, chunk {cfg.chunk}, {torch.get_num_threads()} CPU thread(s)"
    )
    per_run: dict[str, dict[str, Any]] = {
        s.key: {"name": s.name, "strategy": s.strategy, "gamma": s.gamma, "seeds": {}} for s in specs
    }
    # the layers DropIT converts; the baseline's bytes are counted over the same (dense) layers
    dropit_names = converted_layer_names(
        dc.convert(DigitsResNet(cfg.width), chunk=cfg.chunk, example_inputs=data.x_train[:2].to(device)))
    t_start = time.perf_counter()
    for seed in cfg.seed_list():
        torch.manual_seed(seed)
        initial = DigitsResNet(cfg.width)  # one initialisation per seed, shared by every run
        orders = batch_orders(seed, len(data.y_train), cfg.epochs, cfg.batch_size)
        probe_x = data.x_train[orders[0][0].to(device)]
        for spec in specs:
            model = copy.deepcopy(initial).to(device)
            if spec.strategy is not None:
                dc.convert(model, gamma=spec.gamma, strategy=spec.strategy, chunk=cfg.chunk,
                           relu_mask=cfg.relu_mask)
            entry = per_run[spec.key]
            if "saved_bytes" not in entry:  # shapes are the same for every seed: measure once
                entry["saved_bytes"], entry["layer_bytes"] = saved_bytes(model, probe_x, dropit_names)
            result = train_run(model, data, orders, cfg, device, seed, f"{spec.name} seed {seed}")
            entry["seeds"][str(seed)] = result
    elapsed = time.perf_counter() - t_start

    for entry in per_run.values():
        seeds = entry["seeds"].values()
        entry["test_acc_mean"], entry["test_acc_std"] = _mean_std([r["final_test_acc"] for r in seeds])
        entry["train_loss_mean"], _ = _mean_std([r["final_train_loss"] for r in seeds])
        entry["step_ms"] = statistics.median(r["step_ms"] for r in seeds)
    results = {
        "config": {**asdict(cfg), "device": str(device)},
        "dataset": {"name": "sklearn digits", "train": len(data.y_train), "test": len(data.y_test)},
        "torch": torch.__version__,
        "elapsed_s": elapsed,
        "dropit_layers": dropit_names,
        "runs": per_run,
    }
    if cfg.check:
        results["check"] = check_result(per_run, cfg)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    n = len(cfg.seed_list())
    seeds_text = "1 seed" if n == 1 else f"mean of {n} seeds, band: min to max"
    plot_curves(per_run, out / "curves.png", title=f"DigitsResNet on sklearn digits ({device}, {seeds_text})")
    return results


def check_result(per_run: dict[str, dict[str, Any]], cfg: DemoConfig) -> dict[str, Any]:
    """The acceptance figure: baseline minus parallel_min_k γ=0.8 mean test accuracy."""
    key = RunSpec("parallel_min_k", CHECK_GAMMA).key
    if key not in per_run:
        raise ValueError(f"check: no {key} run in this configuration")
    gap = per_run["baseline"]["test_acc_mean"] - per_run[key]["test_acc_mean"]
    return {
        "run": key,
        "seeds": cfg.seeds,
        "baseline_acc": per_run["baseline"]["test_acc_mean"],
        "dropit_acc": per_run[key]["test_acc_mean"],
        "gap_points": gap,
        "tolerance_points": CHECK_TOLERANCE,
        "passed": gap <= CHECK_TOLERANCE,
    }


# ------------------------------------------------------------------------------------- output


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(per_run: dict[str, dict[str, Any]]) -> str:
    """The summary table: one row per run, accuracies and losses averaged over seeds."""
    base = per_run.get("baseline", {})
    base_total = base.get("saved_bytes")
    header = ("run", "test acc %", "train loss", "saved (model)", "vs base", "saved (DropIT layers)", "ms/step")
    rows = [header]
    for entry in per_run.values():
        n = len(entry["seeds"])
        acc = f"{entry['test_acc_mean']:.2f}" + (f" ± {entry['test_acc_std']:.2f}" if n > 1 else "")
        total = entry.get("saved_bytes")
        ratio = "-" if not base_total or total is None else f"{100.0 * total / base_total:.0f}%"
        rows.append((
            entry["name"],
            acc,
            f"{entry['train_loss_mean']:.4f}",
            _fmt_bytes(total),
            ratio,
            _fmt_bytes(entry.get("layer_bytes")),
            f"{entry['step_ms']:.1f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_curves(per_run: dict[str, dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss and test accuracy per epoch, one line per run (mean over seeds, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for entry in per_run.values():
        seeds = list(entry["seeds"].values())
        for ax, field_name in ((ax_loss, "train_loss"), (ax_acc, "test_acc")):
            curves = list(zip(*(r[field_name] for r in seeds)))
            epochs = range(1, len(curves) + 1)
            mean = [statistics.fmean(c) for c in curves]
            style = {"color": "black", "linewidth": 2.2} if entry["strategy"] is None else {}
            if entry["strategy"] == "random":
                style = {"linestyle": "--"}
            (line,) = ax.plot(epochs, mean, label=entry["name"], **style)
            if len(seeds) > 1:
                ax.fill_between(epochs, [min(c) for c in curves], [max(c) for c in curves],
                                color=line.get_color(), alpha=0.15)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    accs = [a for e in per_run.values() for r in e["seeds"].values() for a in r["test_acc"]]
    if accs:
        ax_acc.set_ylim(max(min(accs), max(accs) - 6.0) - 0.5, 100.0)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI


def _gammas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gammas: comma-separated floats expected, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--gammas: at least one value expected")
    for g in values:
        if not 0.0 <= g < 1.0:
            raise argparse.ArgumentTypeError(f"--gammas: each γ must be in [0, 1), got {g}")
    return values


def _contrast(text: str) -> Optional[tuple[str, float]]:
    if text.lower() == "none":
        return None
    strategy, sep, gamma = text.partition(":")
    if not sep or strategy not in STRATEGIES:
        raise argparse.ArgumentTypeError(
            f"--contrast: STRATEGY:GAMMA with a strategy in {STRATEGIES}, or 'none'; got {text!r}"
        )
    return strategy, _gammas(gamma)[0]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {value}")
    return value


def build_parser(prog: str = "python -m dropit_cuda demo") -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a small ResNet on scikit-learn's digits, baseline against DropIT.",
    )
    p.add_argument("--gammas", type=_gammas, default=d.gammas,
                   help="comma-separated dropping rates for --strategy (default: 0.5,0.8,0.9)")
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="DropIT strategy swept over --gammas (default: parallel_min_k)")
    p.add_argument("--contrast", type=_contrast, default=d.contrast, metavar="STRATEGY:GAMMA",
                   help=f"one more run for contrast, or 'none' (default: {DEFAULT_CONTRAST})")
    p.add_argument("--epochs", type=_positive, default=d.epochs, help=f"epochs per run (default: {d.epochs})")
    p.add_argument("--seeds", type=_positive, default=None,
                   help="number of seeds: runs use --seed, --seed+1, ...; accuracies are averaged "
                        f"(default: {d.seeds}, or {CHECK_SEEDS} with --check)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="first seed; also fixes the train/test split (default: 0)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--out", default=d.out, help=f"folder for results.json and curves.png (default: ./{d.out})")
    p.add_argument("--batch-size", type=_positive, default=d.batch_size, help=f"(default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak SGD learning rate (default: {d.lr})")
    p.add_argument("--chunk", type=_positive, default=d.chunk,
                   help=f"DropIT chunk size D (default: {d.chunk}; see the docs for why not 16384)")
    p.add_argument("--threads", type=_positive, default=d.threads,
                   help=f"CPU threads for torch during the demo (default: {d.threads}: this network "
                        "is too small to gain from more)")
    p.add_argument("--no-relu-mask", action="store_true",
                   help="keep nn.ReLU in the DropIT runs (by default convert() swaps in MaskedReLU, "
                        "which caches 1 bit per element, so that packing a conv's input frees it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--check", action="store_true",
                   help=f"acceptance mode: baseline and parallel_min_k γ={CHECK_GAMMA} only, {CHECK_SEEDS} "
                        f"seeds unless --seeds says otherwise; exit status 1 if the mean test accuracy "
                        f"gap exceeds {CHECK_TOLERANCE} points")
    return p


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig(
        gammas=args.gammas, strategy=args.strategy, contrast=args.contrast, epochs=args.epochs,
        seeds=args.seeds or (CHECK_SEEDS if args.check else DemoConfig.seeds), seed=args.seed,
        device=args.device, out=args.out, batch_size=args.batch_size, lr=args.lr, chunk=args.chunk,
        threads=args.threads, relu_mask=not args.no_relu_mask, progress=not args.no_progress, check=args.check,
    )
    if cfg.check:
        cfg.gammas, cfg.strategy, cfg.contrast = (CHECK_GAMMA,), "parallel_min_k", None
    return cfg


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m dropit_cuda demo") -> int:
    """Runs the demo from command-line flags; returns the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        cfg.validate()
        resolve_device(cfg.device)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    results = run_demo(cfg)
    print()
    print(format_table(results["runs"]))
    out = Path(cfg.out)
    print(f"\ncurves: {out / 'curves.png'}   figures: {out / 'results.json'}   "
          f"({results['elapsed_s']:.0f} s)")
    if cfg.check:
        c = results["check"]
        verdict = "PASS" if c["passed"] else "FAIL"
        print(f"check {verdict}: baseline {c['baseline_acc']:.2f}% vs {c['run']} {c['dropit_acc']:.2f}% "
              f"over {c['seeds']} seeds: gap {c['gap_points']:+.2f} points (tolerance {CHECK_TOLERANCE})")
        return 0 if c["passed"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
