"""Cost model of the CUDA pack and unpack kernels, measured on the CPU.

The host SIMT layer (tests/simt/) runs the kernels' own source and counts, per launch: global
bytes read and written (distinct bytes per warp instruction: lanes reading one word count it
once; and the 32-byte sectors the warp instructions touch), shared-memory loads, stores and
atomics (lane accesses, warp instructions, and wavefronts: the passes bank conflicts add), block
and warp barriers and warp collectives (ballots, shuffles, matches, reductions). The layer sees
these operations only; it groups each warp's lanes into warp instructions by assuming lockstep
(the n-th execution of an access site by each lane is one warp instruction).

Modelled warp instructions (with --sass, the JSON of `.ci/sass_count.py` for these kernels,
sm_90 by default):
- the host layer's sites (each access or warp intrinsic of the kernel body, with its warp
  instructions) are matched to the seen SASS instructions (global and shared accesses, warp
  collectives and barriers) of the same class and chain of kernel-header source lines (the
  host build carries line tables for this), the innermost line within 4 (see
  assign_executions), and their warp instructions shared among them;
- each basic block of an innermost SASS loop runs as often as its most executed class of seen
  instructions (the class's executions over its instructions in the block: compilers may put an
  instruction on the next source line); a block without seen instructions, as often as the
  loop's most run block; each costs its size (its instructions, as nvcc compiled them) per run;
- the seen instructions outside those loops (setup, scans, barriers, and any the matching
  missed) cost the static ratio of the code outside the loops per seen instruction; but a warp
  barrier costs one instruction (its NOP) where the SASS has no WARPSYNC in the kernel's main
  code (a converged __syncwarp is a BRA.DIV check, already among the code outside the loops,
  and a NOP, which the SASS counter drops);
- plus replays: the passes bank conflicts add to shared accesses (wavefronts beyond one per 128
  bytes moved; an atomic's lanes on one bank take a pass each, same address or not).
It cannot see: branches around blocks with no seen instruction (such a block counts every run of
its loop), lanes that skip work (they still occupy the warp's issue slots), latency, stalls and
memory bandwidth. The
share of the host's seen instructions matched to SASS is printed: the model is only as good as
that share.

    python .ci/sass_count.py --json sass.json <pack_cuda.o or the built _C*.so>
    python benchmarks/bench_kernel_cost.py --sass sass.json --json cost.json
    python benchmarks/bench_kernel_cost.py --dtypes float32 --chunks 16384 --gammas 0.9

Cases: float32 and bfloat16, D = 1024 / 16384 / 65536, gamma = 0.5 and 0.9, and the data of
``data()``: normal, ReLU-like, misaligned (a view one element into its storage) and tie-heavy (a
constant column on the threshold). Today's kernels' figures (recorded before the redesign) are
read from --baseline, the previous version's (issue 13's kernels, recorded with this script) from
--previous, issue 21's first step (one block per chunk at every D) from --earlier, and shown beside
the new ones, then the issue's targets (misaligned, tie-heavy and
D = 1024 against normal data at D = 16384).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
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
PREVIOUS = ROOT / "benchmarks" / "results" / "kernel_cost_issue13.json"
EARLIER = ROOT / "benchmarks" / "results" / "kernel_cost_issue21_session1.json"
SEEN = ["global_load_instr", "global_store_instr", "shared_load_instr", "shared_store_instr",
        "shared_atomic_instr", "async_copy_instr", "ballots", "shuffles", "matches", "reductions", "warp_syncs",
        "barrier_warps"]


DATA = ["normal", "relu", "misaligned", "ties"]


def data(kind: str, n: int, dtype: torch.dtype, seed: int, chunk: int, gamma: float) -> torch.Tensor:
    """``normal``: standard normal; ``relu``: ReLU of it (half zeros); ``misaligned``: normal data
    in a view one element into its storage (no chunk starts on a 16-byte boundary); ``ties``: a
    64-column normal matrix (flattened) whose column 3 holds, in each chunk, one magnitude just above
    the chunk's keep-th largest among the rest: the threshold falls among D/64 tied keys, which all
    land on the same lanes of every warp."""
    if kind == "misaligned":
        return data("normal", n + 1, dtype, seed, chunk, gamma)[1:]
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if kind == "relu":
        x = x.clamp_min(0)
    if kind == "ties":
        cols, keep = 64, chunk - math.floor(gamma * chunk)
        assert chunk % cols == 0 and n % chunk == 0, "ties: whole chunks of whole rows"
        m = x.to(dtype).double().view(n // chunk, chunk // cols, cols)
        others = torch.cat([m[:, :, :3], m[:, :, 4:]], dim=2).abs().flatten(1)
        m[:, :, 3] = others.sort(dim=1, descending=True).values[:, max(0, keep - 100)].unsqueeze(1)
        x = m.flatten()
    return x.to(dtype)


def kernel_name(op: str, elem_bytes: int, source: str = "", per_warp: bool = False) -> str:
    """The kernel's short name as .ci/sass_count.py prints it (pack: a chunk per block, or per warp)."""
    bits = BITS[elem_bytes]
    if op == "pack":
        key = "u32" if source == "random" else bits
        return f"void {'pack_warps_kernel' if per_warp else 'pack_kernel'}<{bits}, {key}, {source.capitalize()}>"
    return f"void unpack_bitmap_kernel<{bits}>"


