"""``dropit-cuda demo``: train small networks with and without DropIT and compare.

Two tasks, each trained from the same initial weights and on the same batches once as a baseline
and once per DropIT setting (``parallel_min_k`` at each ``--gammas`` value and, for contrast,
``random`` at γ = 0.8):

- ``digits`` (:mod:`.digits`): a small ResNet on scikit-learn's bundled handwritten digits;
- ``text`` (:mod:`.text`): a small byte-level GPT trained from scratch on the Python standard
  library's own source files.

``--task all`` (the default) runs both. Every DropIT run measures its weight gradients against the
exact ones (:func:`dropit_cuda.fidelity`, with the task's loss) at its first and its last step and
prints a one-line summary (``--fidelity-detail``: the per-layer tables; ``--no-fidelity``: no
passes). ``--tune MIN_COSINE`` adds a run with a γ per layer that :func:`dropit_cuda.tune` picks
on each seed's first training batch. Each task prints a table (its metrics, the final training
loss, the bytes saved for backward by the whole model and by the converted layers, the gradient
cosine at the first and last step, time per step) and writes ``curves.png`` and ``results.json``
to ``--out``/<task>. ``--check`` runs the tasks'
acceptance tests (DropIT γ = 0.8 against the baseline over 3 seeds); the exit status is 1 if one
fails. The demo needs the ``[demo]`` extra (scikit-learn, matplotlib, tqdm); the library does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .digits import DigitsTask
from .runner import STRATEGIES, DemoConfig, Task, resolve_device, run_task
from .text import AMP_MODES, TextTask

TASKS: dict[str, Task] = {"digits": DigitsTask(), "text": TextTask()}

#: import name -> pip name of the [demo] extra's packages; every task needs these two
EXTRA_PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}
COMMON_NEEDS = ("matplotlib", "tqdm")

# flag destinations that belong to one task's config only (the parser rejects them for the others)
_TASK_FLAGS = {"epochs": "--epochs", "steps": "--steps", "eval_every": "--eval-every", "amp": "--amp"}


def missing_extras(tasks: Sequence[Task]) -> list[str]:
    """pip names of the [demo] extra's packages that ``tasks`` need and that cannot be imported."""
    needed = dict.fromkeys(COMMON_NEEDS + tuple(n for t in tasks for n in t.needs))
    missing = []
    for module in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(EXTRA_PACKAGES[module])
    return missing


def config_for(task: Task, overrides: dict[str, Any], check: bool = False) -> DemoConfig:
    """``task``'s config: its defaults, the ``overrides`` that are its fields, and ``check`` mode
    (baseline and ``parallel_min_k`` at the check's γ, over the check's seeds unless overridden)."""
    names = {f.name for f in dataclasses.fields(task.config_class)}
    cfg = task.config_class(**{k: v for k, v in overrides.items() if k in names})
    cfg.out = str(Path(cfg.out) / task.name)
    if check:
        cfg.check = True
        cfg.gammas, cfg.strategy, cfg.contrast = (task.check.gamma,), "parallel_min_k", None
        if "seeds" not in overrides:
            cfg.seeds = task.check.seeds
    return cfg


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


def _min_cosine(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tune: a cosine floor in [-1, 1] expected, got {text!r}") from None
    if not -1.0 <= value <= 1.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"--tune: the cosine floor must be in [-1, 1], got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {value}")
    return value


def _per_task(field: str) -> str:
    """``(default: digits X, text Y)`` for a field both configs have."""
    values = [f"{name} {getattr(task.config_class(), field)}" for name, task in TASKS.items()]
    return f"(default: {', '.join(values)})"


