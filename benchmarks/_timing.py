"""Timing shared by the kernel benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call.

    On the CPU this is process CPU time (all threads), not wall time: on a shared machine the
    wall clock also counts the time other processes hold the cores, which is noise for both sides
    of a ratio. On CUDA it is the time between two events on the stream.
    """
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.process_time()
            fn()
            samples.append((time.process_time() - t0) * 1e3)
    return statistics.median(samples)
