"""The host cost of a converted model in eager mode: how much longer a training step takes when
``dc.convert`` routes its products, on models small enough that Python rather than arithmetic
sets the step time (as it does for most eager steps on a fast GPU).

Cases, all on the CPU, wall clock, one intra-op thread unless ``--threads`` says otherwise:

- ``gpt2``: a Hugging Face GPT-2 (random init; ``--gpt-layers`` blocks of width ``--gpt-width``,
  vocabulary 64) on ``1 x --tokens`` tokens, one training step (forward with its own LM loss,
  backward; gradients set to None before each step), three copies of the same initial weights:
  ``plain``; ``routing only``, converted with every layer dense (``gamma={"*": None}``), which
  costs the routing and nothing else; ``dropit``, converted at ``gamma=--gamma``.
- ``product``: one ``F.linear`` forward + backward on a ``--product-rows x --product-width``
  input against a square weight, plain and through ``dc.functional.linear`` at ``--gamma``
  (``--product-width`` features, the chunk the default 16384).
- ``wide``: the same on a wide layer (``--wide-rows x --wide-width`` against a square weight),
  where the arithmetic dominates and the overhead should vanish.

Every case is timed round robin (each round runs every variant once, in turn, so that a change in
the shared machine's load falls on all of them alike), after warm-up rounds that also make the
conversions' first-forward decisions; the figures are medians. The first training forward of a
converted model observes how its weights are used and is not timed.

    python benchmarks/bench_overhead.py --json bench_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dropit_cuda as dc  # noqa: E402
from _timing import machine_load  # noqa: E402
from zoo import _gpt2, _LMLoss  # noqa: E402


def round_robin(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall-clock seconds of each function over ``repeats`` rounds (each round calls every
    function once, in turn), after ``warmup`` rounds that are not kept."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rnd in range(warmup + repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            if rnd >= warmup:
                times[key].append(t)
    return times


def gpt2_steps(layers: int, width: int, tokens: int, gamma: float) -> dict[str, Callable[[], object]]:
    """One training step of each variant of the GPT-2 case."""
    torch.manual_seed(0)
    plain = _LMLoss(_gpt2(n_layer=layers, n_embd=width, n_head=max(1, width // 16))).train()
    with warnings.catch_warnings():  # "no weight to convert": the point of this variant
        warnings.simplefilter("ignore", UserWarning)
        routing = dc.convert(copy.deepcopy(plain), gamma={"*": None})
    dropit = dc.convert(copy.deepcopy(plain), gamma=gamma)
    ids = torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(1))

    def step(model: torch.nn.Module) -> Callable[[], object]:
        params = list(model.parameters())

        def run() -> None:
            for p in params:
                p.grad = None
            model(ids).backward()

        return run

    return {"plain": step(plain), "routing only": step(routing), "dropit": step(dropit)}


def product_steps(rows: int, width: int, gamma: float) -> dict[str, Callable[[], object]]:
    """One linear forward + backward, plain and through ``dc.functional.linear``."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, width, generator=gen).requires_grad_()
    w = torch.randn(width, width, generator=gen).div_(width ** 0.5).requires_grad_()
    b = torch.randn(width, generator=gen).requires_grad_()
    grad = torch.randn(rows, width, generator=gen)

    def plain() -> None:
        x.grad = w.grad = b.grad = None
        F.linear(x, w, b).backward(grad)

    def dropit() -> None:
        x.grad = w.grad = b.grad = None
        dc.functional.linear(x, w, b, gamma=gamma).backward(grad)

    return {"plain": plain, "dropit": dropit}


def summarize(case: str, times: dict[str, list[float]], base: str = "plain") -> list[dict]:
    """One row per variant: median and quartiles in microseconds, ratio and excess over ``base``."""
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for key, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        rows.append({"case": case, "variant": key, "median_us": med[key] * 1e6, "q1_us": q[0] * 1e6,
                     "q3_us": q[2] * 1e6, "ratio": med[key] / med[base],
                     "excess_us": (med[key] - med[base]) * 1e6, "rounds": len(values)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpt-layers", type=int, default=12)
    p.add_argument("--gpt-width", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--product-rows", type=int, default=16)
    p.add_argument("--product-width", type=int, default=64)
    p.add_argument("--wide-rows", type=int, default=512)
    p.add_argument("--wide-width", type=int, default=1024)
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=50, help="timed rounds of the small cases")
    p.add_argument("--wide-repeats", type=int, default=9, help="timed rounds of the wide case")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.wide_repeats < 1 or args.warmup < 1:
        p.error("--threads, --repeats, --wide-repeats and --warmup must be >= 1 (the first warm-up "
                "round makes the conversions' first-forward decisions)")

    torch.set_num_threads(args.threads)
    load_before = machine_load()
    rows = []
    rows += summarize("gpt2", round_robin(gpt2_steps(args.gpt_layers, args.gpt_width, args.tokens, args.gamma),
                                          args.warmup, args.repeats))
    rows += summarize("product", round_robin(product_steps(args.product_rows, args.product_width, args.gamma),
                                             args.warmup, args.repeats))
    rows += summarize("wide", round_robin(product_steps(args.wide_rows, args.wide_width, args.gamma),
                                          1, args.wide_repeats))
    load_after = machine_load()

    shapes = {"gpt2": f"{args.gpt_layers} blocks, width {args.gpt_width}, 1x{args.tokens} tokens",
              "product": f"{args.product_rows}x{args.product_width} @ {args.product_width}x{args.product_width}",
              "wide": f"{args.wide_rows}x{args.wide_width} @ {args.wide_width}x{args.wide_width}"}
    print(f"torch {torch.__version__}, {args.threads} thread(s), gamma={args.gamma}; wall clock, medians "
          f"(quartiles) of {args.repeats} rounds ({args.wide_repeats} for wide); {load_before} before, "
          f"{load_after} after")
    print(f"{'case':<8} {'variant':<13} {'median us':>10} {'q1-q3 us':>17} {'x plain':>8} {'+us':>9}  shape")
    for r in rows:
        print(f"{r['case']:<8} {r['variant']:<13} {r['median_us']:>10.1f} "
              f"{r['q1_us']:>8.1f}-{r['q3_us']:<8.1f} {r['ratio']:>8.3f} {r['excess_us']:>9.1f}  {shapes[r['case']]}")
    figures = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch": torch.__version__, "shapes": shapes, "rows": rows,
               "load_before": load_before, "load_after": load_after}
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
