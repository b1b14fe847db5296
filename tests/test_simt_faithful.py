"""The host SIMT layer is faithful: kernel variants built only for the tests, each with one barrier
left out, give wrong answers under it while the real kernel gives the right one."""

import pytest
import torch

import dropit_cuda  # noqa: F401
from simt.build import load


@pytest.fixture(scope="module")
def simt():
    return load()


def packs_right(simt, x, variant, **kw):
    values, index = simt.pack(x, 0.9, x.numel(), True, variant=variant, threads=256, **kw)
    ref_values, ref_index = torch.ops.dropit_cuda.pack(x, 0.9, x.numel(), True)
    return torch.equal(values.view(torch.int32), ref_values.view(torch.int32)) and torch.equal(index, ref_index)


@pytest.mark.parametrize("variant", ["drop_hist", "drop_scan"])
@pytest.mark.parametrize("order", ["reverse", "shuffled:1", "shuffled:2"])
def test_missing_barrier_gives_a_wrong_answer(simt, variant, order):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(11))
    assert packs_right(simt, x, "kernels", order=order)
    assert not packs_right(simt, x, variant, order=order)
