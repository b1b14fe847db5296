"""DistributedDataParallel with DropIT layers: 2 CPU processes, gloo."""

import copy
import gc
import os
import time
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

# Imported before any process group exists, on purpose: torch.distributed.nn (which torch._dynamo
# imports, and DDP imports torch._dynamo) binds `group.WORLD` as a default argument when it is
# first imported. Imported after init_process_group, it keeps the world group alive for good:
# destroy_process_group() then cannot free it, and the worker exits with gloo's threads still
# running, the setting in which a worker once aborted ("terminate called without an active
# exception"). _worker checks that the group is gone before it returns.
import torch._dynamo  # noqa: F401,E402

import dropit_cuda as dc  # built (if JIT) in this process, before two workers load it at once

WORLD = 2
STEPS = 3


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(6 * 8 * 8, 4))
    return dc.convert(m, gamma=0.8, chunk=256)


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)


def _train_and_compare(rank):
    model = _model()
    local = copy.deepcopy(model)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(STEPS):
        x, y = _batch(step, rank)
        local.load_state_dict(model.state_dict())
        local.zero_grad()
        loss_fn(local(x), y).backward()
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()
        for name, lp, p in zip([n for n, _ in model.named_parameters()], local.parameters(), model.parameters()):
            avg = lp.grad.clone()
            dist.all_reduce(avg)
            avg /= WORLD
            torch.testing.assert_close(p.grad, avg, msg=f"step {step}, {name}: DDP grad != mean of DropIT grads")
            assert not torch.equal(lp.grad, avg)  # the ranks' batches differ
        opt.step()
    for name, p in model.named_parameters():
        copies = [torch.empty_like(p) for _ in range(WORLD)]
        dist.all_gather(copies, p.detach())
        assert all(torch.equal(c, copies[0]) for c in copies), f"{name} differs between ranks"
    first = _model()
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), model.parameters()))


def _threads():
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None


def _worker(rank, rendezvous):
    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # both ranks on the loopback interface
    threads_before = _threads()
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    group = weakref.ref(dist.group.WORLD)
    try:
        _train_and_compare(rank)
        dist.barrier()  # neither rank tears its connections down while the other still uses them
    finally:
        gc.collect()  # DDP sits in a reference cycle: free it (and its hold on the group) now
        dist.destroy_process_group()
    gc.collect()
    # The group, its gloo connections and worker threads are gone before this process exits.
    assert group() is None, f"rank {rank}: the process group outlived destroy_process_group()"
    assert _threads() == threads_before, f"rank {rank}: threads {threads_before} -> {_threads()}"


def test_ddp_two_processes_gloo(tmp_path):
    # A file rendezvous in this test's own folder: no port to race for with other test runs on the
    # same machine (a free port picked and released can be taken before rank 0 binds it, and a
    # run that finds another run's store joins the wrong group).
    ctx = mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError("DDP workers did not finish in 180 s")
