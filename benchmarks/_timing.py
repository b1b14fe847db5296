"""Timing shared by the kernel benchmarks: wall-clock medians, measured round robin."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping

import torch


@dataclass(frozen=True)
class Case:
    """One timed operation: ``fn`` run with ``threads`` CPU intra-op threads (None: as set)."""

    fn: Callable[[], object]
    threads: int | None = None


@dataclass(frozen=True)
class Timing:
    wall_ms: float          # median wall-clock time of one call (CUDA: events on the stream)
    cpu_ms: float | None    # median process CPU time of one call, all threads (CPU only)


def measure(cases: Mapping[Hashable, Case], device: torch.device, repeats: int) -> dict[Hashable, Timing]:
    """Median times of every case over ``repeats`` rounds, after one warm-up round.

    Each round runs every case once, in turn, so that a change in the machine's load (other
    processes share it) falls on every case alike instead of on whichever ran last. The thread
    count is set before a call, outside its timed span.
    """
    wall: dict[Hashable, list[float]] = {key: [] for key in cases}
    cpu: dict[Hashable, list[float]] = {key: [] for key in cases}
    before = torch.get_num_threads()
    try:
        for rnd in range(repeats + 1):
            for key, case in cases.items():
                if case.threads is not None:
                    torch.set_num_threads(case.threads)
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    case.fn()
                    end.record()
                    torch.cuda.synchronize()
                    w, c = start.elapsed_time(end), None
                else:
                    c0, w0 = time.process_time(), time.perf_counter()
                    case.fn()
                    w, c = (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3
                if rnd:  # round 0 warms up
                    wall[key].append(w)
                    cpu[key].append(c)
    finally:
        torch.set_num_threads(before)
    return {
        key: Timing(statistics.median(wall[key]), None if device.type == "cuda" else statistics.median(cpu[key]))
        for key in cases
    }


def time_ops(fns: Mapping[str, Callable[[], object]], device: torch.device, repeats: int,
             threads: list[int]) -> dict[int | None, dict[str, float | None]]:
    """Every op under every thread count, round robin (see ``measure``). Per thread count (on
    CUDA one entry, None: threads don't apply): ``<op>_ms`` (wall clock) and ``<op>_cpu_ms``."""
    counts: list[int | None] = list(threads) if device.type == "cpu" else [None]
    times = measure({(op, t): Case(fn, t) for t in counts for op, fn in fns.items()}, device, repeats)
    return {
        t: {f"{op}{suffix}": value for op in fns
            for suffix, value in (("_ms", times[(op, t)].wall_ms), ("_cpu_ms", times[(op, t)].cpu_ms))}
        for t in counts
    }


def thread_scaling(rows: list[dict], ops: tuple[str, ...]) -> list[dict]:
    """How much faster each op ran with each thread count than with the first one measured, per
    device and dtype: from rows with ``device``, ``dtype``, ``threads`` and ``<op>_ms``."""
    scaling = []
    for r in rows:
        base = next(b for b in rows if (b["device"], b["dtype"]) == (r["device"], r["dtype"]))
        if base is r or r["threads"] is None:
            continue
        for op in ops:
            scaling.append({"device": r["device"], "dtype": r["dtype"], "op": op,
                            "from_threads": base["threads"], "to_threads": r["threads"],
                            "speedup": base[f"{op}_ms"] / r[f"{op}_ms"]})
    return scaling


def print_scaling(scaling: list[dict]) -> None:
    for s in scaling:
        print(f"{s['device']} {s['dtype']}: {s['op']} {s['to_threads']} threads vs {s['from_threads']}: "
              f"{s['speedup']:.2f}x faster (wall clock)")


def thread_counts(text: str) -> list[int]:
    """``--threads`` values: a comma-separated list of positive counts, e.g. ``1,2``."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads takes counts like 1,2; got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--threads counts must be >= 1; got {text!r}")
    return counts


def machine_load() -> str:
    """The 1/5/15-minute load averages, to print beside every CPU figure."""
    if not hasattr(os, "getloadavg"):
        return "load unknown"
    return "load average %.2f, %.2f, %.2f on %d CPUs" % (*os.getloadavg(), os.cpu_count() or 0)
