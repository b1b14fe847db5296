"""Saved-for-backward memory (and, on CUDA, peak memory and step time) of DropIT on two models.

Models: ResNet-18 in the CIFAR shape (3x3 stride-1 stem, no max-pool, 32x32 inputs, 100 classes)
and ViT-B/16 (224x224). Variants: the plain model, and ``dc.convert`` at each gamma (plus
``relu_mask=True`` when ``dc.convert`` accepts it). Precisions: fp32 and bf16 autocast.

Figures, per (model, precision, variant):
- saved-for-backward bytes of one forward pass, from ``dc.memory.measure`` (any device); they grow
  linearly with the batch, so reduced batches give the same ratios (autocast's weight copies are
  the exception: they do not depend on the batch, so the table also shows the activations alone);
- on CUDA: peak allocated memory of a training step and the median time of a training step
  (forward, backward, SGD step), warm-up steps excluded.

Examples::

    python benchmarks/bench_memory.py --quick                       # CPU, a few minutes
    python benchmarks/bench_memory.py --device cuda --json bench-results/memory.json --plot bench-results/memory.png
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dropit_cuda as dc  # noqa: E402

MODELS = ("resnet18_cifar", "vit_b_16")
FULL_BATCH = {"resnet18_cifar": 128, "vit_b_16": 64}
QUICK_BATCH = {"resnet18_cifar": 16, "vit_b_16": 2}
INPUT = {"resnet18_cifar": (3, 32, 32), "vit_b_16": (3, 224, 224)}
CLASSES = {"resnet18_cifar": 100, "vit_b_16": 1000}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def build(name: str) -> nn.Module:
    """A freshly initialised model (deterministic: seeded)."""
    import torchvision

    torch.manual_seed(0)
    if name == "resnet18_cifar":
        net = torchvision.models.resnet18(num_classes=CLASSES[name])
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        return net
    if name == "vit_b_16":
        return torchvision.models.vit_b_16()
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def convert_supports(option: str) -> bool:
    return hasattr(dc, "convert") and option in inspect.signature(dc.convert).parameters


def variants(gammas: list[float]) -> list[tuple[str, Optional[float], dict]]:
    """(label, gamma, convert kwargs); gamma None is the plain model."""
    out: list[tuple[str, Optional[float], dict]] = [("baseline", None, {})]
    if not hasattr(dc, "convert"):
        return out
    # relu_mask defaults to on where convert has it: these rows turn it off to show DropIT alone
    plain = {"relu_mask": False} if convert_supports("relu_mask") else {}
    for g in gammas:
        out.append((f"dropit g={g}", g, plain))
    if convert_supports("relu_mask"):
        for g in gammas:
            out.append((f"dropit g={g} +relu_mask", g, {"relu_mask": True}))
    return out


def make_variant(base: nn.Module, gamma: Optional[float], kwargs: dict) -> nn.Module:
    model = copy.deepcopy(base)
    if gamma is not None:
        model = dc.convert(model, gamma=gamma, **kwargs)
    return model.train()


def autocast_ctx(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def measure_saved(model: nn.Module, x: torch.Tensor, dtype: Optional[torch.dtype]) -> dc.memory.MemoryReport:
    with autocast_ctx(x.device, dtype):
        return dc.memory.measure(model, x)


def train_step_figures(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: Optional[torch.dtype],
                       warmup: int, steps: int) -> dict[str, float]:
    """Peak allocated memory of one training step and the median step time (CUDA only)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(x.device, dtype):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del opt
    return {"peak_bytes": peak, "peak_over_resting_bytes": peak - base, "step_ms": statistics.median(times)}


def measure_variant(args: argparse.Namespace, name: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    dname: str, label: str, gamma: Optional[float], kwargs: dict) -> dict[str, Any]:
    """One row: saved bytes (and on CUDA the training-step figures) of one variant."""
    dtype = DTYPES[dname]
    model = make_variant(base, gamma, kwargs)
    t0 = time.perf_counter()
    rep = measure_saved(model, x, dtype)
    row: dict[str, Any] = {
        "model": name, "dtype": dname, "variant": label, "gamma": gamma,
        "options": kwargs, "batch": x.shape[0], "device": str(x.device),
        "saved_bytes": rep.total_bytes,
        "weight_copy_bytes": rep.weight_copy_bytes,
        "activation_bytes": rep.total_bytes - rep.weight_copy_bytes,
        "layer_freeable_bytes": rep.layer_freeable_bytes,
        "dropit_bytes": rep.dropit_bytes,
        "by_type": {k: v.to_dict() for k, v in rep.by_type.items()},
        "measure_s": round(time.perf_counter() - t0, 3),
    }
    if args.verbose:
        print(rep, flush=True)
    if x.device.type == "cuda" and not args.no_train:
        row.update(train_step_figures(model, x, y, dtype, args.warmup, args.steps))
    return row


