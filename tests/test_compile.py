"""torch.compile (default inductor backend, CPU) of a converted model matches eager."""

import copy

import torch
import torch.nn as nn

import dropit_cuda as dc


def test_compiled_converted_model_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 3)
    )
    plain = copy.deepcopy(model)
    dc.convert(model, gamma=0.5, chunk=32, skip_first=False,
               strategy={"0": "min_k", "5": "min_k_channel"})  # the others: parallel_min_k
    assert [r.strategy for r in dc.report(model).layers] == ["min_k", "parallel_min_k", "min_k_channel"]
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)  # no graph break through the DropIT functions
    x = torch.randn(2, 3, 6, 6)

    out = compiled(x)
    out.square().sum().backward()
    want = eager(x)
    want.square().sum().backward()
    ref = plain(x)
    ref.square().sum().backward()

    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out, ref)  # the forward is exact
    for p, q, r in zip(model.parameters(), eager.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert dc.report(model).compiled and dc.report(model).forwards == 0  # compiled: no stats
    # the compiled backward really used the compressed inputs
    for i in (0, 3, 5):
        assert not torch.allclose(model[i].weight.grad, plain[i].weight.grad)


def test_compiled_random_strategy_draws_like_eager():
    # the seed draw runs eagerly (a graph break), so torch.manual_seed gives eager's selection
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    dc.convert(model, gamma=0.75, strategy="random", chunk=16, skip_first=False)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = torch.randn(4, 16)
    for seed in (5, 6):
        for m, run in ((model, compiled), (eager, eager)):
            m.zero_grad()
            torch.manual_seed(seed)
            run(x).sum().backward()
        for p, q in zip(model.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
