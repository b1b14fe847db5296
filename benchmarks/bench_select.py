"""Microbenchmark: dc.pack / dc.unpack against torch.topk.

Compared on the same tensor in the same run, round robin, with the same CPU thread count on both
sides:
- ``chunked topk``: ``x.view(-1, D).abs().topk(K)``, values gathered, int64 indices kept; its unpack
  is ``zeros().scatter_()``;
- ``full topk``: one ``topk`` over the whole tensor (the paper's exact min-k).
Times are wall-clock medians (process CPU time beside them on the CPU). Prints a table (ms, GB/s
of the bytes each op must move, bytes cached per element, speed-ups), with ``--threads 1,2`` also
how pack, unpack and topk scale with the thread count, and writes the figures as JSON.

    python benchmarks/bench_select.py                      # every device present, 16M elements
    python benchmarks/bench_select.py --device cpu --threads 1,2
    python benchmarks/bench_select.py --device cuda --numel 67108864 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the checkout
import dropit_cuda as dc  # noqa: E402
from _timing import machine_load, print_scaling, thread_counts, thread_scaling, time_ops  # noqa: E402

# "fresh_zeros" is no rival but a yardstick: a fresh output of the input's size, written once (as
# torch allocates it, without unpack's huge-page hint). How it scales with threads shows how far
# writing fresh memory, which the OS must first fault in and zero, scales on this machine.
OPS = ("pack", "unpack", "topk_chunked", "scatter", "fresh_zeros")


def bench_one(device: torch.device, dtype: torch.dtype, numel: int, chunk: int, gamma: float,
              repeats: int, full_topk: bool, threads: list[int]) -> list[dict]:
    """One row per thread count (one row on CUDA, where the thread count doesn't apply)."""
    x = torch.randn(numel, device=device, dtype=dtype)
    s = x.element_size()
    k = dc.ops.keep_count(chunk, gamma)
    rows = x.view(-1, chunk)
    packed = dc.pack(x, gamma, chunk)

    def topk_pack():
        idx = rows.abs().topk(k, dim=1, sorted=False).indices
        return rows.gather(1, idx), idx

    vals, idx = topk_pack()
    fns = {
        "pack": lambda: dc.pack(x, gamma, chunk),
        "unpack": lambda: dc.unpack(packed),
        "topk_chunked": topk_pack,
        "scatter": lambda: torch.zeros_like(rows).scatter_(1, idx, vals),
        "fresh_zeros": lambda: torch.zeros_like(x),
    }
    times = time_ops(fns, device, repeats, threads)
    if full_topk:  # slow: fewer repeats
        kf = numel - int(gamma * numel)
        full = time_ops({"topk_full": lambda: x.abs().topk(kf, sorted=False)}, device, max(1, repeats // 3), threads)
        for t, figures in full.items():
            times[t].update(figures)
    moved = numel * s + packed.nbytes  # bytes an op must move: the input once, the packed buffer once
    results = []
    for t, figures in times.items():
        r = {
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "dtype": str(dtype).replace("torch.", ""), "numel": numel, "chunk": chunk, "gamma": gamma,
            "threads": t, "index": packed.index_kind, **figures,
            "pack_gbps": moved / figures["pack_ms"] / 1e6,
            "unpack_gbps": moved / figures["unpack_ms"] / 1e6,
            "bytes_per_element_dropit": packed.nbytes / numel,
            "bytes_per_element_topk": (vals.nbytes + idx.nbytes) / numel,
            "bytes_per_element_dense": s,
            "pack_speedup_vs_topk": figures["topk_chunked_ms"] / figures["pack_ms"],
            "unpack_speedup_vs_scatter": figures["scatter_ms"] / figures["unpack_ms"],
        }
        if full_topk:
            r["pack_speedup_vs_full_topk"] = r["topk_full_ms"] / r["pack_ms"]
        results.append(r)
    return results


def _cpu(ms: float | None) -> str:
    return "" if ms is None else f"({ms:.1f})"


def print_table(results: list[dict], scaling: list[dict]) -> None:
    head = (f"{'device':<22}{'dtype':<10}{'thr':>4}{'pack ms':>9}{'(cpu)':>9}{'GB/s':>7}{'topk ms':>9}{'(cpu)':>9}"
            f"{'x topk':>8}{'unpack ms':>11}{'(cpu)':>9}{'GB/s':>7}{'scatter ms':>12}{'x scat':>8}{'zeros ms':>10}{'full ms':>9}"
            f"{'B/el dropit':>12}{'B/el topk':>10}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['device'][:21]:<22}{r['dtype']:<10}{r['threads'] or '-':>4}{r['pack_ms']:>9.2f}"
              f"{_cpu(r['pack_cpu_ms']):>9}{r['pack_gbps']:>7.1f}{r['topk_chunked_ms']:>9.2f}"
              f"{_cpu(r['topk_chunked_cpu_ms']):>9}{r['pack_speedup_vs_topk']:>8.1f}"
              f"{r['unpack_ms']:>11.2f}{_cpu(r['unpack_cpu_ms']):>9}{r['unpack_gbps']:>7.1f}{r['scatter_ms']:>12.2f}"
              f"{r['unpack_speedup_vs_scatter']:>8.1f}{r['fresh_zeros_ms']:>10.2f}{r.get('topk_full_ms', float('nan')):>9.1f}"
              f"{r['bytes_per_element_dropit']:>12.3f}{r['bytes_per_element_topk']:>10.3f}")
    print_scaling(scaling)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", action="append", help="cpu and/or cuda (default: every device present)")
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=thread_counts, default=None,
                    help="CPU thread counts to measure, e.g. 1,2 (default: torch's current count)")
    ap.add_argument("--no-full-topk", action="store_true", help="skip the whole-tensor topk")
    ap.add_argument("--json", default="bench_select.json", help="where to write the figures")
    args = ap.parse_args(argv)
    if args.numel % args.chunk:
        ap.error("--numel must be a multiple of --chunk (topk runs over (-1, chunk) views)")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    dtypes = args.dtype or ["float32", "bfloat16"]
    threads = args.threads or [torch.get_num_threads()]
    load_before = machine_load()
    print(f"dropit_cuda {dc.__version__}: {dc.extension_info()}")
    print(f"numel={args.numel} chunk={args.chunk} gamma={args.gamma} repeats={args.repeats} "
          f"cpu threads={','.join(map(str, threads))}; wall-clock medians, CPU time in brackets; {load_before}")
    results = [
        r
        for d in devices for t in dtypes
        for r in bench_one(torch.device(d), getattr(torch, t), args.numel, args.chunk, args.gamma,
                           args.repeats, not args.no_full_topk, threads)
    ]
    scaling = thread_scaling(results, OPS)
    print_table(results, scaling)
    load_after = machine_load()
    print(f"after: {load_after}")
    with open(args.json, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "load_before": load_before,
                   "load_after": load_after, "results": results, "scaling": scaling}, f, indent=2)
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
