"""Tensor and sequence parallelism (DTensor) of a converted model: CPU processes on gloo.

A small transformer-like block (norm, a projection, an MLP, a residual) under the plans of
``torch.distributed.tensor.parallel``, on 2 ranks, and under a 2-D mesh (FSDP2 over one
dimension, tensor parallel over the other) on 4. Checked against the same plan without DropIT
(bit for bit at gamma = 0: loss, every gradient, the collectives run), against the unsharded
plain model (allclose), and at gamma = 0.9 against DropIT done by hand on each rank's local
input (``tests/reference.py``)."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import dropit_cuda as dc
from distributed import run_on_ranks
from reference import reference_unpack

tp = pytest.importorskip("torch.distributed.tensor.parallel")
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402

CHUNK = 16  # small, so that every local input spans several chunks
BATCH, SEQ, HIDDEN = 2, 8, 8
DROPIT = ("proj", "up", "down")  # the linear layers (norm is not converted)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.act = nn.ReLU()
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x):
        return x + self.down(self.act(self.up(self.proj(self.norm(x)))))


def _block(gamma):
    torch.manual_seed(0)
    m = Block()
    return m if gamma is None else dc.convert(m, gamma=gamma, chunk=CHUNK, skip_first=False)


def _plans():
    """name -> (parallelize plan, whether the block's input is sharded on the sequence)."""
    P = tp
    return {
        # Megatron MLP: replicated input, column- then row-sharded weights
        "colwise+rowwise": ({"up": P.ColwiseParallel(), "down": P.RowwiseParallel()}, False),
        # sequence parallel: norm and a replicated-weight projection on sequence shards (their
        # weight gradients are Partial), the MLP all-gathers in and reduce-scatters out; up's
        # output stays a DTensor, so the ReLU runs on one
        "sequence parallel": ({
            "norm": P.SequenceParallel(), "proj": P.SequenceParallel(),
            "up": P.ColwiseParallel(input_layouts=Shard(1), use_local_output=False),
            "down": P.RowwiseParallel(input_layouts=Shard(-1), output_layouts=Shard(1)),
        }, True),
        # row-sharded first: sequence shards all-to-all into feature shards, reduce-scattered out
        "rowwise+colwise, sequence in/out": ({
            "norm": P.SequenceParallel(), "proj": P.SequenceParallel(use_local_output=True),
            "up": P.RowwiseParallel(input_layouts=Shard(1), output_layouts=Shard(1)),
            "down": P.ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(1)),
        }, True),
    }


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _global_batch(step=0):
    return torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(10 + step))


def _shard_of(x, rank, world, sequence):
    if not sequence:
        return x
    n = x.shape[1] // world
    return x[:, rank * n:(rank + 1) * n]


def _capture(block, names=DROPIT):
    """Hooks (registered before parallelize_module, so they see the layers' own DTensor inputs
    and outputs) that record each DropIT layer's local input and output gradient."""
    seen = {}

    def hook(name):
        def fn(module, args, output):
            seen[name] = {"x": _local(args[0]).detach().clone()}
            output.register_hook(lambda g: seen[name].__setitem__("g", _local(g).clone()))
        return fn

    for name in names:
        block.get_submodule(name).register_forward_hook(hook(name))
    return seen


def _dropped(x, gamma):
    """DropIT by hand (the independent NumPy model) on a local tensor: the kept elements of every
    chunk of ``CHUNK`` in memory order, the others zero."""
    bits = reference_unpack(x.contiguous(), gamma, CHUNK)
    return torch.from_numpy(bits.view(np.float32).copy()).view(x.shape)


def _reference_weight_grad(seen, gamma):
    """The weight gradient this rank computes from its dropped local input."""
    x, g = seen["x"], seen["g"]
    x2 = _dropped(x, gamma).reshape(-1, x.shape[-1]).double()
    return (g.reshape(-1, g.shape[-1]).double().t() @ x2).float()


def _cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))


