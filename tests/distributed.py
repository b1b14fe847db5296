"""Running a test body in 2 (or 4) CPU processes on gloo, and leaving nothing of gloo behind."""

import gc
import os
import time
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported before any process group exists, on purpose: torch.distributed.nn (which torch._dynamo
# imports, and DDP imports torch._dynamo) binds `group.WORLD` as a default argument when it is
# first imported. Imported after init_process_group, it keeps the world group alive for good:
# destroy_process_group() then cannot free it, and the worker exits with gloo's threads still
# running, the setting in which a worker once aborted ("terminate called without an active
# exception"). _worker checks that the group is gone before it returns.
import torch._dynamo  # noqa: F401,E402

import dropit_cuda  # noqa: F401,E402  built (if JIT) in this process, before two workers load it at once

WORLD = 2  # the default number of ranks


def _threads():
    """The names of this process's threads (Linux), sorted; None where /proc is missing."""
    if not os.path.isdir("/proc/self/task"):
        return None
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended while we looked
            pass
    return sorted(names)


def _worker(rank, body, rendezvous, check_teardown, world):
    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # all ranks on the loopback interface
    threads_before = _threads()
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    group = weakref.ref(dist.group.WORLD)
    try:
        body(rank)
        dist.barrier()  # neither rank tears its connections down while the other still uses them
    finally:
        gc.collect()  # DDP sits in a reference cycle: free it (and its hold on the group) now
        dist.destroy_process_group()
    gc.collect()
    # The group, its gloo connections and worker threads are gone before this process exits.
    if check_teardown:
        assert group() is None, f"rank {rank}: the process group outlived destroy_process_group()"
        assert _threads() == threads_before, f"rank {rank}: threads {threads_before} -> {_threads()}"


def run_on_ranks(body, tmp_path, world: int = WORLD, timeout: float = 180.0,
                 check_teardown: bool = True) -> None:
    """Runs ``body(rank)`` (a module-level function) in ``world`` processes joined in a gloo group
    and, with ``check_teardown``, checks that the group object and gloo's threads are gone when
    the worker returns.

    A file rendezvous in the test's own folder: no port to race for with other test runs on the
    same machine (a free port picked and released can be taken before rank 0 binds it, and a run
    that finds another run's store joins the wrong group)."""
    ctx = mp.spawn(_worker, args=(body, str(tmp_path / "rendezvous"), check_teardown, world), nprocs=world,
                   join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"workers did not finish in {timeout:.0f} s")


def run_on_two_ranks(body, tmp_path, timeout: float = 180.0, check_teardown: bool = True) -> None:
    """:func:`run_on_ranks` on 2 ranks."""
    run_on_ranks(body, tmp_path, 2, timeout, check_teardown)
