"""DistributedDataParallel with DropIT layers: 2 CPU processes, gloo."""

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dropit_cuda as dc
from distributed import WORLD, run_on_two_ranks

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


def test_ddp_two_processes_gloo(tmp_path):
    run_on_two_ranks(_train_and_compare, tmp_path)