def site_chains(module, addresses) -> dict[int, tuple]:
    """Each site address (a return address in the host build of the kernels) as its chain of
    kernel-header source lines, innermost first, as .ci/sass_count.py gives them for SASS."""
    path = os.path.realpath(module.__file__)
    base = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and os.path.realpath(fields[5]) == path and int(fields[2], 16) == 0:
                base = int(fields[0].split("-")[0], 16)
                break
    if base is None or not addresses:
        return {}
    addrs = sorted(set(addresses))
    # The call instruction is just before the return address.
    out = subprocess.run(["addr2line", "-e", path, "-f", "-i", "-p", "-a"] + [hex(a - base - 1) for a in addrs],
                         capture_output=True, text=True, check=True).stdout
    chains, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"^0x([0-9a-f]+): (.*)$", line)
        if m:
            cur = int(m.group(1), 16) + base + 1
            chains[cur] = []
            rest = m.group(2)
        else:
            rest = line.strip()
        loc = re.search(r" at (\S+):(\d+)", rest)
        if cur is not None and loc:
            f = loc.group(1)
            if f.endswith(".cuh") and os.path.basename(f) != "simt.cuh":
                chains[cur].append(f"{os.path.basename(f)}:{loc.group(2)}")
    return {a: tuple(c) for a, c in chains.items()}


def assign_executions(stats: dict, kernel: dict, chains: dict) -> tuple[list, float]:
    """The host's warp instructions spread over the kernel's seen SASS instructions, and the share
    of them that found SASS instructions.

    A site goes to the SASS instructions of its class whose chain of source lines equals its own
    but for the innermost line, which may differ by up to 4 (nvcc attributes an instruction to
    any line of its statement, after scheduling): those inside innermost loops if any (copies
    outside are a loop's peeled runs), of those the nearest lines."""
    by_place = {}
    for idx, (cls, chain, loop, _) in enumerate(kernel["seen_list"]):
        if chain:
            f, line = chain[0].rsplit(":", 1)
            by_place.setdefault((cls, f, tuple(chain[1:])), []).append((int(line), loop >= 0, idx))
    runs = [0.0] * len(kernel["seen_list"])
    assigned = total = 0
    for address, kind, count in stats["sites"]:
        total += count
        chain = chains.get(address, ())
        if not chain:
            continue
        f, line = chain[0].rsplit(":", 1)
        cands = [c for c in by_place.get((kind, f, tuple(chain[1:])), []) if abs(c[0] - int(line)) <= 4]
        if not cands:
            continue
        if any(c[1] for c in cands):
            cands = [c for c in cands if c[1]]
        nearest = min(abs(c[0] - int(line)) for c in cands)
        cands = [c for c in cands if abs(c[0] - int(line)) == nearest]
        for _, _, idx in cands:
            runs[idx] += count / len(cands)
        assigned += count
    return runs, (assigned / total if total else 1.0)