def run(args: argparse.Namespace, errors: list[str]) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    rows: list[dict[str, Any]] = []
    for name in args.models:
        batch = args.batch or (QUICK_BATCH if args.quick else FULL_BATCH)[name]
        base = build(name).to(device)
        g = torch.Generator().manual_seed(1)
        x = torch.randn((batch,) + INPUT[name], generator=g).to(device)
        y = torch.randint(0, CLASSES[name], (batch,), generator=g).to(device)
        todo = variants(args.gammas)
        if not any(isinstance(m, nn.ReLU) for m in base.modules()):
            todo = [v for v in todo if not v[2].get("relu_mask")]  # the same rows again
        for dname in args.dtypes:
            baseline: Optional[dict[str, Any]] = None
            for label, gamma, kwargs in todo:
                try:
                    row = measure_variant(args, name, base, x, y, dname, label, gamma, kwargs)
                except Exception as e:  # keep going: one failing variant should not hide the rest
                    msg = f"{name} {dname} {label}: {type(e).__name__}: {e}"
                    print(f"# FAILED {msg}", flush=True)
                    errors.append(msg)
                    if on_cuda:
                        torch.cuda.empty_cache()
                    continue
                if gamma is None:
                    baseline = row
                for key in ("saved_bytes", "activation_bytes", "peak_bytes", "step_ms"):
                    if baseline is not None and key in row and baseline.get(key):
                        row[f"{key}_vs_baseline"] = row[key] / baseline[key]
                rows.append(row)
                print(format_row(row), flush=True)
                if on_cuda:
                    torch.cuda.empty_cache()
        del base
    return rows


HEADER = (f"{'model':<15} {'prec':<5} {'variant':<24} {'batch':>5} {'saved MiB':>10} {'vs base':>8}"
          f" {'act. MiB':>9} {'vs base':>8} {'freeable':>9} {'peak MiB':>9} {'vs base':>8}"
          f" {'step ms':>8} {'vs base':>8}")


