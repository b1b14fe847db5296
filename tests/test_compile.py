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
    dc.convert(model, gamma=0.5, chunk=32, skip_first=False)
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
    # the compiled backward really used the compressed inputs
    assert not torch.allclose(model[0].weight.grad, plain[0].weight.grad)