def model_parts(stats: dict, kernel: dict, chains: dict) -> tuple[list[tuple[str, float]], float]:
    """The modelled warp instructions (without replays) part by part: each innermost loop (labelled
    by its SASS address and source lines) and "outside the loops" (the seen instructions there at
    the static ratio); and the share of the seen instructions matched."""
    runs, share = assign_executions(stats, kernel, chains)
    loops = kernel["innermost_loops"]
    # Per basic block and class: the executions of its seen instructions over their number there.
    runs_by_class, count_by_class = Counter(), Counter()
    in_loops_matched = 0.0
    for (cls, _, loop, block), r in zip(kernel["seen_list"], runs):
        if loop >= 0:
            runs_by_class[(loop, block, cls)] += r
            count_by_class[(loop, block, cls)] += 1
            in_loops_matched += r
    block_runs = {}
    for (loop, block, cls), n in count_by_class.items():
        block_runs[(loop, block)] = max(block_runs.get((loop, block), 0.0), runs_by_class[(loop, block, cls)] / n)
    parts = []
    for li, lp in enumerate(loops):
        loop_runs = max((r for (l, _), r in block_runs.items() if l == li), default=0.0)
        cost = sum(size * block_runs.get((li, b), loop_runs) for b, size in enumerate(lp["blocks"]))
        parts.append((f"loop {lp.get('start', li)} {lp.get('lines', '')} ({lp['size']} instr.)", cost))
    loop_seen_static = sum(sum(lp["seen"].values()) for lp in loops)
    rest_ratio = (kernel["instructions"] - sum(lp["size"] for lp in loops)) / max(
        1, kernel["seen_instructions"] - loop_seen_static)
    seen = sum(stats[k] for k in SEEN)
    # Where the SASS has no warp-barrier instruction, nvcc compiled each converged __syncwarp to a
    # BRA.DIV check (counted among the instructions outside the loops) and a NOP (dropped by the
    # counter): the host's warp barriers then cost their NOP each, not the outside ratio.
    warp_nops = 0.0
    if not any(cls == "warp barrier" for cls, *_ in kernel["seen_list"]):
        warp_nops = float(stats.get("warp_syncs", 0))
        seen -= warp_nops
    outside = max(0.0, seen - in_loops_matched)
    parts.append((f"outside the loops ({rest_ratio:.2f} instr. per seen one)", outside * rest_ratio))
    if warp_nops:
        parts.append(("warp barriers (a NOP each: no WARPSYNC in the SASS)", warp_nops))
    return parts, share


def modelled_instructions(stats: dict, kernel: dict, chains: dict) -> tuple[float, float]:
    """(modelled warp instructions without replays, share of the seen instructions matched)."""
    parts, share = model_parts(stats, kernel, chains)
    return sum(cost for _, cost in parts), share


def summarise(stats: dict, n: int, chunks: int, model: tuple[float, float] | None) -> dict:
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
        "warp_collectives": stats["ballots"] + stats["shuffles"] + stats["matches"] + stats["reductions"]
        + stats.get("warp_syncs", 0),
        "seen_warp_instructions": seen, "shared_replays": replays,
        "modelled_warp_instructions": None if model is None else model[0] + replays,
    }
    return {
        "per_element": {k: (v / n if v is not None else None) for k, v in out.items()},
        "per_chunk": {k: (v / chunks if v is not None else None) for k, v in out.items()},
        "matched_share": None if model is None else model[1],
    }


