"""Microbenchmark: the ReLU-mask ops against torch's ReLU forward and backward.

Compared on the same tensor in the same run:
- forward: ``relu_mask`` (writes y and the 1-bit mask) against ``torch.relu``, both out of place,
  and the in-place forms against ``torch.relu_``;
- backward: ``relu_mask_backward(grad, mask)`` against ``threshold_backward(grad, y, 0)``, what
  ``nn.ReLU``'s backward runs (it reads the saved output instead of the mask).
Measured round robin, with the same CPU thread count on both sides. Prints wall-clock medians in
milliseconds, GB/s of the bytes each op must move (forward: read x, write y and the mask;
backward: read grad and the mask or y, write the gradient), the bytes cached per element and, with
``--threads 1,2``, how the ops scale with the thread count.

    python benchmarks/bench_relu_mask.py                        # every device present, 16M elements
    python benchmarks/bench_relu_mask.py --device cpu --threads 1,2
    python benchmarks/bench_relu_mask.py --device cuda --numel 67108864 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dropit_cuda.relu import relu_mask, relu_mask_backward  # noqa: E402
from _timing import machine_load, print_scaling, thread_counts, thread_scaling, time_ops  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


SCALED = ("fwd", "fwd_inplace", "bwd")  # the ops whose thread scaling is printed


def bench_one(device: torch.device, dtype: torch.dtype, numel: int, repeats: int, threads: list[int]) -> list[dict]:
    """One row per thread count (one row on CUDA, where the thread count doesn't apply)."""
    x = torch.randn(numel, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    s = x.element_size()
    y, mask, strides = relu_mask(x)
    z = x.clone()
    fns = {
        "fwd": lambda: relu_mask(x),
        "torch_fwd": lambda: torch.relu(x),
        "fwd_inplace": lambda: relu_mask(z, inplace=True),
        "torch_fwd_inplace": lambda: torch.relu_(z),
        "bwd": lambda: relu_mask_backward(grad, mask, strides),
        "torch_bwd": lambda: torch.ops.aten.threshold_backward(grad, y, 0),
    }
    rows = []
    for t, figures in time_ops(fns, device, repeats, threads).items():
        r = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "numel": numel, "threads": t,
             "cached_bytes_per_element": mask.nbytes / numel, "torch_cached_bytes_per_element": s, **figures}
        # Bytes each op must move: forward reads x and writes y and the mask; backward reads grad
        # and the mask (torch: y) and writes the gradient.
        r["fwd_gbps"] = (numel * 2 * s + mask.nbytes) / r["fwd_ms"] / 1e6
        r["bwd_gbps"] = (numel * 2 * s + mask.nbytes) / r["bwd_ms"] / 1e6
        r["torch_fwd_gbps"] = numel * 2 * s / r["torch_fwd_ms"] / 1e6
        r["torch_bwd_gbps"] = numel * 3 * s / r["torch_bwd_ms"] / 1e6
        rows.append(r)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'device':6} {'dtype':9} {'thr':>3} {'numel':>10} | {'fwd ms':>7} {'GB/s':>6} {'torch':>7} | "
            f"{'inpl ms':>7} {'torch':>7} | {'bwd ms':>7} {'GB/s':>6} {'torch':>7} | {'B/elem':>6} {'torch':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['device']:6} {r['dtype']:9} {r['threads'] or '-':>3} {r['numel']:>10} | {r['fwd_ms']:7.2f} "
              f"{r['fwd_gbps']:6.1f} {r['torch_fwd_ms']:7.2f} | {r['fwd_inplace_ms']:7.2f} "
              f"{r['torch_fwd_inplace_ms']:7.2f} | {r['bwd_ms']:7.2f} {r['bwd_gbps']:6.1f} {r['torch_bwd_ms']:7.2f} | "
              f"{r['cached_bytes_per_element']:6.3f} {r['torch_cached_bytes_per_element']:5d}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", action="append", help="cpu or cuda (default: every device present)")
    p.add_argument("--numel", type=int, default=16 << 20)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=thread_counts, default=None,
                   help="CPU thread counts to measure, e.g. 1,2 (default: torch's current count)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    threads = args.threads or [torch.get_num_threads()]
    load_before = machine_load()
    print(f"wall-clock medians of {args.repeats}, same thread count on both sides; {load_before}")
    rows = [r for d in devices for t in args.dtypes
            for r in bench_one(torch.device(d), DTYPES[t], args.numel, args.repeats, threads)]
    scaling = thread_scaling(rows, SCALED)
    print_table(rows)
    print_scaling(scaling)
    load_after = machine_load()
    print(f"after: {load_after}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "load_before": load_before,
                       "load_after": load_after, "rows": rows, "scaling": scaling}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
