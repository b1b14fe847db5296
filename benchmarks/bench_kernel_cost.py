"""Cost model of the CUDA pack and unpack kernels, measured on the CPU.

The host SIMT layer (tests/simt/) runs the kernels' own source and counts, per launch: global
bytes read and written (distinct bytes per warp instruction: lanes reading one word count it
once; and the 32-byte sectors the warp instructions touch), shared-memory
loads, stores and atomics (lane accesses, warp instructions, and wavefronts: the passes bank
conflicts add), block barriers and warp collectives (ballots, shuffles, matches). The layer
sees these operations only; it groups each warp's lanes into warp instructions by assuming
lockstep (the n-th execution of an access site by each lane is one warp instruction).

Modelled warp instructions = seen x R + replays, where
- seen: the warp instructions the layer counts (global and shared loads, stores, atomics,
  ballots, shuffles, matches, warp barriers, one block barrier per warp);
- R: the instructions the kernel's innermost loops carry per seen instruction in its SASS
  (`.ci/sass_count.py --json`, given with --sass; sm_90 by default): the address arithmetic,
  compares, loop control and branches around each seen instruction, as compiled;
- replays: the passes bank conflicts add to shared accesses (wavefronts beyond one per 128
  bytes moved; an atomic's lanes on one bank take a pass each, same address or not).
It cannot see: code outside loops (per-chunk setup and scans; small for D >= 1024),
divergence (lanes of a warp that skip work still take the warp's issue slots), latency and
stalls, and how well the loops that run most match the kernel's average R. Without --sass the
modelled column is left out.

    python benchmarks/bench_kernel_cost.py --sass sass.json --json cost.json
    python benchmarks/bench_kernel_cost.py --dtypes float32 --chunks 16384 --gammas 0.9

Today's kernels' figures (recorded before the redesign) are read from --baseline and shown
beside the new ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import dropit_cuda  # noqa: E402,F401  (the CPU ops, for the unpack inputs)
from simt.build import load  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BITS = {2: "u16", 4: "u32", 8: "u64"}
BASELINE = ROOT / "benchmarks" / "results" / "kernel_cost_baseline.json"
SEEN = ["global_load_instr", "global_store_instr", "shared_load_instr", "shared_store_instr",
        "shared_atomic_instr", "ballots", "shuffles", "matches", "warp_syncs", "barrier_warps"]


def data(kind: str, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``normal``: standard normal; ``relu``: ReLU of it (half zeros)."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if kind == "relu":
        x = x.clamp_min(0)
    return x.to(dtype)


def kernel_name(op: str, elem_bytes: int, source: str = "") -> str:
    """The kernel's short name as .ci/sass_count.py prints it."""
    bits = BITS[elem_bytes]
    if op == "pack":
        key = "u32" if source == "random" else bits
        return f"void pack_kernel<{bits}, {key}, {source.capitalize()}>"
    return f"void unpack_bitmap_kernel<{bits}>"


def summarise(stats: dict, n: int, chunks: int, ratio: float | None) -> dict:
    seen = sum(stats[k] for k in SEEN)
    replays = stats["shared_conflict_passes"]
    out = {
        "global_bytes_read": stats["global_load_distinct_bytes"],
        "global_bytes_written": stats["global_store_distinct_bytes"],
        "global_sectors": stats["global_load_sectors"] + stats["global_store_sectors"],
        "shared_loads": stats["shared_loads"], "shared_stores": stats["shared_stores"],
        "shared_atomics": stats["shared_atomics"],
        "shared_wavefronts": sum(stats[f"shared_{k}_wavefronts"] for k in ("load", "store", "atomic")),
        "barriers": stats["barriers"],
        "warp_collectives": stats["ballots"] + stats["shuffles"] + stats["matches"] + stats.get("warp_syncs", 0),
        "seen_warp_instructions": seen, "shared_replays": replays,
        "modelled_warp_instructions": None if ratio is None else seen * ratio + replays,
    }
    return {
        "per_element": {k: (v / n if v is not None else None) for k, v in out.items()},
        "per_chunk": {k: (v / chunks if v is not None else None) for k, v in out.items()},
    }


