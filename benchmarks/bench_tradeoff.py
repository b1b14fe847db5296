"""The trade-off a user weighs: memory saved for backward against step time, DropIT against checkpointing.

Two models, in one process: ResNet-18 in the CIFAR shape (``bench_memory.py``'s: torchvision,
3x3 stride-1 stem, no max-pool, 32x32 inputs, 100 classes) and a small byte-level GPT (the demo's ``TinyGPT``: 4 blocks of width 256,
context 128). Variants of each, all from the same initial weights:

- ``baseline``: the plain model;
- ``dropit g=G``: ``dc.convert(model, gamma=G)`` (ResNet: with its default ``relu_mask``; GPT:
  the attention output projections left dense, since the attention keeps that tensor anyway);
- ``checkpoint``: every block (ResNet's 8 BasicBlocks, the GPT's blocks) wrapped in
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``;
- ``checkpoint/2 + dropit g=G``: every other block checkpointed (the 1st, 3rd, ...), DropIT on
  everything else.

Figures per variant:

- saved-for-backward bytes of one training forward pass, counted here with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once, parameters and buffers left
  out; the inputs that checkpointing keeps are saved through the same mechanism and counted). The
  transient memory of a checkpointed block's recomputation in backward is not in this figure;
- step time: wall clock of forward + backward + SGD step, the median over ``--repeats`` steps
  after ``--warmup``; every variant runs with the same ``--threads``. The variants take turns step
  by step, and the time relative to the baseline is the median over turns of the step's time over
  the baseline's step of the same turn, so a change in the machine's load falls on both.

It prints a table, writes JSON (``--json``) and plots bytes against time with the Pareto front
(``--plot``): the variants that no other variant beats on both.

    python benchmarks/bench_tradeoff.py --json bench-results/tradeoff.json --plot bench-results/tradeoff.png
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dropit_cuda as dc  # noqa: E402
from bench_memory import CLASSES, INPUT, build  # noqa: E402  (the same ResNet-18)
from dropit_cuda.demo.text import TinyGPT  # noqa: E402
from zoo import saved_bytes as zoo_saved_bytes  # noqa: E402

MODELS = ("resnet18_cifar", "gpt")
MIB = 1024.0**2


# ------------------------------------------------------------------------------------- models


@dataclass
class Workload:
    """A model, one batch for it, the loss, the names of its blocks and ``dc.convert`` options."""

    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    blocks: list[str]
    convert_options: dict[str, Any]


def resnet18_cifar(batch: int) -> Workload:
    net = build("resnet18_cifar")
    g = torch.Generator().manual_seed(1)
    x = torch.randn((batch,) + INPUT["resnet18_cifar"], generator=g)
    y = torch.randint(0, CLASSES["resnet18_cifar"], (batch,), generator=g)
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    return Workload("resnet18_cifar", net, x, y, F.cross_entropy, blocks, {})


def gpt(batch: int, width: int = 256, layers: int = 4, context: int = 128) -> Workload:
    torch.manual_seed(0)
    net = TinyGPT(width=width, layers=layers, heads=max(1, width // 64), context=context)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (batch, context + 1), generator=g)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    # the attention's output projection reads what scaled_dot_product_attention keeps for its own
    # backward: packing it would add a cache and free nothing
    return Workload("gpt", net, tokens[:, :-1], tokens[:, 1:], loss, [f"blocks.{i}" for i in range(layers)],
                    {"exclude": "blocks.*.proj"})


class Checkpointed(nn.Module):
    """``block`` run under non-reentrant activation checkpointing."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> Any:
        return checkpoint(self.block, *args, use_reentrant=False)


def with_checkpoints(model: nn.Module, names: list[str]) -> nn.Module:
    """``model`` with the submodules called ``names`` wrapped in :class:`Checkpointed` (in place)."""
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, Checkpointed(owner.get_submodule(leaf)))
    return model


def variants(work: Workload, gammas: list[float], combo_gamma: float) -> list[tuple[str, nn.Module]]:
    """(label, model) of every variant, each its own copy of the initial weights."""
    # example_inputs: the first layer and the ReLU masks are decided before anything is measured
    options = {**work.convert_options, "example_inputs": work.inputs}
    out = [("baseline", copy.deepcopy(work.model))]
    for g in gammas:
        out.append((f"dropit g={g:g}", dc.convert(copy.deepcopy(work.model), gamma=g, **options)))
    out.append(("checkpoint", with_checkpoints(copy.deepcopy(work.model), work.blocks)))
    every_other = work.blocks[::2]
    combo = dc.convert(copy.deepcopy(work.model), gamma=combo_gamma, **_excluding(options, every_other))
    out.append((f"checkpoint/2 + dropit g={combo_gamma:g}", with_checkpoints(combo, every_other)))
    return out


def _excluding(options: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``convert`` options that also leave the modules ``names`` (and what is inside them) alone."""
    exclude = options.get("exclude", [])
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    return {**options, "exclude": exclude + names}


# ------------------------------------------------------------------------------------ figures


def saved_bytes(model: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes of the unique storages one training forward of ``model`` leaves saved for backward
    (parameters and buffers left out): ``zoo.saved_bytes``, the count ``bench_coverage`` uses."""
    return zoo_saved_bytes(model.train(), inputs)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, work: Workload) -> None:
    opt.zero_grad(set_to_none=True)
    work.loss(model(work.inputs), work.targets).backward()
    opt.step()