def _train_step(block, x):
    """Forward and backward of the summed square; the loss (summed over ranks by the caller's
    view: each rank's is its own output's), the collectives run, the gradients."""
    with CommDebugMode() as comm:
        loss = block(x).square().sum()
        loss.backward()
    grads = {n: p.grad for n, p in block.named_parameters()}
    return loss.detach(), dict(comm.get_comm_counts()), grads


def _three_runs(parallelize, x):
    """The block plain (key None), converted at gamma 0 and at 0.9, each parallelized by
    ``parallelize`` and trained one step on ``x``: (block, captures, loss, collectives, grads)."""
    runs = {}
    for gamma in (None, 0.0, 0.9):
        block = _block(gamma)
        seen = _capture(block)
        parallelize(block)
        runs[gamma] = (block, seen) + _train_step(block, x)
    return runs


def _check_against_plain_plan(runs, gamma, what, dropit_weight_grad):
    """The run at ``gamma`` against the plain plan's: the same collectives, loss, gradient types and
    placements; the same gradient bits at gamma = 0 and, at 0.9, for everything but the DropIT
    weights, whose gradients (local, plain's) go to ``dropit_weight_grad(name, layer, g, seen)``
    and differ from plain's (covered)."""
    _, _, loss_p, comm_p, grads_p = runs[None]
    block, seen, loss, comm, grads = runs[gamma]
    assert comm == comm_p, f"{what} gamma={gamma}: collectives {comm} vs plain plan {comm_p}"
    assert torch.equal(_local(loss), _local(loss_p)), f"{what} gamma={gamma}: loss"
    for name, g in grads.items():
        gp = grads_p[name]
        assert type(g) is type(gp), f"{what} {name}"
        if isinstance(g, DTensor):
            assert g.placements == gp.placements, f"{what} {name}: {g.placements} vs {gp.placements}"
        layer = name.rsplit(".", 1)[0]
        if gamma == 0.0 or not name.endswith("weight") or layer not in DROPIT:
            # gamma = 0, and every gradient but a DropIT weight's: the plain plan's bits
            assert torch.equal(_local(g), _local(gp)), f"{what} gamma={gamma}: {name}"
        else:
            assert not torch.equal(_local(g), _local(gp)), f"{what}: {name} not covered"
            dropit_weight_grad(name, layer, g, seen[layer])