def measure(simt, dtype: str, chunk: int, gamma: float, kind: str, chunks: int, ratios: dict) -> list[dict]:
    n = chunk * chunks
    x = data(kind, n, DTYPES[dtype], seed=chunk)
    es = x.element_size()
    plan = simt.pack_plan(n, gamma, chunk, es)
    values, index = simt.pack(x, gamma, chunk, True, profile=True)
    pack_stats = simt.last_stats()
    ref = torch.ops.dropit_cuda.pack(x, gamma, chunk, True, None)
    assert torch.equal(values.view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(index, ref[1])
    simt.unpack(values, index, n, gamma, chunk, True, profile=True)
    unpack_stats = simt.last_stats()
    rows = []
    for op, stats, name in (("pack", pack_stats, kernel_name("pack", es, plan["source"])),
                            ("unpack", unpack_stats, kernel_name("unpack", es))):
        row = {"op": op, "dtype": dtype, "chunk": chunk, "gamma": gamma, "data": kind, "numel": n,
               "kernel": name, "threads": plan["threads"] if op == "pack" else None}
        row.update(summarise(stats, n, chunks, ratios.get(name)))
        rows.append(row)
    return rows


def key(r: dict) -> tuple:
    return (r["op"], r["dtype"], r["chunk"], r["gamma"], r["data"])


def fmt(v, width=7, digits=2) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def print_tables(rows: list[dict], baseline: dict[tuple, dict]) -> None:
    print("Per element (global bytes; shared accesses by lanes; warp instructions):")
    print(f"{'op':6} {'dtype':8} {'D':>6} {'gamma':>5} {'data':6} | {'B read':>7} {'B writ':>7} | "
          f"{'sh ld':>6} {'sh st':>6} {'atom':>6} | {'seen':>6} {'model':>7}")
    for r in rows:
        e = r["per_element"]
        print(f"{r['op']:6} {r['dtype']:8} {r['chunk']:>6} {r['gamma']:>5} {r['data']:6} | "
              f"{fmt(e['global_bytes_read'])} {fmt(e['global_bytes_written'])} | {fmt(e['shared_loads'], 6)} "
              f"{fmt(e['shared_stores'], 6)} {fmt(e['shared_atomics'], 6)} | {fmt(e['seen_warp_instructions'], 6, 3)} "
              f"{fmt(e['modelled_warp_instructions'], 7, 3)}")
    print("\nPer chunk (block barriers, warp collectives, shared wavefronts, 32-byte sectors, warp instructions):")
    print(f"{'op':6} {'dtype':8} {'D':>6} {'gamma':>5} {'data':6} | {'barrier':>7} {'collect':>8} {'wavefr':>8} "
          f"{'sectors':>8} | {'seen':>8} {'model':>9}")
    for r in rows:
        c = r["per_chunk"]
        print(f"{r['op']:6} {r['dtype']:8} {r['chunk']:>6} {r['gamma']:>5} {r['data']:6} | {fmt(c['barriers'], 7, 0)} "
              f"{fmt(c['warp_collectives'], 8, 0)} {fmt(c['shared_wavefronts'], 8, 0)} {fmt(c['global_sectors'], 8, 0)} | "
              f"{fmt(c['seen_warp_instructions'], 8, 0)} {fmt(c['modelled_warp_instructions'], 9, 0)}")
    if not baseline:
        return
    print("\nModelled warp instructions per element, today's kernels (baseline) against these:")
    print(f"{'op':6} {'dtype':8} {'D':>6} {'gamma':>5} {'data':6} | {'baseline':>8} {'now':>7} {'fewer':>6}")
    for r in rows:
        b = baseline.get(key(r))
        old = b["per_element"]["modelled_warp_instructions"] if b else None
        new = r["per_element"]["modelled_warp_instructions"]
        ratio = old / new if old and new else None
        print(f"{r['op']:6} {r['dtype']:8} {r['chunk']:>6} {r['gamma']:>5} {r['data']:6} | {fmt(old, 8, 3)} "
              f"{fmt(new, 7, 3)} {fmt(ratio, 5, 1)}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--chunks", nargs="+", type=int, default=[1024, 16384, 65536], help="chunk sizes D")
    ap.add_argument("--gammas", nargs="+", type=float, default=[0.5, 0.9])
    ap.add_argument("--data", nargs="+", default=["normal", "relu"], choices=["normal", "relu"])
    ap.add_argument("--elements", type=int, default=65536,
                    help="elements per case, rounded up to whole chunks (at least 2 chunks)")
    ap.add_argument("--sass", help="JSON of .ci/sass_count.py for these kernels (gives R)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--baseline", default=str(BASELINE), help="JSON of an earlier run to compare against")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()

    ratios = {}
    if args.sass:
        sass = json.loads(Path(args.sass).read_text())[args.arch]
        ratios = {name: k["loop_instructions_per_seen"] for name, k in sass.items()}
    baseline = {}
    if args.baseline and os.path.exists(args.baseline):
        baseline = {key(r): r for r in json.loads(Path(args.baseline).read_text())["results"]}
    simt = load()
    rows = []
    for dtype in args.dtypes:
        for chunk in args.chunks:
            chunks = max(2, -(-args.elements // chunk))
            for gamma in args.gammas:
                for kind in args.data:
                    rows.extend(measure(simt, dtype, chunk, gamma, kind, chunks, ratios))
    print_tables(rows, baseline)
    if args.json:
        meta = {"sass": args.sass, "arch": args.arch, "ratios": ratios, "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
