"""Saved-for-backward bytes of third-party models, plain against ``dc.convert`` at gamma = 0.9.

The models are the zoo of ``benchmarks/zoo.py`` (torchvision, timm, Hugging Face transformers and
peft in small configs, random init) plus GPT-2 in the GPT-2-small config (12 layers, 768 wide) on
2 x 128 tokens. Each model runs one training step (so ``convert`` has seen a training forward),
then one forward pass whose saved tensors are counted by ``zoo.saved_bytes``: unique storages held
by the autograd graph (saved through ``saved_tensors_hooks`` or kept as custom functions' ``ctx``
attributes), parameters and buffers excluded. Float32, CPU; the bytes do not depend on the values.

Targets (issue 10): GPT-2 (tiny and small config) saves at least 15 % fewer bytes; R3D-18 and
Swin-T save at least as large a fraction as ResNet-18 and ViT respectively; no model saves more
after conversion.

Examples::

    python benchmarks/bench_coverage.py                          # every model, a few minutes
    python benchmarks/bench_coverage.py --models gpt2 swin_t vit --json bench-results/coverage.json
    python benchmarks/bench_coverage.py --models gpt2_small_8x128 --amp bf16   # issue 11's GPT-2 figure
    python benchmarks/bench_coverage.py --amp bf16 --models mixtral_4x256_grouped_mm \
        mixtral_4x256_batched_mm mixtral_4x256_eager llama_4x256       # issue 18's figures
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dropit_cuda as dc  # noqa: E402
from benchmarks.zoo import BENCH_ONLY, ZOO, ZooModel, loss_of, saved_bytes  # noqa: E402

MODELS: dict[str, ZooModel] = {z.name: z for z in (*ZOO, *BENCH_ONLY)}
MIB = 2**20
GPT2_TARGET = 15.0  # percent fewer bytes
# issue 18 (bf16 autocast): percent fewer bytes
MOE_TARGET, LLAMA_TARGET = 40.0, 34.0


def measure(spec: ZooModel, gamma: float, amp: Optional[torch.dtype] = None) -> dict[str, Any]:
    """One row: the model's saved bytes plain and converted (under CPU autocast to ``amp``)."""
    plain = spec.build()
    inputs = spec.inputs()
    converted = dc.convert(copy.deepcopy(plain), gamma=gamma)
    sizes = {}
    for label, model in (("plain", plain), ("converted", converted)):
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss_of(model(*inputs)).backward()  # the training step convert may need to see
            model.zero_grad(set_to_none=True)
            sizes[label] = saved_bytes(model, *inputs)
    before, after = sizes["plain"], sizes["converted"]
    return {"model": spec.name, "config": spec.config, "plain_bytes": before, "converted_bytes": after,
            "change_pct": 100.0 * (after - before) / before}


def targets(rows: list[dict[str, Any]], amp: Optional[str] = None) -> list[dict[str, Any]]:
    """The issue's targets that the measured rows allow to check (issue 18's under bf16 autocast)."""
    change = {r["model"]: r["change_pct"] for r in rows}
    out = []
    for name in ("gpt2", "gpt2_small"):
        if name in change:
            out.append({"target": f"{name}: at least {GPT2_TARGET:.0f}% fewer bytes",
                        "met": change[name] <= -GPT2_TARGET})
    for name, goal in [(m, MOE_TARGET) for m in change if m.startswith("mixtral_4x256_")] + [("llama_4x256", LLAMA_TARGET)]:
        if name in change and amp == "bf16":
            out.append({"target": f"{name}: at least {goal:.0f}% fewer bytes", "met": change[name] <= -goal})
    for model, ref in (("r3d_18", "resnet18"), ("swin_t", "vit")):
        if model in change and ref in change:
            out.append({"target": f"{model} falls at least as much as {ref} "
                                  f"({change[model]:+.1f}% vs {change[ref]:+.1f}%)",
                        "met": change[model] <= change[ref]})
    more = [r["model"] for r in rows if r["converted_bytes"] > r["plain_bytes"]]
    out.append({"target": "no model saves more after conversion" + (f" (more: {', '.join(more)})" if more else ""),
                "met": not more})
    return out


def table(rows: list[dict[str, Any]], gamma: float) -> str:
    head = f"{'model':<20} {'plain MiB':>10} {f'γ={gamma} MiB':>11} {'change':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<20} {r['plain_bytes'] / MIB:>10.3f} {r['converted_bytes'] / MIB:>11.3f}"
                     f" {r['change_pct']:>+7.1f}%")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "gpt2_small_8x128"
                                                   and not m.startswith("mixtral_4x256_")],
                   choices=list(MODELS), help="default: all but gpt2_small_8x128 (issue 11's GPT-2 figure, "
                   "several GiB of memory) and the 4x256 Mixtral models (issue 18's, 3 GiB plain with "
                   "batched_mm)")
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--amp", choices=["bf16", "fp16"], help="run under CPU autocast to this dtype")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the bytes do not depend on it; one is quickest on a shared machine)")
    p.add_argument("--json", metavar="PATH", help="write the rows and targets as JSON")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    rows = []
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    for name in args.models:
        rows.append(measure(MODELS[name], args.gamma, amp))
        print(f"measured {name}", file=sys.stderr, flush=True)
    checks = targets(rows, args.amp)
    precision = f"autocast {args.amp}" if args.amp else "float32"
    print(f"saved for backward, plain vs dc.convert(gamma={args.gamma}), {precision}, one forward pass")
    print(table(rows, args.gamma))
    print()
    for c in checks:
        print(f"{'met    ' if c['met'] else 'NOT MET'}  {c['target']}")
    print()
    for r in rows:
        print(f"{r['model']}: {r['config']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started, 1),
                "load_average": os.getloadavg(), "cpus": os.cpu_count(), "threads": args.threads,
                "torch": torch.__version__, "platform": platform.platform(), "argv": sys.argv[1:],
                "gamma": args.gamma, "amp": args.amp}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "targets": checks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
