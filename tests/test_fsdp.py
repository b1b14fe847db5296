"""FSDP2 (``fully_shard``) of a converted model: 2 CPU processes on gloo."""

import pytest
import torch
import torch.nn as nn

import dropit_cuda as dc
from distributed import WORLD, run_on_two_ranks

fsdp = pytest.importorskip("torch.distributed.fsdp")


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
    # example_inputs: decided before training (the downs read torch.relu's output, which relu keeps),
    # so that the reference, which runs two forwards per step, matches from the first step
    return m if gamma is None else dc.convert(m, gamma=gamma, example_inputs=_batch(0, 0))


def _batch(step, rank):
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank))


def _train_and_compare(rank):
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


def test_fully_shard_two_processes_gloo(tmp_path):
    # No teardown check: after fully_shard, torch itself (outside Python's reach: gc finds no
    # referrer) keeps the world group, hence gloo's threads, alive past destroy_process_group(),
    # and FSDP2 starts the autograd engine's per-device threads, which live as long as the process.
    run_on_two_ranks(_train_and_compare, tmp_path, timeout=240, check_teardown=False)
