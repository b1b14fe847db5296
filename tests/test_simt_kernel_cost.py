"""benchmarks/bench_kernel_cost.py: end to end on a small case (the global traffic is what the
kernels' design says it is), and the cost model's arithmetic on a made-up kernel."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_cost_bench(tmp_path):
    D, gamma = 4096, 0.9
    out = tmp_path / "cost.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kernel_cost.py"), "--dtypes", "float32", "--chunks", str(D),
         "--gammas", str(gamma), "--data", "normal", "--elements", str(2 * D), "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = {r["op"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"pack", "unpack"}
    keep = D - math.floor(gamma * D)
    for r in rows.values():
        e, c = r["per_element"], r["per_chunk"]
        assert r["numel"] == 2 * D and e["modelled_warp_instructions"] is None  # no SASS given
        for name, v in e.items():  # per element and per chunk are the same counts
            if v is not None:
                assert abs(v * r["numel"] - c[name] * 2) <= 1e-6 * max(1.0, abs(v * r["numel"]))
        assert e["seen_warp_instructions"] > 0 and c["barriers"] > 0
    # Pack reads each input element once from global memory (the chunk is staged in shared memory)
    # and writes the kept values and the bitmap words; unpack the reverse.
    pack, unpack = rows["pack"]["per_chunk"], rows["unpack"]["per_chunk"]
    assert pack["global_bytes_read"] == 4 * D
    assert pack["global_bytes_written"] == 4 * keep + 4 * (D // 32)
    assert unpack["global_bytes_read"] == 4 * keep + 4 * (D // 32)
    assert unpack["global_bytes_written"] == 4 * D
    assert "today's kernels" in run.stdout  # the recorded baseline is shown beside


def load_bench():
    """benchmarks/bench_kernel_cost.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_kernel_cost", ROOT / "benchmarks" / "bench_kernel_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_model_arithmetic():
    bench = load_bench()
    # A kernel of 60 instructions: one loop of two blocks (12 and 8 instructions) holding two loads
    # and a vote; a peeled copy of the load and a shuffle outside it.
    kernel = {
        "instructions": 60, "seen_instructions": 5,
        "innermost_loops": [{"size": 20, "seen": {"global load": 2, "vote": 1}, "blocks": [12, 8]}],
        "seen_list": [["global load", ["pack.cuh:10"], 0, 0], ["global load", ["pack.cuh:10"], 0, 0],
                      ["vote", ["pack.cuh:12"], 0, 1], ["global load", ["pack.cuh:10"], -1, -1],
                      ["shuffle", ["bitmap.cuh:38", "pack.cuh:30"], -1, -1]],
    }
    # Host sites: the load attributed to line 11 (the SASS says 10), the vote, the shuffle.
    stats = {k: 0 for k in bench.SEEN}
    stats.update(global_load_instr=100, ballots=10, shuffles=7, barrier_warps=3)
    stats["sites"] = [(1, "global load", 100), (2, "vote", 10), (3, "shuffle", 7)]
    chains = {1: ("pack.cuh:11",), 2: ("pack.cuh:12",), 3: ("bitmap.cuh:38", "pack.cuh:30")}
    model, share = bench.modelled_instructions(stats, kernel, chains)
    # The loads go to the two copies in the loop (50 runs each): block 0 runs 50 times, block 1
    # (the vote) 10 times: 12*50 + 8*10 = 680. Outside the loops: the shuffle and the barriers,
    # 120 seen - 110 in loops = 10, at (60 - 20) / (5 - 3) = 20 instructions each: 200.
    assert model == 680 + 200
    assert share == 1.0
    # The same, part by part: the loop, then outside the loops.
    parts, _ = bench.model_parts(stats, kernel, chains)
    assert [cost for _, cost in parts] == [680, 200]


def test_model_charges_warp_barriers_as_the_sass_has_them():
    bench = load_bench()
    # 50 instructions, no loop, two seen ones (a shuffle, a load): 25 instructions per seen one.
    kernel = {"instructions": 50, "seen_instructions": 2, "innermost_loops": [],
              "seen_list": [["shuffle", ["bitmap.cuh:38"], -1, -1], ["shared load", ["pack.cuh:9"], -1, -1]]}
    stats = {k: 0 for k in bench.SEEN}
    stats.update(shuffles=4, warp_syncs=3)
    stats["sites"] = [(1, "shuffle", 4)]
    chains = {1: ("bitmap.cuh:38",)}
    # No WARPSYNC in the SASS (a converged __syncwarp: BRA.DIV, counted in the 50, and a NOP the
    # counter drops): the 4 shuffles at 25 each, the 3 warp barriers at 1 each.
    parts, _ = bench.model_parts(stats, kernel, chains)
    assert [cost for _, cost in parts] == [100, 3]
    # A WARPSYNC in the SASS is a seen instruction like any other: the barriers at the ratio,
    # (50 - 0) / 3 per seen one.
    kernel["seen_instructions"] = 3
    kernel["seen_list"].append(["warp barrier", ["pack.cuh:20"], -1, -1])
    parts, _ = bench.model_parts(stats, kernel, chains)
    assert [cost for _, cost in parts] == [7 * 50 / 3]