def _one_d_plans(rank):
    world = 2
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    X = _global_batch()
    for plan_name, (plan, sequence) in _plans().items():
        x = _shard_of(X, rank, world, sequence)
        what = f"{plan_name}, rank {rank}"

        unsharded = _block(None)
        unsharded(X).square().sum().backward()

        def reference(name, layer, g, seen_layer):  # DropIT by hand on this rank's input
            want = _reference_weight_grad(seen_layer, 0.9)
            torch.testing.assert_close(_local(g), want, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{what} gamma=0.9: {name}: {m}")

        runs = _three_runs(lambda block: tp.parallelize_module(block, mesh, plan), x)
        grads_p = runs[None][4]
        for gamma in (0.0, 0.9):
            block, seen, _, _, grads = runs[gamma]
            _check_against_plain_plan(runs, gamma, what, reference)
            if gamma == 0.0:
                for (name, g), q in zip(grads.items(), unsharded.parameters()):
                    full = g.full_tensor() if isinstance(g, DTensor) else g
                    torch.testing.assert_close(full, q.grad, rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{what}: {name} vs unsharded: {m}")

            # report and memory count this rank's bytes; fidelity compares this rank's gradients
            rows = {r.name: r for r in dc.report(block).layers}
            for layer in DROPIT:
                assert rows[layer].calls == 1, f"{what} {layer}"
                assert rows[layer].dense_bytes == seen[layer]["x"].nbytes, f"{what} {layer}"
            fid = {r.name: r for r in dc.fidelity(block, x).layers}
            for layer in DROPIT:
                if gamma == 0.0:
                    assert fid[layer].cosine == 1.0, f"{what} {layer}"
                else:
                    exact = _local(grads_p[f"{layer}.weight"])
                    want = _cosine(_reference_weight_grad(seen[layer], 0.9), exact)
                    assert abs(fid[layer].cosine - want) < 1e-5, f"{what} {layer}: {fid[layer].cosine} vs {want}"

        saved = {g: dc.memory.measure(runs[g][0], x).total_bytes for g in (None, 0.9)}
        assert saved[0.9] < saved[None], f"{what}: {saved}"
        results[plan_name] = {"plain": saved[None], "gamma=0.9": saved[0.9]}
    _other_strategies(rank, mesh)
    _conv_on_batch_shards(rank, mesh)
    _compiled_block(rank, mesh)
    _finish(rank, world, results)


def _other_strategies(rank, mesh):
    """Every strategy, and converting after parallelize_module: at gamma = 0 the plain plan's
    gradients bit for bit, and every DropIT layer cached its (local) input once."""
    plan, sequence = _plans()["sequence parallel"]
    x = _shard_of(_global_batch(), rank, 2, sequence)
    grads = {}
    for how in ("plain", "min_k", "random", "min_k_channel", "random_channel", "converted after"):
        torch.manual_seed(0)
        block = Block()
        if how not in ("plain", "converted after"):
            dc.convert(block, gamma=0.0, strategy=how, chunk=CHUNK, skip_first=False)
        tp.parallelize_module(block, mesh, plan)
        if how == "converted after":
            dc.convert(block, gamma=0.0, chunk=CHUNK, skip_first=False)
        block(x).square().sum().backward()
        grads[how] = {n: _local(p.grad) for n, p in block.named_parameters()}
        if how != "plain":
            assert [r.calls for r in dc.report(block).layers] == [1, 1, 1], how
            for name, g in grads[how].items():
                assert torch.equal(g, grads["plain"][name]), f"rank {rank} {how}: {name}"


def _conv_on_batch_shards(rank, mesh):
    """A convolution on DTensors (replicated weight, batch-sharded input: Partial gradients): the
    plain run's gradients at gamma = 0; at 0.9 the weight gradient of the dropped local input."""
    from torch.distributed.tensor import distribute_module

    def shard_batch(module, inputs, mesh):
        return tuple(DTensor.from_local(t, mesh, [Shard(0)]) for t in inputs)

    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(rank))
    grads, seen = {}, None
    for gamma in (None, 0.0, 0.9):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
        if gamma is not None:
            dc.convert(net, gamma=gamma, chunk=CHUNK, skip_first=False)
        captured = _capture(net, ["0"])
        distribute_module(net, mesh, input_fn=shard_batch)
        net(x).square().sum().backward()
        grads[gamma] = {n: p.grad for n, p in net.named_parameters()}
        seen = captured["0"]
    for gamma in (0.0, 0.9):
        for name, g in grads[gamma].items():
            assert g.placements == grads[None][name].placements, f"rank {rank} conv {name}"
            if gamma == 0.0 or name != "0.weight":
                assert torch.equal(g.to_local(), grads[None][name].to_local()), f"rank {rank} conv {name}"
    want = torch.nn.grad.conv2d_weight(_dropped(seen["x"], 0.9), (4, 3, 3, 3), seen["g"], padding=1)
    torch.testing.assert_close(grads[0.9]["0.weight"].to_local(), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(want, grads[None]["0.weight"].to_local())


def _compiled_block(rank, mesh):
    """torch.compile of the sequence-parallel converted block: one graph (fullgraph), the eager
    converted block's loss and gradients bit for bit. The "aot_eager" backend: AOTAutograd traces
    forward and backward with the DTensors as inductor would be handed them (inductor itself
    works too but takes minutes to build its CPU kernels on 2 cores)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    plan, sequence = _plans()["sequence parallel"]
    x = _shard_of(_global_batch(), rank, 2, sequence)
    runs = {}
    for how in ("plain", "eager", "compiled"):
        block = _block(None if how == "plain" else 0.9)
        tp.parallelize_module(block, mesh, plan)
        fn = block
        if how == "compiled":
            counter = CompileCounterWithBackend("aot_eager")
            fn = torch.compile(block, backend=counter, fullgraph=True)
        loss = fn(x).square().sum()
        loss.backward()
        runs[how] = loss.detach(), {n: p.grad for n, p in block.named_parameters()}
    assert counter.frame_count == 1, counter.frame_count
    (loss_e, grads_e), (loss_c, grads_c) = runs["eager"], runs["compiled"]
    assert torch.equal(_local(loss_c), _local(loss_e)), f"rank {rank}: compiled loss"
    for name, g in grads_c.items():
        assert torch.equal(_local(g), _local(grads_e[name])), f"rank {rank}: compiled {name}"
        if name.endswith("weight") and name.split(".")[0] in DROPIT:  # DropIT ran in the graph
            assert not torch.equal(_local(g), _local(runs["plain"][1][name])), f"rank {rank}: {name}"


def _finish(rank, world, results):
    # no collective left unwaited (the DTensor outputs' async collectives are all consumed)
    assert torch._C._distributed_c10d._get_work_registry_size() == 0, f"rank {rank}"
    if rank == 0 and os.environ.get("DROPIT_TP_RESULTS"):  # the figures of the note
        with open(os.environ["DROPIT_TP_RESULTS"], "a") as f:
            f.write(json.dumps({"ranks": world, "saved_bytes_per_rank": results}) + "\n")


# No check of the group's teardown: after parallelize_module torch itself keeps the world group
# (hence gloo's threads) alive past destroy_process_group(), with a plain model too (checked:
# no Python referrer); the workers must still exit cleanly, with no collective left unwaited.


def test_tensor_and_sequence_parallel_plans_and_compile(tmp_path):
    run_on_ranks(_one_d_plans, tmp_path, world=2, timeout=300, check_teardown=False)


def _two_d_mesh(rank):
    """FSDP2 (fully_shard) over "dp", the sequence-parallel plan over "tp": 2 x 2 ranks."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, tp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
    plan, sequence = _plans()["sequence parallel"]
    batches = [_global_batch(d) for d in range(2)]  # one per data-parallel group
    x = _shard_of(batches[dp], tp_rank, 2, sequence)
    what = f"2-D, rank {rank}"

    unsharded = _block(None)
    for X in batches:
        unsharded(X).square().sum().backward()

    def parallelize(block):
        tp.parallelize_module(block, mesh["tp"], plan)
        fully_shard(block, mesh=mesh["dp"])

    def reference(name, layer, g, seen_layer):
        # DropIT by hand on this rank's local input, averaged over the dp groups by hand
        want = _reference_weight_grad(seen_layer, 0.9)
        torch.distributed.all_reduce(want, group=mesh["dp"].get_group())
        if g.placements[1] == Replicate():  # proj: a replicated weight on sequence shards,
            torch.distributed.all_reduce(want, group=mesh["tp"].get_group())  # summed by FSDP2
        got = g.redistribute(g.device_mesh, [Replicate(), g.placements[1]]).to_local()
        torch.testing.assert_close(got, want / 2, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what} gamma=0.9: {name}: {m}")

    runs = _three_runs(parallelize, x)
    for gamma in (0.0, 0.9):
        block, seen, _, _, grads = runs[gamma]
        _check_against_plain_plan(runs, gamma, what, reference)
        if gamma == 0.0:  # FSDP2 averages over the data-parallel groups
            for (name, g), q in zip(grads.items(), unsharded.parameters()):
                torch.testing.assert_close(g.full_tensor(), q.grad / 2, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{what}: {name} vs unsharded: {m}")
        rows = {r.name: r for r in dc.report(block).layers}
        for layer in DROPIT:
            assert rows[layer].dense_bytes == seen[layer]["x"].nbytes, f"{what} {layer}"
    saved = {g: dc.memory.measure(runs[g][0], x).total_bytes for g in (None, 0.9)}
    assert saved[0.9] < saved[None], f"{what}: {saved}"
    _finish(rank, 4, {"2-D: FSDP2 x sequence parallel": {"plain": saved[None], "gamma=0.9": saved[0.9]}})


def test_fsdp2_by_tensor_parallel_mesh(tmp_path):
    # no teardown check: see above (and FSDP2 keeps the group alive too, tests/test_fsdp.py)
    run_on_ranks(_two_d_mesh, tmp_path, world=4, timeout=300, check_teardown=False)
