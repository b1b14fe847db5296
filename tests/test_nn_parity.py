"""MaskedReLU and the DropIT layers against the plain torch.nn modules on the same inputs.

Every input kind a user may hand a layer (leaves, views, non-contiguous and channels_last
tensors, NaN/inf, empty and 0-d tensors, views torch refuses to modify in place, wrong dtypes and
ranks) goes through the torch module and through ours. Both must fail with the same exception
type and leave the input as it was, or both succeed with the same output (values and layout) and
the same gradients, bit for bit. The DropIT layers run at γ = 0, where every gradient must
match, and at γ = 0.9, where the output and the input and bias gradients still must.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropit_cuda as dc
from dropit_cuda import functional as DF

INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_identical(ours: torch.Tensor, ref: torch.Tensor, strides: bool = True) -> None:
    """Same shape, dtype, strides (with ``strides``) and bits, except that a NaN only has to be
    a NaN (torch's own kernels don't keep NaN payloads everywhere)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype and ours.layout == ref.layout
    if ours.layout != torch.strided:
        ours, ref = ours.to_dense(), ref.to_dense()
    assert not strides or ours.numel() == 0 or ours.stride() == ref.stride()
    if not ours.is_floating_point():
        assert torch.equal(ours, ref)
        return
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan)
    size = ours.element_size()
    a, b = ours.detach().contiguous().view(INT_OF[size]), ref.detach().contiguous().view(INT_OF[size])
    assert torch.equal(a[~nan], b[~nan])


class Case(NamedTuple):
    leaf: Optional[torch.Tensor]  # where gradients arrive
    base: torch.Tensor  # the tensor ``x`` is a view of (or ``x``): what in place writes into
    x: torch.Tensor  # the input


def _data(shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _leaf(shape, **kw) -> torch.Tensor:
    return _data(shape, **kw).requires_grad_()


def _view_case(leaf: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor]) -> Case:
    base = leaf * 1
    return Case(leaf, base, view(base))


def _nograd_view(leaf):
    base = leaf * 1
    with torch.no_grad():
        return Case(leaf, base, base[1:])


def _inference_view(leaf):
    base = leaf * 1
    with torch.inference_mode():
        return Case(leaf, base, base[1:])


def _special(shape) -> Case:
    x = _data(shape).view(-1)
    x[::3] = math.nan
    x[1::5] = math.inf
    x[2::7] = -math.inf
    x[4::11] = -0.0
    leaf = x.view(shape).requires_grad_()
    return _view_case(leaf, lambda t: t)


def _plain(shape, **kw) -> Case:
    x = _data(shape, **kw)
    return Case(None, x, x)


def input_kinds(shape) -> dict[str, Callable[[], Case]]:
    """Builders of every kind of input of (batched) ``shape``; each call builds a fresh one."""
    rank = len(shape)
    kinds = {
        "no_grad_tensor": lambda: _plain(shape),
        "leaf": lambda: (lambda l: Case(l, l, l))(_leaf(shape)),
        "non_leaf": lambda: _view_case(_leaf(shape), lambda t: t),
        "view_of_leaf": lambda: (lambda l: Case(l, l, l[1:]))(_leaf(shape)),
        "view_of_non_leaf": lambda: _view_case(_leaf(shape), lambda t: t[1:]),
        "transposed": lambda: _view_case(_leaf(shape[:-2] + shape[-1:] + shape[-2:-1]), lambda t: t.transpose(-1, -2)),
        "strided": lambda: _view_case(_leaf(shape[:-1] + (2 * shape[-1],)), lambda t: t[..., ::2]),
        "nan_inf": lambda: _special(shape),
        "empty": lambda: _view_case(_leaf((0,) + shape[1:]), lambda t: t),
        "zero_dim": lambda: _view_case(_leaf(()), lambda t: t),
        "one_dim": lambda: _view_case(_leaf(shape[-1:]), lambda t: t),
        "unbatched": lambda: _view_case(_leaf(shape[1:]), lambda t: t),
        "expanded": lambda: _view_case(_leaf((1,) + shape[1:]), lambda t: t.expand(shape)),
        "multi_output_view": lambda: _view_case(_leaf(shape), lambda t: t.unbind(0)[0]),
        "split_view": lambda: _view_case(_leaf(shape), lambda t: t.split(1)[0]),
        "no_grad_view": lambda: _nograd_view(_leaf(shape)),
        "inference_mode_view": lambda: _inference_view(_leaf(shape)),
        "float64": lambda: _view_case(_leaf(shape, dtype=torch.float64), lambda t: t),
        "int64": lambda: (lambda t: Case(None, t, t))(torch.arange(math.prod(shape)).view(shape) - 3),
    }
    if rank == 4:
        kinds["channels_last"] = lambda: _view_case(
            _leaf(shape), lambda t: t.contiguous(memory_format=torch.channels_last))
    if rank == 5:
        kinds["channels_last_3d"] = lambda: _view_case(
            _leaf(shape), lambda t: t.contiguous(memory_format=torch.channels_last_3d))
    return kinds


