"""Microbenchmark: dc.pack / dc.unpack against torch.topk.

Compared on the same tensor in the same run:
- ``chunked topk``: ``x.view(-1, D).abs().topk(K)``, values gathered, int64 indices kept; its unpack
  is ``zeros().scatter_()``;
- ``full topk``: one ``topk`` over the whole tensor (the paper's exact min-k).
Prints a table (ms, GB/s of the bytes each op must move, bytes cached per element, speed-ups) and
writes the figures as JSON.

    python benchmarks/bench_select.py                      # every device present, 16M elements
    python benchmarks/bench_select.py --device cuda --numel 67108864 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import dropit_cuda as dc
from _timing import timed


def bench_one(device: torch.device, dtype: torch.dtype, numel: int, chunk: int, gamma: float,
              repeats: int, full_topk: bool) -> dict:
    x = torch.randn(numel, device=device, dtype=dtype)
    s = x.element_size()
    k = dc.ops.keep_count(chunk, gamma)
    rows = x.view(-1, chunk)

    packed = dc.pack(x, gamma, chunk)
    pack_ms = timed(lambda: dc.pack(x, gamma, chunk), device, repeats)
    unpack_ms = timed(lambda: dc.unpack(packed), device, repeats)

    def topk_pack():
        idx = rows.abs().topk(k, dim=1, sorted=False).indices
        return rows.gather(1, idx), idx

    vals, idx = topk_pack()
    topk_ms = timed(topk_pack, device, repeats)
    scatter_ms = timed(lambda: torch.zeros_like(rows).scatter_(1, idx, vals), device, repeats)

    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).replace("torch.", ""), "numel": numel, "chunk": chunk, "gamma": gamma,
        "threads": torch.get_num_threads(), "index": packed.index_kind,
        "pack_ms": pack_ms, "unpack_ms": unpack_ms,
        "topk_chunked_ms": topk_ms, "scatter_ms": scatter_ms,
        # Bytes an op must move: read the input once, write the packed buffer once (and back).
        "pack_gbps": (numel * s + packed.nbytes) / pack_ms / 1e6,
        "unpack_gbps": (numel * s + packed.nbytes) / unpack_ms / 1e6,
        "bytes_per_element_dropit": packed.nbytes / numel,
        "bytes_per_element_topk": (vals.nbytes + idx.nbytes) / numel,
        "bytes_per_element_dense": s,
        "pack_speedup_vs_topk": topk_ms / pack_ms,
        "unpack_speedup_vs_scatter": scatter_ms / unpack_ms,
    }
    if full_topk:
        kf = numel - int(gamma * numel)
        result["topk_full_ms"] = timed(lambda: x.abs().topk(kf, sorted=False), device, max(1, repeats // 3))
        result["pack_speedup_vs_full_topk"] = result["topk_full_ms"] / pack_ms
    return result


def print_table(results: list[dict]) -> None:
    head = (f"{'device':<22}{'dtype':<10}{'pack ms':>9}{'GB/s':>7}{'topk ms':>9}{'x topk':>8}"
            f"{'unpack ms':>11}{'GB/s':>7}{'scatter ms':>12}{'x scat':>8}{'full ms':>9}"
            f"{'B/el dropit':>12}{'B/el topk':>10}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['device'][:21]:<22}{r['dtype']:<10}{r['pack_ms']:>9.2f}{r['pack_gbps']:>7.1f}"
              f"{r['topk_chunked_ms']:>9.2f}{r['pack_speedup_vs_topk']:>8.1f}"
              f"{r['unpack_ms']:>11.2f}{r['unpack_gbps']:>7.1f}{r['scatter_ms']:>12.2f}"
              f"{r['unpack_speedup_vs_scatter']:>8.1f}{r.get('topk_full_ms', float('nan')):>9.1f}"
              f"{r['bytes_per_element_dropit']:>12.3f}{r['bytes_per_element_topk']:>10.3f}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", action="append", help="cpu and/or cuda (default: every device present)")
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-full-topk", action="store_true", help="skip the whole-tensor topk")
    ap.add_argument("--json", default="bench_select.json", help="where to write the figures")
    args = ap.parse_args(argv)
    if args.numel % args.chunk:
        ap.error("--numel must be a multiple of --chunk (topk runs over (-1, chunk) views)")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    dtypes = args.dtype or ["float32", "bfloat16"]
    print(f"dropit_cuda {dc.__version__}: {dc.extension_info()}")
    print(f"numel={args.numel} chunk={args.chunk} gamma={args.gamma} repeats={args.repeats} "
          f"cpu threads={torch.get_num_threads()}")
    results = [
        bench_one(torch.device(d), getattr(torch, t), args.numel, args.chunk, args.gamma,
                  args.repeats, not args.no_full_topk)
        for d in devices for t in dtypes
    ]
    print_table(results)
    with open(args.json, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=2)
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
