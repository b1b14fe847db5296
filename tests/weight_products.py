"""Scaffolding of the zoo tests. Mainly: which parameters a model multiplies as the weight of a
linear/conv product, found by watching the calls a plain forward pass makes (a TorchFunctionMode),
independently of dropit_cuda; also the seeded training step the tests compare.

DropIT leaves the forward output, input gradients and bias gradients exact and changes only the
weight gradients of the products it covers. So, at gamma > 0, the gradient of every parameter
found here differs from the plain model's (except the first layer's, which ``skip_first`` keeps
dense), and every other gradient is equal.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from benchmarks.zoo import ZOO, loss_of, output_tensors

# function name -> positions of the operands that may be a layer's weight (the activation of
# F.linear / F.conv* is never one; for the matrix products either side can be)
_PRODUCTS: dict[str, tuple[int, ...]] = {
    "linear": (1,),
    **{f"conv{d}d": (1,) for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": (1,) for d in (1, 2, 3)},
    "addmm": (1, 2),
    "mm": (0, 1),
    "matmul": (0, 1),
    "__matmul__": (0, 1),
    "__rmatmul__": (0, 1),
    "bmm": (0, 1),
    "baddbmm": (1, 2),
    "_grouped_mm": (0, 1),  # F.grouped_mm calls it
    "bilinear": (2,),
}
_OPERAND_KWARGS = ("weight", "mat1", "mat2", "other", "batch1", "batch2", "mat_a", "mat_b")
#: products DropIT leaves dense by design (dc.report names them): bilinear's input gradients need
#: both inputs exact, so packing one would free nothing
NOT_COVERED_OPS = frozenset({"bilinear"})
# F.multi_head_attention_forward (nn.MultiheadAttention): positions of its projection weights
_MHA_WEIGHT_POSITIONS = {"in_proj_weight": 5, "out_proj_weight": 11}


@dataclass(frozen=True)
class ProductCall:
    """One linear/conv product of a forward pass: the function called and the names of the
    trainable parameters its weight operand comes from (the weight itself, or the parameters a
    parametrization computes it from)."""

    op: str
    params: tuple[str, ...]


class _Watcher(TorchFunctionMode):
    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names  # id(parameter) -> its name
        self.derived: dict[int, tuple[torch.Tensor, tuple[str, ...]]] = {}  # parametrization outputs
        self.calls: list[ProductCall] = []

    def record_parametrization(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        sources = tuple(self.names[id(p)] for p in module.parameters() if p.requires_grad)
        self.derived[id(output)] = (output, sources)  # holding output keeps its id unique

    def _sources(self, t: Any) -> tuple[str, ...]:
        if not isinstance(t, torch.Tensor):
            return ()
        for cand in (t, t._base):  # the weight, or a view of it (W.t() in x @ W.t())
            if cand is None:
                continue
            if isinstance(cand, nn.Parameter):
                return (self.names[id(cand)],) if cand.requires_grad and id(cand) in self.names else ()
            got = self.derived.get(id(cand))
            if got is not None and got[0] is cand:
                return got[1]
        return ()

    def _record(self, op: str, operands: list) -> None:
        params = tuple(dict.fromkeys(n for t in operands for n in self._sources(t)))
        if params:
            self.calls.append(ProductCall(op, params))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__getitem__" and isinstance(args[0], nn.Parameter):
            # rows gathered from a weight (weight[expert_ids]) are that weight in a product
            out = func(*args, **kwargs)
            sources = self._sources(args[0])
            if sources and isinstance(out, torch.Tensor):
                self.derived[id(out)] = (out, sources)
            return out
        if name == "einsum":
            rest = args[1:]
            operands = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
            self._record(name, operands)
        elif name == "multi_head_attention_forward":
            # handled as a whole (its inner F.linear calls run with this mode off): the input
            # projections, then the output projection
            named = {k: args[i] for k, i in _MHA_WEIGHT_POSITIONS.items() if i < len(args)}
            named.update({k: v for k, v in kwargs.items() if k.endswith("proj_weight")})
            self._record(name, [v for k, v in named.items() if k != "out_proj_weight"])
            self._record(name, [named.get("out_proj_weight")])
        elif name in _PRODUCTS:
            operands = [args[i] for i in _PRODUCTS[name] if i < len(args)]
            self._record(name, operands + [v for k, v in kwargs.items() if k in _OPERAND_KWARGS])
        return func(*args, **kwargs)


def product_calls(model: nn.Module, inputs: tuple) -> list[ProductCall]:
    """The linear/conv products on trainable weights that one training forward pass of ``model``
    makes, in call order. Runs on a deep copy (batch-norm statistics of ``model`` stay as they are)."""
    model = copy.deepcopy(model)
    watcher = _Watcher({id(p): n for n, p in model.named_parameters()})
    handles = [m.register_forward_hook(watcher.record_parametrization)
               for m in model.modules() if isinstance(m, parametrize.ParametrizationList)]
    try:
        with torch.enable_grad(), watcher:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return watcher.calls


def expected_coverage(calls: list[ProductCall]) -> tuple[set[str], set[str]]:
    """(parameters DropIT must cover, parameters of the skipped first layer). The first layer is
    the first product on a trainable weight that the forward pass makes (a frozen layer before it,
    such as a LoRA base layer, caches nothing and is not the one ``skip_first`` keeps dense).
    Products of :data:`NOT_COVERED_OPS` are left out (see :func:`not_covered`)."""
    calls = [c for c in calls if c.op not in NOT_COVERED_OPS]
    assert calls, "the model makes no linear/conv product on a trainable weight"
    covered = {n for c in calls[1:] for n in c.params}
    return covered, set(calls[0].params) - covered


def not_covered(calls: list[ProductCall]) -> set[str]:
    """Parameters multiplied only by products DropIT leaves dense by design."""
    covered = {n for c in calls if c.op not in NOT_COVERED_OPS for n in c.params}
    return {n for c in calls if c.op in NOT_COVERED_OPS for n in c.params} - covered


def randomize_zero_parameters(model: nn.Module, seed: int = 0) -> None:
    """Give every all-zero parameter small random values: a zero-initialised head, LoRA B or
    layer scale would zero the gradients upstream of it, and zero equals zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


@dataclass
class Step:
    """The result of one training step: the model's output tensors, the loss, gradients by name."""

    outputs: list[torch.Tensor]
    loss: torch.Tensor
    grads: dict[str, Any]


def train_step(model: nn.Module, inputs: tuple, forward: Optional[Callable] = None) -> Step:
    """One forward and backward pass with the RNG reseeded first (same draws in every copy);
    ``forward`` runs the model if given (a compiled wrapper of it)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    output = (model if forward is None else forward)(*inputs)
    loss = loss_of(output)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return Step([t.detach() for t in output_tensors(output)], loss.detach(), grads)


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of two gradients (None only equals None)."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a, b)


@functools.lru_cache(maxsize=None)
def prepared(name: str) -> tuple[nn.Module, tuple, tuple[ProductCall, ...]]:
    """The zoo model ``name`` with no all-zero parameter, its inputs and its product calls,
    built once per test session; tests work on copies."""
    spec = next(z for z in ZOO if z.name == name)
    model = spec.build()
    randomize_zero_parameters(model)
    inputs = spec.inputs()
    return model, inputs, tuple(product_calls(model, inputs))