def _bits_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


class Outcome(NamedTuple):
    error: Optional[type]
    output: Optional[torch.Tensor]
    returned_input: bool  # the output is the input object (in place)
    base_after: torch.Tensor
    grads: dict


def run(fn: Callable[[torch.Tensor], torch.Tensor], case: Case, params: Optional[dict] = None,
        no_grad: bool = False) -> Outcome:
    """Runs ``fn`` on the case's input (under ``torch.no_grad()`` with ``no_grad``), then, when the
    output has a graph, backward with a fixed output gradient. Records the error type (checking
    that the input is untouched), or the output and the ``.grad`` of the input's leaf and
    ``params``, as the user sees them."""
    before_base, before_x = _bits_copy(case.base), _bits_copy(case.x)
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            y = fn(case.x)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        assert_identical(case.base.detach(), before_base, strides=False)
        assert_identical(case.x.detach(), before_x, strides=False)
        return Outcome(type(e), None, False, before_base, {})
    wrt = {"input": case.leaf, **(params or {})}
    wrt = {k: t for k, t in wrt.items() if t is not None and t.requires_grad}
    if not no_grad and y.requires_grad:
        y.backward(_data(y.shape, seed=7, dtype=y.dtype))
    grads = {k: t.grad for k, t in wrt.items()}
    for t in wrt.values():
        t.grad = None
    return Outcome(None, y.detach().clone(), y is case.x, _bits_copy(case.base), grads)


def assert_same_outcome(ours: Outcome, ref: Outcome, shape_only: tuple = ()) -> None:
    """The same error type, or the same output, in-place effect and gradients: bit for bit, except
    those named in ``shape_only`` (same shape and dtype)."""
    assert ours.error == ref.error, (ours.error, ref.error)
    if ref.error is not None:
        return
    assert_identical(ours.output, ref.output)
    assert ours.returned_input == ref.returned_input
    assert_identical(ours.base_after, ref.base_after, strides=False)
    assert ours.grads.keys() == ref.grads.keys()
    for name, a in ours.grads.items():
        b = ref.grads[name]
        if a is None or b is None:
            assert a is None and b is None, name
        elif name in shape_only:
            assert a.shape == b.shape and a.dtype == b.dtype, name
        else:
            assert_identical(a, b)


# --- MaskedReLU vs nn.ReLU -----------------------------------------------------------------------

RELU_KINDS = input_kinds((3, 4, 2, 5))
RELU_KINDS.update({f"3d_{k}": v for k, v in input_kinds((2, 3, 2, 2, 3)).items() if k == "channels_last_3d"})


@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kind", sorted(RELU_KINDS))
def test_masked_relu_matches_nn_relu(kind, inplace, grad_mode):
    ref, ours = (run(module, RELU_KINDS[kind](), no_grad=grad_mode == "no_grad")
                 for module in (nn.ReLU(inplace=inplace), dc.MaskedReLU(inplace=inplace)))
    assert_same_outcome(ours, ref)