def build_parser(prog: str = "python -m dropit_cuda demo") -> argparse.ArgumentParser:
    """The flags; those left out are absent from the parsed namespace (but ``task`` and
    ``check``) and take each task's default (see :func:`flag_overrides`)."""
    d = DemoConfig()
    digits, text = TASKS["digits"].config_class(), TASKS["text"].config_class()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a small ResNet on scikit-learn's digits and a small GPT on the Python standard "
                    "library's source, baseline against DropIT. Flags given apply to every task run.",
        argument_default=argparse.SUPPRESS,  # a flag left out is absent, so `--contrast none` is seen
    )
    p.add_argument("--task", choices=(*TASKS, "all"), default="all", help="which task to run (default: all)")
    p.add_argument("--gammas", type=_gammas, help="comma-separated dropping rates for --strategy "
                   "(default: digits 0.5,0.8,0.9, text 0.8,0.9)")
    p.add_argument("--strategy", choices=STRATEGIES,
                   help=f"DropIT strategy swept over --gammas (default: {d.strategy})")
    p.add_argument("--contrast", type=_contrast, metavar="STRATEGY:GAMMA",
                   help="one more run for contrast, or 'none' (default: random:0.8)")
    p.add_argument("--seeds", type=_positive,
                   help="number of seeds: runs use --seed, --seed+1, ...; figures are averaged "
                        f"(default: {d.seeds}, or {TASKS['digits'].check.seeds} with --check)")
    p.add_argument("--seed", type=int, help="first seed; also fixes the digits train/test split (default: 0)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto: the GPU when torch sees one)")
    p.add_argument("--out", help=f"folder for <task>/results.json and <task>/curves.png (default: ./{d.out})")
    p.add_argument("--batch-size", type=_positive, help=_per_task("batch_size"))
    p.add_argument("--lr", type=float, help=f"peak learning rate {_per_task('lr')}")
    p.add_argument("--chunk", type=_positive,
                   help=f"DropIT chunk size D (default: {d.chunk}; see the README for why not 16384)")
    p.add_argument("--threads", type=_positive,
                   help=f"CPU threads for torch (default: {d.threads}: these networks gain little from more)")
    p.add_argument("--no-relu-mask", dest="relu_mask", action="store_false",
                   help="keep nn.ReLU in the DropIT runs (by default convert() swaps in MaskedReLU, "
                        "which caches 1 bit per element, so that packing a conv's input frees it)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--tune", type=_min_cosine, metavar="MIN_COSINE",
                   help="add a run whose γ per layer is dropit_cuda.tune's plan for this weight-gradient cosine "
                        "floor on each seed's first training batch (--strategy, --chunk; candidates: "
                        "0.5,0.6,0.7,0.8,0.9,0.95 and --gammas)")
    p.add_argument("--no-fidelity", dest="fidelity", action="store_false",
                   help="skip the fidelity passes (by default every DropIT run measures its weight gradients "
                        "against the exact ones at its first and last step: two extra forward+backward passes)")
    p.add_argument("--fidelity-detail", dest="fidelity_detail", action="store_true",
                   help="print the per-layer fidelity tables of every DropIT run (and the tuned plans), "
                        "not only the one-line summaries")
    p.add_argument("--check", action="store_true", default=False,
                   help="acceptance mode: baseline and parallel_min_k γ=0.8 only, 3 seeds unless --seeds says "
                        "otherwise; exit status 1 if DropIT is worse than the baseline by more than the "
                        "tolerance (digits: 1.5 points of test accuracy; text: 3%% of validation loss)")
    g = p.add_argument_group("digits task")
    g.add_argument("--epochs", type=_positive, help=f"epochs per run (default: {digits.epochs})")
    g = p.add_argument_group("text task")
    g.add_argument("--steps", type=_positive, help=f"training steps per run (default: {text.steps})")
    g.add_argument("--eval-every", type=_positive,
                   help=f"steps between validation passes; divides --steps (default: {text.eval_every})")
    g.add_argument("--amp", choices=AMP_MODES, help="'bf16': forward passes under torch.autocast in bfloat16 "
                   f"(default: {text.amp})")
    return p


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the command line sets (``None`` included: ``--contrast none``)."""
    return {k: v for k, v in vars(args).items() if k not in ("task", "check")}


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m dropit_cuda demo") -> int:
    """Runs the demo from command-line flags; returns the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    tasks = list(TASKS.values()) if args.task == "all" else [TASKS[args.task]]
    overrides = flag_overrides(args)
    for name, flag in _TASK_FLAGS.items():
        owners = [t.name for t in TASKS.values() if name in {f.name for f in dataclasses.fields(t.config_class)}]
        if name in overrides and not any(t.name in owners for t in tasks):
            parser.error(f"{flag} applies to the {' and '.join(owners)} task only")
    if overrides.get("fidelity_detail") and overrides.get("fidelity") is False:
        parser.error("--fidelity-detail prints the fidelity reports, which --no-fidelity turns off")
    try:
        configs = [config_for(task, overrides, args.check).validate() for task in tasks]
        for cfg in configs:
            resolve_device(cfg.device)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    missing = missing_extras(tasks)
    if missing:
        print(f"{prog}: the demo needs the optional [demo] dependencies; missing: {', '.join(missing)}.\n"
              f"Install the package with its demo extra (python -m pip install \".[demo]\" in the source "
              f"folder) or the packages themselves: python -m pip install {' '.join(missing)}", file=sys.stderr)
        return 2
    from .report import format_table

    status = 0
    for task, cfg in zip(tasks, configs):
        results = run_task(task, cfg)
        out = Path(cfg.out)
        print(f"\n{task.name}:\n{format_table(results)}")
        # what the extra passes cost, where there were any
        extras = "".join(f"; {what} {results[key]:.1f} s" for what, key in
                         (("fidelity passes", "fidelity_s"), ("tuning", "tune_s")) if results[key])
        print(f"\ncurves: {out / 'curves.png'}   figures: {out / 'results.json'}   "
              f"({results['elapsed_s']:.0f} s{extras})")
        if cfg.check:
            c = results["check"]
            verdict = "PASS" if c["passed"] else "FAIL"
            d = task.metrics[0].decimals
            print(f"check {verdict} ({task.name}): {c['metric']} baseline {c['baseline']:.{d}f} vs {c['run']} "
                  f"{c['dropit']:.{d}f} over {c['seeds']} seeds: gap {c['gap']:+.2f} {c['unit']} "
                  f"(positive: DropIT worse; tolerance {c['tolerance']:g} {c['unit']})")
            status = status or (0 if c["passed"] else 1)
    return status
