"""FSDP2 (``fully_shard``) of a converted model: 2 CPU processes on gloo."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import dropit_cuda as dc  # built (if JIT) in this process, before two workers load it at once

fsdp = pytest.importorskip("torch.distributed.fsdp")
WORLD = 2


def _model(gamma):
    """A small transformer-like stack: an input layer, three residual MLP blocks, a head."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.up = nn.Linear(16, 32)
            self.down = nn.Linear(32, 16)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(self.norm(x))))

    m = nn.Sequential(nn.Linear(8, 16), Block(), Block(), Block(), nn.Linear(16, 4))
    return m if gamma is None else dc.convert(m, gamma=gamma)


def _batch(step, rank):
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank))


def _worker(rank, port):
    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        for gamma, reference in ((0.0, None), (0.9, 0.9)):
            model = _model(gamma)
            for block in list(model)[1:4]:
                fsdp.fully_shard(block, mesh=mesh)
            fsdp.fully_shard(model, mesh=mesh)
            unsharded = _model(reference)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            ref_opt = torch.optim.SGD(unsharded.parameters(), lr=0.1)
            for step in range(2):
                opt.zero_grad()
                model(_batch(step, rank)).square().mean().backward()
                ref_opt.zero_grad()
                for r in range(WORLD):  # the unsharded model sees both ranks' batches
                    unsharded(_batch(step, r)).square().mean().backward()
                for (name, p), q in zip(model.named_parameters(), unsharded.parameters()):
                    got, want = p.grad.full_tensor(), q.grad / WORLD
                    # gamma=0: exactly the plain model's; gamma=0.9: exactly the unsharded DropIT model's
                    assert torch.equal(got, want), f"gamma={gamma} step {step} {name}"
                opt.step()
                for q in unsharded.parameters():
                    q.grad /= WORLD
                ref_opt.step()
            covered = {r.name for r in dc.report(model).layers if r.calls}
            assert covered == {"1.up", "1.down", "2.up", "2.down", "3.up", "3.down", "4"}, covered
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fully_shard_two_processes_gloo():
    ctx = mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError("FSDP workers did not finish in 240 s")