def test_masked_relu_functional_refuses_in_place_on_a_leaf_before_writing():
    x = _leaf((10,))
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable"):
        dc.masked_relu(x, inplace=True)
    assert torch.equal(x.detach(), before)


# --- DropIT layers vs nn.Linear / nn.Conv* -------------------------------------------------------

LAYERS = {
    "linear": (lambda: nn.Linear(5, 3), (4, 5)),
    "linear_no_bias": (lambda: nn.Linear(5, 3, bias=False), (2, 3, 5)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (2, 2, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 4)),
    "conv2d_reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 5, 4)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 3, 3, 3)),
}
# Kinds that only concern in-place ops: a layer never writes its input.
_IN_PLACE_ONLY = {"multi_output_view", "split_view", "no_grad_view", "inference_mode_view"}
LAYER_CASES = [
    pytest.param(layer, kind, id=f"{layer}-{kind}")
    for layer, (_, shape) in LAYERS.items()
    for kind in sorted(input_kinds(shape))
    if kind not in _IN_PLACE_ONLY
]


_DROPIT_CLASS = {nn.Linear: dc.DropITLinear, nn.Conv1d: dc.DropITConv1d, nn.Conv2d: dc.DropITConv2d,
                 nn.Conv3d: dc.DropITConv3d}


def _dropit_twin(plain: nn.Module, gamma: float) -> nn.Module:
    """A DropIT copy of ``plain`` (same parameters), in training mode."""
    return _DROPIT_CLASS[type(plain)].from_module(copy.deepcopy(plain), gamma=gamma, chunk=64)


@pytest.mark.parametrize("gamma", [0.0, 0.9])
@pytest.mark.parametrize("layer, kind", LAYER_CASES)
def test_dropit_layer_matches_nn(layer, kind, gamma):
    make, shape = LAYERS[layer]
    torch.manual_seed(0)
    plain = make()
    ours = _dropit_twin(plain, gamma)
    ref = run(plain, input_kinds(shape)[kind](), dict(plain.named_parameters()))
    got = run(ours, input_kinds(shape)[kind](), dict(ours.named_parameters()))
    # at γ > 0 the weight gradient comes from the sparse copy; everything else is exact
    assert_same_outcome(got, ref, shape_only=("weight",) if gamma else ())


_F = {"linear": F.linear, 1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DF = {"linear": DF.linear, 1: DF.conv1d, 2: DF.conv2d, 3: DF.conv3d}


@pytest.mark.parametrize("layer, kind", [c for c in LAYER_CASES if "reflect" not in c.id])
def test_dropit_functional_matches_torch_functional(layer, kind):
    make, shape = LAYERS[layer]
    torch.manual_seed(0)
    m = make()
    key = "linear" if layer.startswith("linear") else m.weight.dim() - 2
    extra = {} if key == "linear" else dict(padding=m.padding)
    params = dict(m.named_parameters())
    ref = run(lambda x: _F[key](x, m.weight, m.bias, **extra), input_kinds(shape)[kind](), params)
    ours = run(lambda x: _DF[key](x, m.weight, m.bias, **extra, gamma=0.0), input_kinds(shape)[kind](), params)
    assert_same_outcome(ours, ref)


def test_dropit_linear_takes_sparse_input_like_nn_linear():
    """nn.Linear takes a sparse COO input; the DropIT layer caches its dense form."""
    torch.manual_seed(0)
    plain = nn.Linear(5, 3)
    ours = _dropit_twin(plain, 0.0)
    results = []
    for m in (plain, ours):
        x = _data((4, 5)).to_sparse().requires_grad_()
        results.append(run(m, Case(x, x, x), dict(m.named_parameters())))
    assert_same_outcome(results[1], results[0])


def test_dropit_layers_refuse_nested_input_in_training_by_name():
    m = dc.DropITLinear(5, 3)
    nt = torch.nested.nested_tensor([_data((2, 5)), _data((3, 5))], layout=torch.jagged, requires_grad=True)
    with pytest.raises(TypeError, match="input must be a dense"):
        m(nt)
    m.eval()  # the plain forward takes it, as nn.Linear does
    assert m(nt).is_nested
