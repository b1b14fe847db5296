"""The demo's outputs: the summary table, the fidelity and plan summaries, and the curves, from
the results :func:`.runner.run_task` returns."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

from ..fidelity import Plan
from ..memory import format_bytes


def _cosine(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def _worst_layer(report: dict[str, Any]) -> str:
    """The measured layer with the lowest weight-gradient cosine in a ``FidelityReport.to_dict()``."""
    measured = [r for r in report["layers"] if r["cosine"] is not None]
    if not measured:
        return "no layer measured"
    worst = min(measured, key=lambda r: r["cosine"])
    return f"{worst['name']} {worst['cosine']:.4f}"


def fidelity_summary(label: str, fidelity: dict[str, Any]) -> str:
    """One line from a run's ``result["fidelity"]``: the whole model's weight-gradient cosine and
    the worst layer's, at the first and at the last step, and the time the two passes took."""
    first, last = fidelity["first"], fidelity["last"]
    return (f"{label}: weight-gradient cosine, step 1 -> {fidelity['steps'][1] + 1}: model "
            f"{_cosine(first['cosine'])} -> {_cosine(last['cosine'])}, worst layer {_worst_layer(first)} -> "
            f"{_worst_layer(last)} ({fidelity['seconds']:.2f} s)")


def plan_summary(label: str, plan: Plan) -> str:
    """One line from a :class:`dropit_cuda.Plan`: each tuned layer's γ, the bytes, and the largest
    uniform γ that meets the same floor."""
    chosen = ", ".join(f"{r.name} {'dense' if r.gamma is None else format(r.gamma, 'g')}" for r in plan.tuned)
    text = (f"{label} (cosine >= {plan.min_cosine:g} on the first training batch): {chosen}; caches "
            f"{format_bytes(plan.cached_bytes)} of {format_bytes(plan.dense_bytes)} dense")
    best = plan.best_uniform
    if best is None:
        return text + "; no uniform γ meets the floor"
    return text + f"; the largest uniform γ that meets the floor, {best.gamma:g}, caches {format_bytes(best.cached_bytes)}"


def format_table(results: dict[str, Any]) -> str:
    """One row per run: the task's metrics (the first with ± standard deviation over seeds), the
    final training loss, the bytes saved for backward, the whole model's weight-gradient cosine at
    the first and the last step (mean over seeds; "-" where not measured) and the time per step."""
    per_run, metrics = results["runs"], results["metrics"]
    base_total = per_run.get("baseline", {}).get("saved_bytes")
    header = ("run", *(m["header"] for m in metrics), "train loss", "saved (model)", "vs base",
              "saved (DropIT layers)", "cos first/last", "ms/step")
    rows = [header]
    for entry in per_run.values():
        n = len(entry["seeds"])
        cells = []
        for i, m in enumerate(metrics):
            text = f"{entry[m['key'] + '_mean']:.{m['decimals']}f}"
            if i == 0 and n > 1:
                text += f" ± {entry[m['key'] + '_std']:.{m['decimals']}f}"
            cells.append(text)
        total = entry["saved_bytes"]
        ratio = "-" if not base_total else f"{100.0 * total / base_total:.0f}%"
        cosines = "-"
        if "cosine_first_mean" in entry:
            cosines = f"{_cosine(entry['cosine_first_mean'])}/{_cosine(entry['cosine_last_mean'])}"
        rows.append((entry["name"], *cells, f"{entry['train_loss_mean']:.4f}", format_bytes(total), ratio,
                     format_bytes(entry["layer_bytes"]), cosines, f"{entry['step_ms']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_curves(results: dict[str, Any], path: Path, title: str = "") -> None:
    """Training loss and the headline metric after every round, one line per run (mean over
    seeds, min-max band); the baseline in black, the ``random`` strategy dashed, the tuned run dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_run, head = results["runs"], results["metrics"][0]
    unit = results["round"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4.2))
    for entry in per_run.values():
        seeds = list(entry["seeds"].values())
        for ax, key in ((ax_loss, "train_loss"), (ax_metric, head["key"])):
            curves = list(zip(*(r[key] for r in seeds)))
            x = [unit["size"] * (i + 1) for i in range(len(curves))]
            style: dict[str, Any] = {}
            if entry["strategy"] is None:
                style = {"color": "black", "linewidth": 2.2}
            elif entry.get("min_cosine") is not None:
                style = {"linestyle": ":", "linewidth": 2.0}
            elif entry["strategy"] == "random":
                style = {"linestyle": "--"}
            (line,) = ax.plot(x, [statistics.fmean(c) for c in curves], label=entry["name"], **style)
            if len(seeds) > 1:
                ax.fill_between(x, [min(c) for c in curves], [max(c) for c in curves],
                                color=line.get_color(), alpha=0.15)
    ax_loss.set(xlabel=unit["label"], ylabel="training loss", yscale="log", title="training loss")
    ax_metric.set(xlabel=unit["label"], ylabel=head["header"], title=head["header"])
    values = [v for e in per_run.values() for r in e["seeds"].values() for v in r[head["key"]]]
    if values and head["plot_span"] is not None:
        if head["higher_is_better"]:
            best = max(values)
            ax_metric.set_ylim(max(min(values), best - head["plot_span"]), best + 0.05 * head["plot_span"])
        else:
            best = min(values)
            ax_metric.set_ylim(best - 0.05 * head["plot_span"], min(max(values), best + head["plot_span"]))
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