def format_row(r: dict[str, Any]) -> str:
    mib = 1024.0**2

    def ratio(key: str) -> str:
        v = r.get(f"{key}_vs_baseline")
        return f"{100 * (v - 1):+7.1f}%" if v is not None else f"{'-':>8}"

    act = r["activation_bytes"]
    free = 100.0 * r["layer_freeable_bytes"] / act if act else 0.0
    peak = f"{r['peak_bytes'] / mib:9.1f}" if "peak_bytes" in r else f"{'-':>9}"
    step = f"{r['step_ms']:8.2f}" if "step_ms" in r else f"{'-':>8}"
    return (f"{r['model']:<15} {r['dtype']:<5} {r['variant']:<24} {r['batch']:>5}"
            f" {r['saved_bytes'] / mib:10.2f} {ratio('saved_bytes')}"
            f" {r['activation_bytes'] / mib:9.2f} {ratio('activation_bytes')} {free:8.1f}%"
            f" {peak} {ratio('peak_bytes')} {step} {ratio('step_ms')}")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (per-sample figures, so batches of any size compare)."""
    mib = 1024.0**2
    cuda = any("step_ms" in r for r in rows)
    head = ["model", "precision", "variant", "batch", "saved MiB", "vs baseline",
            "activations MiB/sample", "vs baseline", "held by conv/linear alone"]
    if cuda:
        head += ["peak MiB", "vs baseline", "step ms", "vs baseline"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(r: dict[str, Any], key: str) -> str:
        v = r.get(f"{key}_vs_baseline")
        return "" if v is None or r["gamma"] is None else f"{100 * (v - 1):+.1f}%"

    for r in rows:
        act = r["activation_bytes"]
        cells = [r["model"], r["dtype"], r["variant"], str(r["batch"]), f"{r['saved_bytes'] / mib:.1f}",
                 pct(r, "saved_bytes"), f"{act / r['batch'] / mib:.2f}", pct(r, "activation_bytes"),
                 f"{100.0 * r['layer_freeable_bytes'] / act:.1f}%" if act else "-"]
        if cuda:
            cells += [f"{r['peak_bytes'] / mib:.0f}" if "peak_bytes" in r else "-", pct(r, "peak_bytes"),
                      f"{r['step_ms']:.1f}" if "step_ms" in r else "-", pct(r, "step_ms")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Saved bytes per sample against gamma, one panel per model, one line per precision/option."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, name in zip(axes[0], models):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["model"] != name:
                continue
            per_sample = r["activation_bytes"] / r["batch"] / 1024**2
            gamma = 0.0 if r["gamma"] is None else r["gamma"]
            opts = "+relu_mask" if r["options"].get("relu_mask") else ""
            if r["gamma"] is None:
                # the baseline starts every line of its precision
                for key in (r["dtype"], r["dtype"] + " +relu_mask"):
                    series.setdefault(key, []).append((gamma, per_sample))
            else:
                series.setdefault((r["dtype"] + " " + opts).strip(), []).append((gamma, per_sample))
        for key, pts in sorted(series.items()):
            if len(pts) < 2:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    color="C0" if key.startswith("fp32") else "C1",
                    linestyle="--" if "relu_mask" in key else "-", label=key)
        ax.set_title(f"{name} (train mode, per sample)")
        ax.set_xlabel("gamma (0 = plain model)")
        ax.set_ylabel("saved for backward, MiB per sample\n(weight copies excluded)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if (r["model"] == "vit_b_16" and r["dtype"] == "fp32" and r["gamma"] == 0.9
                and not r["options"].get("relu_mask")
                and "saved_bytes_vs_baseline" in r):
            less = 100 * (1 - r["saved_bytes_vs_baseline"])
            out.append(f"target ViT-B/16 g=0.9 fp32: saved-for-backward bytes {less:.1f}% below baseline"
                       f" (target >= 30%): {'met' if less >= 30 else 'NOT met'}")
            if "step_ms_vs_baseline" in r:
                slower = 100 * (r["step_ms_vs_baseline"] - 1)
                out.append(f"target ViT-B/16 g=0.9 fp32: training step {slower:+.1f}% vs baseline"
                           f" (target <= +5%): {'met' if slower <= 5 else 'NOT met'}")
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--gammas", nargs="+", type=float, default=[0.8, 0.9])
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch for every model (default {FULL_BATCH}; --quick: {QUICK_BATCH})")
    p.add_argument("--quick", action="store_true", help="reduced batches and steps (minutes on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps on CUDA (default 20, quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 5, quick 2)")
    p.add_argument("--no-train", action="store_true", help="on CUDA, skip peak memory and step time")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of saved bytes against gamma")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    p.add_argument("--verbose", action="store_true", help="print every dc.memory report")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        p.error("--batch must be >= 1")
    for g in args.gammas:
        if not 0.0 <= g < 1.0:
            p.error(f"--gammas: {g} is not in [0, 1)")
    args.steps = args.steps if args.steps is not None else (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    print(f"# bench_memory {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
          f" device={args.device} torch={torch.__version__} dropit_cuda={dc.__version__}"
          f" convert={'yes' if hasattr(dc, 'convert') else 'no'} relu_mask={convert_supports('relu_mask')}")
    if torch.device(args.device).type == "cuda":
        print(f"# gpu: {torch.cuda.get_device_name()}")
    print("# saved = bytes saved for backward by one forward pass (unique storages, parameters excluded);")
    print("# act. = saved less autocast weight copies (those do not grow with the batch);")
    print("# freeable = share of act. held by plain conv/linear layers alone (what DropIT can pack)")
    if not hasattr(dc, "convert"):
        print("# note: dc.convert is not available in this build; measuring the baselines only")
    print(HEADER)
    print("-" * len(HEADER))
    t0 = time.perf_counter()
    errors: list[str] = []
    rows = run(args, errors)
    for line in targets(rows):
        print(line)
    print(f"# done in {time.perf_counter() - t0:.1f} s")
    if args.markdown:
        print()
        print(markdown(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": args.device,
                "gpu": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
                "torch": torch.__version__, "host": platform.node(), "argv": sys.argv[1:],
                "extension": dc.extension_info()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "errors": errors}, f, indent=1)
        print(f"# wrote {args.json}")
    if args.plot:
        plot(rows, args.plot)
        print(f"# wrote {args.plot}")
    for msg in errors:
        print(f"# FAILED {msg}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