def step_times(models: list[nn.Module], work: Workload, warmup: int, repeats: int) -> list[list[float]]:
    """Wall-clock seconds of each model's training steps; the models take turns step by step."""
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in models]
    for m in models:
        m.train()
    for _ in range(warmup):
        for m, opt in zip(models, opts):
            train_step(m, opt, work)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, (m, opt) in enumerate(zip(models, opts)):
            t0 = time.perf_counter()
            train_step(m, opt, work)
            times[i].append(time.perf_counter() - t0)
    return times


def pareto(rows: list[dict[str, Any]]) -> None:
    """Marks ``row["pareto"]``: no other row of the same model is at least as fast (relative to
    the baseline) and as small, and better on one of the two."""
    for r in rows:
        r["pareto"] = not any(
            o is not r and o["model"] == r["model"]
            and o["time_vs_baseline"] <= r["time_vs_baseline"] and o["saved_bytes"] <= r["saved_bytes"]
            and (o["time_vs_baseline"] < r["time_vs_baseline"] or o["saved_bytes"] < r["saved_bytes"])
            for o in rows
        )


def measure(work: Workload, args: argparse.Namespace) -> list[dict[str, Any]]:
    todo = variants(work, args.gammas, args.combo_gamma)
    rows = [{"model": work.name, "variant": label, "batch": int(work.inputs.shape[0]),
             "saved_bytes": saved_bytes(model, work.inputs)} for label, model in todo]
    times = step_times([m for _, m in todo], work, args.warmup, args.repeats)
    for row, samples in zip(rows, times):
        row["step_ms"] = 1000.0 * statistics.median(samples)
        row["step_ms_samples"] = [1000.0 * s for s in samples]
        row["saved_vs_baseline"] = row["saved_bytes"] / rows[0]["saved_bytes"]
        # against the baseline's step of the same turn: a change of load between turns cancels
        row["time_vs_baseline"] = statistics.median(t / b for t, b in zip(samples, times[0]))
    return rows


# ------------------------------------------------------------------------------------- output


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    head = ["model", "variant", "batch", "saved MiB", "vs baseline", "step ms", "time vs baseline", "Pareto"]
    body = [[r["model"], r["variant"], str(r["batch"]), f"{r['saved_bytes'] / MIB:.1f}",
             f"{100 * (r['saved_vs_baseline'] - 1):+.1f}%", f"{r['step_ms']:.1f}",
             f"{100 * (r['time_vs_baseline'] - 1):+.1f}%", "yes" if r["pareto"] else ""] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Saved bytes against step time, relative to the baseline, one panel per model; the Pareto
    front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == name]
        for r in mine:
            color = "black" if r["variant"] == "baseline" else (
                "C1" if r["variant"] == "checkpoint" else "C2" if "+" in r["variant"] else "C0")
            ax.scatter(r["time_vs_baseline"], r["saved_vs_baseline"], color=color, zorder=3)
            ax.annotate(r["variant"], (r["time_vs_baseline"], r["saved_vs_baseline"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        front = sorted((r["time_vs_baseline"], r["saved_vs_baseline"]) for r in mine if r["pareto"])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", linestyle="--",
                label="Pareto front")
        ax.set(title=f"{name}, batch {mine[0]['batch']}", xlabel="step time / baseline's",
               ylabel="saved for backward / baseline's")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--gammas", nargs="+", type=float, default=[0.5, 0.8, 0.9])
    p.add_argument("--combo-gamma", type=float, default=0.9, help="γ of the checkpoint/2 + DropIT variant")
    p.add_argument("--resnet-batch", type=int, default=32)
    p.add_argument("--gpt-batch", type=int, default=8)
    p.add_argument("--gpt-width", type=int, default=256)
    p.add_argument("--gpt-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, the same for every variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = p.parse_args(argv)
    for g in [*args.gammas, args.combo_gamma]:
        if not 0.0 <= g < 1.0:
            p.error(f"--gammas/--combo-gamma: {g} is not in [0, 1)")
    for name in ("resnet_batch", "gpt_batch", "gpt_width", "gpt_layers", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    print(f"# bench_tradeoff {started} torch={torch.__version__} threads={args.threads} "
          f"load={load_before[0]:.2f} warmup={args.warmup} repeats={args.repeats}", flush=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    builders = {"resnet18_cifar": lambda: resnet18_cifar(args.resnet_batch),
                "gpt": lambda: gpt(args.gpt_batch, args.gpt_width, args.gpt_layers)}
    for name in args.models:
        rows += measure(builders[name](), args)
    pareto(rows)
    load_after = os.getloadavg()
    print(table(rows))
    print(f"# done in {time.perf_counter() - t0:.0f} s; load {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.markdown:
        print()
        print(table(rows, markdown=True))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = {"date": started, "argv": sys.argv[1:], "torch": torch.__version__, "threads": args.threads,
                "host": platform.node(), "cpu_count": os.cpu_count(), "load_before": load_before,
                "load_after": load_after, "extension": dc.extension_info()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"# wrote {args.json}")
    if args.plot:
        plot(rows, args.plot)
        print(f"# wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
