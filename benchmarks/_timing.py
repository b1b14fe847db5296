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