def measure(simt, dtype: str, chunk: int, gamma: float, kind: str, chunks: int, sass: dict) -> list[dict]:
    n = chunk * chunks
    x = data(kind, n, DTYPES[dtype], seed=chunk, chunk=chunk, gamma=gamma)
    es = x.element_size()
    plan = simt.pack_plan(n, gamma, chunk, es)
    values, index = simt.pack(x, gamma, chunk, True, profile=True)
    pack_stats = simt.last_stats()
    ref = torch.ops.dropit_cuda.pack(x, gamma, chunk, True, None)
    assert torch.equal(values.view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(index, ref[1])
    simt.unpack(values, index, n, gamma, chunk, True, profile=True)
    unpack_stats = simt.last_stats()
    rows = []
    for op, stats, name in (("pack", pack_stats, kernel_name("pack", es, plan["source"], plan["per_warp"])),
                            ("unpack", unpack_stats, kernel_name("unpack", es))):
        row = {"op": op, "dtype": dtype, "chunk": chunk, "gamma": gamma, "data": kind, "numel": n,
               "kernel": name, "threads": plan["threads"] if op == "pack" else None,
               "per_warp": plan["per_warp"] if op == "pack" else None}
        model, parts = None, []
        if name in sass:
            chains = site_chains(simt, [address for address, _, _ in stats["sites"]])
            parts, share = model_parts(stats, sass[name], chains)
            model = (sum(cost for _, cost in parts), share)
        row.update(summarise(stats, n, chunks, model))
        # Where the modelled instructions go, per 32 elements (the parts above 0.05, and replays).
        row["modelled_parts_per_32"] = {label: 32 * cost / n for label, cost in parts if 32 * cost / n >= 0.05}
        if parts:
            row["modelled_parts_per_32"]["bank-conflict passes"] = 32 * stats["shared_conflict_passes"] / n
        rows.append(row)
    return rows


def key(r: dict) -> tuple:
    return (r["op"], r["dtype"], r["chunk"], r["gamma"], r["data"])


def fmt(v, width=7, digits=2) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


CASE = f"{'op':6} {'dtype':8} {'D':>6} {'gamma':>5} {'data':6}"


def case(r: dict) -> str:
    return f"{r['op']:6} {r['dtype']:8} {r['chunk']:>6} {r['gamma']:>5} {r['data']:6}"


def modelled_per_32(r: dict | None) -> float | None:
    """Modelled warp instructions per 32 elements of a row (None without SASS or row)."""
    v = r["per_element"]["modelled_warp_instructions"] if r else None
    return None if v is None else 32 * v


def print_tables(rows: list[dict], baseline: dict[tuple, dict], previous: dict[tuple, dict],
                 earlier: dict[tuple, dict]) -> None:
    print("Per element (global bytes; shared accesses by lanes; warp instructions):")
    print(f"{CASE} | {'B read':>7} {'B writ':>7} | {'sh ld':>6} {'sh st':>6} {'atom':>6} | {'seen':>6} {'model':>7}")
    for r in rows:
        e = r["per_element"]
        print(f"{case(r)} | {fmt(e['global_bytes_read'])} {fmt(e['global_bytes_written'])} | "
              f"{fmt(e['shared_loads'], 6)} {fmt(e['shared_stores'], 6)} {fmt(e['shared_atomics'], 6)} | "
              f"{fmt(e['seen_warp_instructions'], 6, 3)} {fmt(e['modelled_warp_instructions'], 7, 3)}")
    print("\nPer chunk (block barriers, warp collectives, shared wavefronts, 32-byte sectors, warp instructions,"
          " share of them matched to SASS):")
    print(f"{CASE} | {'barrier':>7} {'collect':>8} {'wavefr':>8} {'sectors':>8} | {'seen':>8} {'model':>9} "
          f"{'matched':>7}")
    for r in rows:
        c = r["per_chunk"]
        print(f"{case(r)} | {fmt(c['barriers'], 7, 0)} {fmt(c['warp_collectives'], 8, 0)} "
              f"{fmt(c['shared_wavefronts'], 8, 0)} {fmt(c['global_sectors'], 8, 0)} | "
              f"{fmt(c['seen_warp_instructions'], 8, 0)} {fmt(c['modelled_warp_instructions'], 9, 0)} "
              f"{fmt(r['matched_share'], 7, 2)}")
    if not (baseline or previous or earlier):
        return
    print("\nModelled warp instructions per 32 elements: today's kernels (baseline, before the redesign), the"
          " previous version (issue 13's), issue 21's first step (earlier) and these:")
    print(f"{CASE} | {'baseline':>8} {'previous':>8} {'earlier':>8} {'now':>7}")
    for r in rows:
        print(f"{case(r)} | {fmt(modelled_per_32(baseline.get(key(r))), 8, 1)} "
              f"{fmt(modelled_per_32(previous.get(key(r))), 8, 1)} "
              f"{fmt(modelled_per_32(earlier.get(key(r))), 8, 1)} {fmt(modelled_per_32(r), 7, 1)}")


def print_breakdown(rows: list[dict]) -> None:
    """Each row's modelled warp instructions per 32 elements, loop by loop."""
    for r in rows:
        if r.get("modelled_parts_per_32"):
            print(f"\n{case(r)} ({r['kernel']}): {modelled_per_32(r):.1f} modelled warp instructions per 32 elements")
            for label, v in sorted(r["modelled_parts_per_32"].items(), key=lambda kv: -kv[1]):
                print(f"  {v:6.2f}  {label}")


def print_targets(rows: list[dict]) -> None:
    """The issue's targets where the rows hold their cases: D = 16384, gamma = 0.9, per 32
    elements, and the misaligned, tie-heavy and D = 1024 cases against normal data at D = 16384."""
    by = {key(r): r for r in rows}
    lines = []
    for op in ("pack", "unpack"):
        for dtype in DTYPES:
            ref = modelled_per_32(by.get((op, dtype, 16384, 0.9, "normal")))
            if ref is None:
                continue
            parts = [f"{op:6} {dtype:8} D=16384 normal {ref:6.1f}"]
            for label, k in (("misaligned", (op, dtype, 16384, 0.9, "misaligned")),
                             ("ties", (op, dtype, 16384, 0.9, "ties")),
                             ("D=1024", (op, dtype, 1024, 0.9, "normal"))):
                v = modelled_per_32(by.get(k))
                if v is not None:
                    parts.append(f"{label} {v:6.1f} ({v / ref:.2f}x)")
            lines.append(" | ".join(parts))
    if lines:
        print("\nTargets (gamma = 0.9, modelled warp instructions per 32 elements; ratios against normal data at"
              " D = 16384):")
        print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--chunks", nargs="+", type=int, default=[1024, 16384, 65536], help="chunk sizes D")
    ap.add_argument("--gammas", nargs="+", type=float, default=[0.5, 0.9])
    ap.add_argument("--data", nargs="+", default=DATA, choices=DATA)
    ap.add_argument("--elements", type=int, default=65536,
                    help="elements per case, rounded up to whole chunks (at least 2 chunks)")
    ap.add_argument("--sass", help="JSON of .ci/sass_count.py for these kernels (gives R)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--baseline", default=str(BASELINE), help="JSON of an earlier run to compare against")
    ap.add_argument("--previous", default=str(PREVIOUS),
                    help="JSON of the kernels before this version (issue 13's), shown beside too")
    ap.add_argument("--earlier", default=str(EARLIER),
                    help="JSON of issue 21's first step (a block per chunk at every D), shown beside too")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--breakdown", action="store_true",
                    help="with --sass: each case's modelled instructions loop by loop (SASS address and lines)")
    args = ap.parse_args()

    sass = json.loads(Path(args.sass).read_text())[args.arch] if args.sass else {}
    baseline, previous, earlier = (
        {key(r): r for r in json.loads(Path(f).read_text())["results"]} if f and os.path.exists(f) else {}
        for f in (args.baseline, args.previous, args.earlier))
    simt = load(debug_info=bool(sass))  # line tables, to match the profile's sites to SASS
    rows = []
    for dtype in args.dtypes:
        for chunk in args.chunks:
            chunks = max(2, -(-args.elements // chunk))
            for gamma in args.gammas:
                for kind in args.data:
                    rows.extend(measure(simt, dtype, chunk, gamma, kind, chunks, sass))
    print_tables(rows, baseline, previous, earlier)
    if args.breakdown:
        print_breakdown(rows)
    print_targets(rows)
    if args.json:
        meta = {"sass": args.sass, "arch": args.arch, "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
