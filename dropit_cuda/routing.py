"""Routing a converted model's weighted products through DropIT.

:func:`dropit_cuda.convert` does not re-implement any module's forward. It records which weights
DropIT covers (:class:`Layer`, one per weight) and, while a converted model runs a training
forward pass, keeps a :class:`torch.overrides.TorchFunctionMode` active that sends every product
against a covered weight (``F.linear``, ``F.conv*d``, ``F.conv_transpose*d``, ``addmm`` / ``mm`` /
``matmul`` / ``@`` with the weight as the second operand, as Hugging Face's ``Conv1D`` does) to
:mod:`dropit_cuda.functional`, wherever that product is called from: the layer's own forward,
another module's forward on its weight (torchvision's Swin), a parametrized weight (weight norm),
or ``F.multi_head_attention_forward``. Everything else passes through untouched, and in eval mode
or without autograd the mode is not even entered.

The mode is entered by forward pre-hooks on the converted model and on every module that leads to
a covered weight (so a block re-run by ``torch.utils.checkpoint`` during backward routes its
products too) and left by forward hooks; nested entries only count. Weights are looked up when a
product runs (by identity with the module's current parameter, or the view's base), so parameters
swapped in during the forward (FSDP2's unsharded parameters) are found too.

Routing every torch function call through a Python mode costs microseconds each, which sets the
step time of an eager model that is not huge. So the first complete eager training forward (the
*observed* one) also notes, for every product against a covered weight, the innermost hooked
module running at the time; afterwards the routing narrows (:meth:`Conversion._narrow`):

- a weight DropIT caches whose owner is a stock ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (zero padding)
  / Hugging Face ``Conv1D``, and whose products all came from that owner's own forward, gets a
  *direct* forward (:class:`_Direct`, set on the module instance) that makes the product through
  DropIT with no mode at all;
- the mode is entered only around the modules that need it: owners of a covered weight whose
  forward is anything else (attention, parametrized weights, custom modules) and the modules in
  which the observed forward used a covered weight of another module (torchvision's Swin);
- dense layers (``None`` settings, ``skip_first``) need nothing: torch's own product runs.

The hooks of every other module are removed (a module with hooks takes torch's slow call path).
Should a layer's settings change between dense and DropIT, the next training forward is observed
again with the full routing. A forward traced by ``torch.compile`` observes nothing (it runs with
whatever routing the last eager forward left).

The per-layer record also keeps what the last training forward did (op, calls, dense and cached
bytes) for :func:`dropit_cuda.report`, decides ``skip_first`` on the first training forward, and
decides which swapped-in ``MaskedReLU`` actually free memory (see :func:`dropit_cuda.convert`).
"""

from __future__ import annotations

import itertools
import sys
import threading
import types
import warnings
import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import dtensor
from . import functional as DF
from . import pack_cache
from . import products as P
from .relu import MaskedReLU, transform_active
from .settings import Settings

__all__ = ["Conversion", "Layer", "attach", "conversion_of", "detach", "in_backward"]


#: the dense reason of a weight whose packs would free nothing (see _KeptProbe)
KEPT = "input kept alive by another op"


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (a checkpoint recompute).
    Always False while torch.compile traces (a compiled graph recomputes inside itself)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class Layer:
    """One weight a converted model covers: where it lives, how it caches, what it last did."""

    def __init__(self, name: str, module: nn.Module, attr: str, settings: Optional[Settings],
                 dense_reason: Optional[str], claimed: bool, parametrized: bool) -> None:
        self.name = name
        self.module = module
        self.attr = attr
        self.settings = settings
        #: why ``settings`` is None: "skip_first", "excluded" or "per-layer setting"
        self.dense_reason = dense_reason
        #: the owner is a layer ``convert`` promises to cover (linear/conv/attention/Conv1D)
        self.claimed = claimed
        self.parametrized = parametrized
        self.derived: Optional[torch.Tensor] = None  # a parametrized weight's value this forward
        #: set only while dropit_cuda.fidelity records: the autograd functions then also hand it
        #: the exact weight gradient (see functional._keep_exact_input)
        self.watch: Any = None
        #: set only during the first training forward of a conversion that decides which products
        #: free nothing by packing (see _KeptProbe)
        self.probe: Any = None
        #: the products save their input as it is (something else keeps it alive): dense, but
        #: still through DropIT, which keeps no autocast copy of the weight
        self.keep_input = False
        #: a product against this weight that DropIT does not cover, once seen: (op, why)
        self.uncovered: Optional[tuple[str, str]] = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.op: Optional[str] = None
        self.calls = 0
        self.dense_bytes = 0
        self.cached_bytes = 0

    def record(self, op: str, dense_bytes: int, cached_bytes: int, x: Optional[torch.Tensor] = None) -> None:
        """Called by the autograd functions when they cache this weight's input ``x`` (bytes 0
        when the pack is shared with an earlier product of the forward)."""
        # a checkpointed block recomputed: not a new forward (in_backward without its compile
        # check: the products record in eager calls only)
        if torch._C._current_graph_task_id() != -1:
            return
        self.op = op
        self.calls += 1
        self.dense_bytes += dense_bytes
        self.cached_bytes += cached_bytes
        if self.probe is not None and x is not None:
            self.probe.saw(self, x, cached_bytes)

    def record_uncovered(self, op: str, why: str) -> None:
        """Called by the routes for a product against this weight that stays torch's own."""
        if not in_backward() and not torch.compiler.is_compiling():
            self.uncovered = (op, why)

    def current(self) -> Optional[torch.Tensor]:
        """The tensor products use as this weight now."""
        if self.parametrized:
            return self.derived
        return self.module._parameters.get(self.attr)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["derived"] = state["watch"] = state["probe"] = None
        return state

    def __repr__(self) -> str:
        how = str(self.settings) if self.settings is not None else f"dense ({self.dense_reason})"
        return f"Layer({self.name!r}, {how})"


# --- routes: from a torch function call to a DropIT function -----------------------------------


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if i < len(args):
        return args[i]
    return kwargs.get(name, default)


def _route_linear(conv: "Conversion", args, kwargs):
    x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    found = conv.lookup(w)
    if found is None:
        return NotImplemented
    return DF.linear_with(x, w, b, found[1], found[0], "linear")


def _route_matmul(op: str) -> Callable:
    """``x @ W`` (``mm``, ``matmul``, ``@``): ``linear(x, W.t())`` when ``W`` is a covered 2-D weight;
    ``W @ x``: the weight-first product (``mm``, or ``matmul``'s ``bmm`` over a batched ``x``)."""

    def route(conv: "Conversion", args, kwargs):
        a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other" if op != "mm" else "mat2")
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or "out" in kwargs:
            return NotImplemented
        if b.dim() == 2 and a.dim() >= 1:
            found = conv.lookup(b)
            if found is not None:
                if not b.requires_grad:  # frozen: torch's own product, as called
                    return NotImplemented
                return DF.linear_with(a, b, None, found[1], found[0], op, transposed=True)
        if a.dim() == 2 and b.dim() >= 2 and conv.lookup(a) is not None:
            return _weight_first(conv, a, b, op)
        conv.note_uncovered((a, b), op, "a batched or vector weight operand")
        return NotImplemented

    return route


def _weight_first(conv: "Conversion", w: torch.Tensor, x: torch.Tensor, op: str):
    """``W @ x`` with a 2-D weight ``W``, as ATen computes it for a weight that requires grad:
    ``mm(W, x)`` for a 2-D ``x``; for a batched ``x``, matmul folds the batch into the rows of
    ``x.mT()``, which is ``linear(x.mT(), W)``, transposed back and made contiguous."""
    found = conv.lookup(w)
    if found is None or not w.requires_grad:  # frozen: torch's own call (it folds differently)
        return NotImplemented
    if x.dim() == 2:
        if not _plain_layout(x):
            conv.note_uncovered((w,), op, "the input overlaps itself in memory (an expanded tensor)")
            return NotImplemented
        spec = P.ProductSpec("mm", 0, tuple(w.shape), tuple(w.stride()), tuple(x.shape), tuple(x.stride()))
        return P.weight_product(x, w, spec, found[1], found[0], op)
    return DF.linear_with(x.mT, w, None, found[1], found[0], op).mT.contiguous()


def _plain_layout(t: torch.Tensor) -> bool:
    """No dimension of more than one element has stride 0 (the packed copy can take its layout)."""
    return all(st != 0 or sz <= 1 for sz, st in zip(t.shape, t.stride()))


def _route_bmm(op: str) -> Callable:
    """``bmm(a, b)`` / ``baddbmm(bias, a, b)`` with a covered weight (3-D, a slice, or rows gathered
    from one) on either side."""
    names = ("input", "mat2") if op == "bmm" else ("batch1", "batch2")

    def route(conv: "Conversion", args, kwargs):
        first = 0 if op == "bmm" else 1
        a, b = _arg(args, kwargs, first, names[0]), _arg(args, kwargs, first + 1, names[1])
        bias = None if op == "bmm" else _arg(args, kwargs, 0, "input")
        if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (a, b)) or "out" in kwargs:
            return NotImplemented
        if op == "baddbmm" and (kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3):
            conv.note_uncovered((a, b), op, "beta or alpha other than 1")
            return NotImplemented
        for w_pos, (w, x) in enumerate(((a, b), (b, a))):
            found = conv.lookup_operand(w)
            if found is None:
                continue
            (layer, settings), gathered = found
            if not _plain_layout(x):
                conv.note_uncovered((w,), op, "the input overlaps itself in memory (an expanded tensor)")
                return NotImplemented
            spec = P.ProductSpec("bmm", w_pos, tuple(w.shape), tuple(w.stride()), tuple(x.shape),
                                 tuple(x.stride()))
            return P.weight_product(x, w, spec, settings, layer, op, bias=bias, gathered=gathered)
        return NotImplemented

    return route


def _route_grouped_mm(conv: "Conversion", args, kwargs):
    """``torch._grouped_mm(x, W, offs=...)`` (``F.grouped_mm``): 2-D tokens grouped by ``offs``
    against a 3-D expert weight (or a view of one, ``W.transpose(-2, -1)``)."""
    x, w = _arg(args, kwargs, 0, "self"), _arg(args, kwargs, 1, "mat2")
    offs, bias, out_dtype = _arg(args, kwargs, 2, "offs"), _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "out_dtype")
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return NotImplemented
    found = conv.lookup(w)
    if found is None:
        return NotImplemented
    why = None
    if x.dim() != 2 or w.dim() != 3 or offs is None:
        why = "only 2-D tokens with offsets against a 3-D weight are covered"
    elif bias is not None or (out_dtype is not None and out_dtype != x.dtype):
        why = "bias or out_dtype given"
    elif x.stride(-1) != 1:
        why = "the tokens are not row-major"
    if why is not None:
        conv.note_uncovered((w,), "grouped_mm", why)
        return NotImplemented
    spec = P.ProductSpec("grouped_mm", 1, tuple(w.shape), tuple(w.stride()), tuple(x.shape), tuple(x.stride()))
    return P.weight_product(x, w, spec, found[1], found[0], "grouped_mm", offs=offs, autocast=False)


def _route_getitem(conv: "Conversion", args, kwargs):
    """``weight[index]`` with an integer index tensor: the gathered copy is noted, so that a product
    against it keeps the weight and the index instead of the copy."""
    w, index = args[0], args[1] if len(args) > 1 else None
    if not isinstance(w, nn.Parameter) or torch.compiler.is_compiling():
        return NotImplemented
    if isinstance(index, tuple) and len(index) == 1:
        index = index[0]
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32) or index.dim() < 1:
        return NotImplemented
    out = torch.Tensor.__getitem__(w, index)
    conv.note_gathered(out, w, index)
    return out


def _route_uncovered(op: str, why: str, operands: Callable[[tuple, dict], tuple]) -> Callable:
    """A product DropIT has no form for: names it in the weight's report row and passes through."""

    def route(conv: "Conversion", args, kwargs):
        conv.note_uncovered(operands(args, kwargs), op, why)
        return NotImplemented

    return route


def _route_einsum(conv: "Conversion", args, kwargs):
    """``torch.einsum(equation, x, W)`` or ``(equation, W, x)``: two operands, one a covered weight
    (or a view of one), the other not."""
    equation, rest = (args[0] if args else kwargs.get("equation")), args[1:]
    operands = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else tuple(rest)
    if not isinstance(equation, str) or kwargs or not all(isinstance(t, torch.Tensor) for t in operands):
        return NotImplemented
    if torch.compiler.is_compiling():  # its backward differentiates einsum again: not traceable
        conv.note_uncovered(operands, "einsum", "not under torch.compile")
        return NotImplemented
    if len(operands) == 2:
        for w_first in (False, True):
            x, w = operands[::-1] if w_first else operands
            found = conv.lookup(w)
            if found is not None and conv.lookup(x) is None and _plain_layout(x):
                return P.einsum(equation, x, w, w_first, found[1], found[0])
    conv.note_uncovered(operands, "einsum", "only two operands, one of them a weight, are covered")
    return NotImplemented


def _route_addmm(conv: "Conversion", args, kwargs):
    """``addmm(bias, x, W)`` (Hugging Face's ``Conv1D``): ``linear(x, W.t(), bias)``."""
    b, x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3 or "out" in kwargs:
        return NotImplemented
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not isinstance(x, torch.Tensor) or x.dim() != 2:
        return NotImplemented
    found = conv.lookup(w)
    if found is None or not w.requires_grad:  # frozen: torch's own product, as called
        return NotImplemented
    return DF.linear_with(x, w, b, found[1], found[0], "addmm", transposed=True)


def _route_conv(nd: int, transposed: bool) -> Callable:
    op = f"conv{'_transpose' if transposed else ''}{nd}d"
    names = (("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
             if transposed else ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
    defaults = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}

    def route(conv: "Conversion", args, kwargs):
        a = {n: _arg(args, kwargs, i, n, defaults.get(n)) for i, n in enumerate(names)}
        found = conv.lookup(a["weight"])
        if found is None:
            return NotImplemented
        return DF.conv_with(a["input"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"],
                            a["groups"], found[1], transposed, a.get("output_padding", 0), found[0], op)

    return route


def _route_pad(conv: "Conversion", args, kwargs):
    """Reflect/replicate padding keeps only its input's shape (the next conv packs the padded copy)."""
    x, pads = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "pad")
    mode = _arg(args, kwargs, 2, "mode", "constant")
    out = DF.pad_keeping_shape(x, pads, mode) if isinstance(x, torch.Tensor) else None
    return NotImplemented if out is None else out


_ROUTES: dict[Any, Callable] = {
    F.linear: _route_linear,
    torch.addmm: _route_addmm,
    torch.Tensor.addmm: _route_addmm,
    torch.mm: _route_matmul("mm"),
    torch.Tensor.mm: _route_matmul("mm"),
    torch.matmul: _route_matmul("matmul"),
    torch.Tensor.matmul: _route_matmul("matmul"),
    torch.Tensor.__matmul__: _route_matmul("matmul"),
    F.conv1d: _route_conv(1, False),
    F.conv2d: _route_conv(2, False),
    F.conv3d: _route_conv(3, False),
    F.conv_transpose1d: _route_conv(1, True),
    F.conv_transpose2d: _route_conv(2, True),
    F.conv_transpose3d: _route_conv(3, True),
    F.pad: _route_pad,
    torch.bmm: _route_bmm("bmm"),
    torch.Tensor.bmm: _route_bmm("bmm"),
    torch.baddbmm: _route_bmm("baddbmm"),
    torch.Tensor.baddbmm: _route_bmm("baddbmm"),
    torch._grouped_mm: _route_grouped_mm,
    torch.Tensor.__getitem__: _route_getitem,
    torch.einsum: _route_einsum,
    F.bilinear: _route_uncovered("bilinear", "its input gradients need both inputs exact, so packing "
                                 "one frees nothing",
                                 lambda args, kwargs: (_arg(args, kwargs, 2, "weight"),)),
}


def _never(*args: Any, **kwargs: Any) -> bool:
    return False


def _rebind_functional() -> dict[Any, Callable]:
    """Copies of ``torch.nn.functional``'s Python functions whose ``has_torch_function`` checks
    answer False. A mode sees only the outermost call of such a function (its body runs with the
    mode popped); run through these copies while the mode is active, their inner ops reach the
    mode too. Only functions that call a weighted product inside are routed this way."""
    names = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")
    if not all(hasattr(F, n) for n in names):
        return {}  # a torch whose functional module is laid out differently: nothing to unwrap
    scope = dict(vars(F))
    for n in names:
        scope[n] = _never
    for n, v in vars(F).items():
        if isinstance(v, types.FunctionType) and v.__globals__ is vars(F):
            copy = types.FunctionType(v.__code__, scope, v.__name__, v.__defaults__, v.__closure__)
            copy.__kwdefaults__ = v.__kwdefaults__
            scope[n] = copy
    return {F.multi_head_attention_forward: scope["multi_head_attention_forward"]}


_OPAQUE = _rebind_functional()


class _Router(TorchFunctionMode):
    """Sends a converted model's products against covered weights to the DropIT functions."""

    def __init__(self, conversion: "Conversion", state: "_ThreadState") -> None:
        super().__init__()
        self.conversion = conversion
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state.touched is not None:  # an observed forward: which weights it uses
            self.state.touch(args, kwargs)
        if torch.is_grad_enabled():
            route = _ROUTES.get(func)
            if route is not None:
                out = route(self.conversion, args, kwargs)
                if out is not NotImplemented:
                    return out
            else:
                unwrapped = _OPAQUE.get(func)
                if unwrapped is not None:
                    with self:
                        return unwrapped(*args, **kwargs)
        return func(*args, **kwargs)


# --- the conversion: layers, hooks, per-forward bookkeeping -------------------------------------


class _Enter:
    """Forward pre-hook: enter the conversion's forward (outermost training call only)."""

    def __init__(self, conversion: "Conversion") -> None:
        self.conversion = conversion

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.conversion.enter(module, args)


class _Exit:
    """Forward hook (``always_call``): leave the conversion's forward."""

    def __init__(self, conversion: "Conversion") -> None:
        self.conversion = conversion

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        # torch calls an always_call hook with output None when the forward raised
        self.conversion.exit(raised=output is None and sys.exc_info()[0] is not None)


class _RouteEnter:
    """Forward pre-hook of a module that needs the mode once the routing narrowed: enter it."""

    def __init__(self, conversion: "Conversion") -> None:
        self.conversion = conversion

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.conversion.route_enter(module)


class _RouteExit:
    """Forward hook (``always_call``) of a module that needs the mode: leave it."""

    def __init__(self, conversion: "Conversion") -> None:
        self.conversion = conversion

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.conversion.route_exit()


# --- direct forwards: a stock layer's own product, without the mode -----------------------------


def _hf_conv1d() -> Optional[type]:
    """Hugging Face's ``Conv1D`` class, if transformers is already imported (a model using it
    imported it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _direct_kind(module: nn.Module, attr: str) -> Optional[str]:
    """``"linear"``, ``"conv"`` or ``"addmm"`` when ``module``'s own forward is torch's (or
    Hugging Face's) stock forward that makes exactly one product against ``module.attr``, which
    :class:`_Direct` then makes itself; None for any other module (its products need the mode)."""
    if attr != "weight" or "forward" in module.__dict__:
        return None
    cls = type(module)
    if cls.forward is nn.Linear.forward:
        return "linear"
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if cls.forward is base.forward and cls._conv_forward is base._conv_forward:
            return "conv" if module.padding_mode == "zeros" else None
    conv1d = _hf_conv1d()
    if conv1d is not None and cls.forward is conv1d.forward:
        return "addmm"
    return None


class _Direct:
    """The forward of a stock layer whose weight DropIT caches, set on the module instance once the
    observed forward showed that the layer's own forward makes all its products: the very call the
    mode would route (same arguments, same DropIT function), without the mode. Where the mode is
    active anyway (inside a module that needs it), not training, or without autograd, it runs the
    class's own forward."""

    def __init__(self, conversion: "Conversion", index: int, kind: str) -> None:
        self.conversion = conversion
        self.index = index
        self.kind = kind
        self.layer = conversion.layers[index]
        self.arg = "x" if kind == "addmm" else "input"  # the name of the forward's argument

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.layer.module
        if len(args) == 1 and not kwargs:
            x = args[0]
        elif not args and len(kwargs) == 1 and self.arg in kwargs:
            x = kwargs[self.arg]
        else:  # as the class's forward takes (or rejects) them
            return type(module).forward(module, *args, **kwargs)
        conversion = self.conversion
        if conversion.mode_on() or not (module.training and torch.is_grad_enabled()):
            return type(module).forward(module, x)  # the mode routes it, or nothing to route
        w = module._parameters.get("weight")
        settings = conversion.settings_for(self.index, w) if isinstance(w, torch.Tensor) else None
        if settings is None:
            return type(module).forward(module, x)
        bias = module._parameters.get("bias")
        if self.kind == "linear":
            return DF.linear_with(x, w, bias, settings, self.layer, "linear")
        if self.kind == "addmm":  # Hugging Face's Conv1D: addmm(bias, x as a matrix, weight)
            size_out = x.size()[:-1] + (module.nf,)
            out = DF.linear_with(x.view(-1, x.size(-1)), w, bias, settings, self.layer, "addmm", transposed=True)
            return out.view(size_out)
        nd = w.dim() - 2
        return DF.conv_with(x, w, bias, module.stride, module.padding, module.dilation, module.groups,
                            settings, False, 0, self.layer, f"conv{nd}d")


class _Derived:
    """Forward hook of a ``ParametrizationList``: the value of a parametrized weight this forward."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.layer.derived = output


HOOK_TYPES = (_Enter, _Exit, _RouteEnter, _RouteExit, _Derived)

# Conversions by key, for decisions that torch.compile must take as constants (see _skip_first).
_CONVERSIONS: "weakref.WeakValueDictionary[int, Conversion]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@torch._dynamo.assume_constant_result
def _skip_first(key: int, index: int) -> bool:
    """Leaves layer ``index`` of conversion ``key`` dense if the first layer is still undecided:
    called on every product against a trainable weight. It runs eagerly even while torch.compile
    traces (its result is a constant of the graph, with no guard on the state it changes), so the
    decision taken on the first forward does not make the next call recompile."""
    conversion = _CONVERSIONS[key]
    if not conversion.first_pending:
        return False
    conversion.first_pending = False
    layer = conversion.layers[index]
    conversion.first = layer.name
    if layer.settings is not None:
        layer.settings, layer.dense_reason = None, "skip_first"
    return True


@torch._dynamo.assume_constant_result
def _settings_of(key: int, index: int) -> Optional[Settings]:
    """The settings of layer ``index`` of conversion ``key``, as a constant for torch.compile:
    read from the layer as an attribute, a dynamic-shape compile would turn gamma into a symbolic
    float, which cannot size the min_k and channel caches. (A new conversion has a new key, which
    the graph does guard on.)"""
    return _CONVERSIONS[key].layers[index].settings


class Conversion:
    """What :func:`dropit_cuda.convert` attached to a model (``model._dropit_conversion``)."""

    def __init__(self, layers: list[Layer], relus: list[tuple[str, nn.Module]], skip_first: bool,
                 hooked: list[nn.Module], dense_where_kept: bool = True) -> None:
        self.layers = layers
        self.relus = relus  # (name, MaskedReLU) swapped in; decided on the first training forward
        self.first_pending = skip_first
        self.first: Optional[str] = None  # the layer skip_first left dense
        self.relu_pending = bool(relus)
        self.relu_decisions: dict[str, str] = {}
        self.forwards = 0  # eager training forwards seen (a compiled forward cannot count)
        self.compiled = False  # whether the last training forward ran compiled (nothing recorded)
        self.warned = False
        #: the root first, then every module that leads to a covered weight (hooked while observing)
        self.hooked = hooked
        #: once narrowed: which layers were dense then (a change makes the next forward observed)
        self.narrowed: Optional[tuple[bool, ...]] = None
        self._parametrized = [layer for layer in layers if layer.parametrized]
        #: leave dense the products whose input something else keeps alive (decided on the first
        #: eager training forward, see _KeptProbe)
        self.kept_pending = dense_where_kept
        self.kept_decisions: dict[str, str] = {}
        self.kept_applied = False
        self._register()

    def _register(self) -> None:
        self.key = next(_KEYS)
        _CONVERSIONS[self.key] = self
        # torch's mode stack is per thread, and so is a forward: each thread that runs this
        # model keeps its own stack of entered modules and its own mode object
        self._threads = threading.local()
        self._thread()  # made now, not during the first (perhaps compiled) forward: no guard on it
        self._probe: Optional[_ReluProbe] = None
        self._kept_probe: Optional[_KeptProbe] = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for transient in ("key", "_threads", "_probe", "_kept_probe"):
            del state[transient]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()

    # -- lookup ------------------------------------------------------------------------------

    def lookup(self, w: Any) -> Optional[tuple[Layer, Settings]]:
        """The layer whose weight ``w`` is (or is a view of), and its settings, if DropIT applies to
        this product, else None; decides ``skip_first`` on the first product against a trainable
        weight. A frozen weight's product caches nothing: the DropIT functions run torch's own call."""
        if not isinstance(w, torch.Tensor):
            return None
        index = self._find(w)
        if index is None and w._base is not None:
            index = self._find(w._base)
        if index is None:
            return None
        state = self._thread()
        if state.seen is not None:  # (an observed forward, not traced: see touch)
            where = state.stack[-1] if state.stack else None
            state.seen.setdefault(index, {})[id(where)] = where
        settings = self.settings_for(index, w)
        return None if settings is None else (self.layers[index], settings)

    def settings_for(self, index: int, w: torch.Tensor) -> Optional[Settings]:
        """The settings of a product against layer ``index``'s weight ``w``, None where it stays
        dense (a dense layer, or its owner not training); decides ``skip_first`` on the first
        product against a trainable weight."""
        # (eager calls read the state directly: the two lookups by key are for torch.compile)
        compiling = torch.compiler.is_compiling()
        if w.requires_grad and (compiling or self.first_pending):
            _skip_first(self.key, index)
        layer = self.layers[index]
        settings = _settings_of(self.key, index) if compiling else layer.settings
        if settings is None or not layer.module.training:
            return None
        return settings

    def lookup_operand(self, w: Any) -> Optional[tuple[tuple[Layer, Settings], Optional[P.Gathered]]]:
        """:meth:`lookup` for ``w`` itself or its base, else for the parameter ``w`` was gathered
        from in this forward (then also how: parameter and index)."""
        found = self.lookup(w)
        if found is not None:
            return found, None
        got = self._thread().gathered.get(id(w)) if isinstance(w, torch.Tensor) else None
        if got is None or got[0]() is not w:
            return None
        found = self.lookup(got[1].param)
        return None if found is None else (found, got[1])

    def note_gathered(self, out: torch.Tensor, param: torch.Tensor, index: torch.Tensor) -> None:
        """Records that ``out`` is ``param[index]`` (for the rest of this forward)."""
        if self._find(param) is not None:
            self._thread().gathered[id(out)] = (weakref.ref(out), P.Gathered(param, index))

    def note_uncovered(self, operands: tuple, op: str, why: str) -> None:
        """Names ``op`` in the report row of each covered weight among ``operands`` (the weight, a
        view or rows gathered from it), which this product leaves dense."""
        for t in operands:
            if not isinstance(t, torch.Tensor):
                continue
            index = self._find(t)
            if index is None and t._base is not None:
                index = self._find(t._base)
            got = self._thread().gathered.get(id(t))
            if index is None and got is not None and got[0]() is t:
                index = self._find(got[1].param)
            if index is not None and self.layers[index].settings is not None:
                self.layers[index].record_uncovered(op, why)

    def _find(self, w: torch.Tensor) -> Optional[int]:
        for i, layer in enumerate(self.layers):
            if layer.current() is w:
                return i
        return None

    def apply_kept(self) -> None:
        """Leaves dense, from now on, the weights the last probed forward found packing nothing
        free (see :class:`_KeptProbe`)."""
        if self.kept_decisions and not self.kept_applied:
            for layer in self.layers:
                if layer.name in self.kept_decisions:
                    layer.keep_input, layer.dense_reason = True, KEPT
            self.kept_applied = True

    # -- forward bookkeeping -----------------------------------------------------------------

    def _thread(self) -> "_ThreadState":
        state = getattr(self._threads, "state", None)
        if state is None:
            state = self._threads.state = _ThreadState(self)
        return state

    def mode_on(self) -> bool:
        """Whether the mode routes products now on this thread: inside a routed module once the
        routing narrowed (a direct forward then leaves its product to the mode)."""
        routing = self._thread().routing
        return bool(routing) and routing[0]

    def enter(self, module: nn.Module, args: tuple = ()) -> None:
        """A hooked module starts: the outermost call of a training forward starts the forward
        (and, unless the routing narrowed, enters the mode for all of it)."""
        state = self._thread()
        if not state.active:
            if not (torch.is_grad_enabled() and module.training):
                state.active.append(False)
                return
            self._start_forward(state, args)
        state.active.append(True)
        if state.seen is not None and not torch.compiler.is_compiling():
            state.stack.append(module)

    def exit(self, raised: bool = False) -> None:
        state = self._thread()
        if not state.active or not state.active.pop():
            return
        if state.seen is not None and state.stack and not torch.compiler.is_compiling():
            state.stack.pop()
        if not state.active:
            self._end_forward(state, raised)

    def route_enter(self, module: nn.Module) -> None:
        """A module that needs the mode starts (once the routing narrowed): the outermost one
        enters the mode if it trains with autograd on."""
        state = self._thread()
        if state.routing:
            state.routing.append(False)
        elif torch.is_grad_enabled() and module.training:
            state.mode.__enter__()
            state.routing.append(True)
        else:
            state.routing.append(False)

    def route_exit(self) -> None:
        state = self._thread()
        if state.routing and state.routing.pop():
            state.mode.__exit__(None, None, None)

    def _start_forward(self, state: "_ThreadState", args: tuple = ()) -> None:
        compiling = torch.compiler.is_compiling()
        if not compiling and self.narrowed is not None and self.narrowed != self._dense():
            self._widen()  # a layer turned dense or DropIT: observe this forward again
        state.mode_all = self.narrowed is None
        if state.mode_all:
            state.mode.__enter__()
        if compiling:
            self.compiled = True  # a write only: reading mutable state here would add guards
            return
        if in_backward():
            return
        self.compiled = False
        self.forwards += 1
        for layer in self.layers:
            layer.reset_stats()
        if self.narrowed is None:
            state.observe(self.layers)
        # one thread's plain forward decides (under a transform the ReLUs are torch.relu)
        if self.relu_pending and self._probe is None and not transform_active():
            self._probe = _ReluProbe(self.relus)
            self._probe.start()
        # decided at the end of the last forward, applied only now: a checkpointed block
        # recomputed during that forward's backward must save what its forward saved
        self.apply_kept()
        if self.kept_pending and self._kept_probe is None and not transform_active():  # one thread decides
            self._kept_probe = _KeptProbe(self.layers, args)
        state.scope = pack_cache.Scope().open()

    def _end_forward(self, state: "_ThreadState", raised: bool) -> None:
        if state.mode_all:
            state.mode.__exit__(None, None, None)
        for layer in self._parametrized:
            layer.derived = None
        state.gathered.clear()
        if torch.compiler.is_compiling() or in_backward():
            return
        seen, touched = state.seen, state.touched
        state.observe(None)
        if state.scope is not None:
            scope, state.scope = state.scope, None
            scope.close()
        if self._kept_probe is not None and self._kept_probe.thread == threading.get_ident():
            kept, self._kept_probe = self._kept_probe, None
            if raised:
                kept.cancel()
            else:
                self.kept_decisions = kept.finish()
                self.kept_pending = False
        if self._probe is not None and self._probe.thread == threading.get_ident():
            probe, self._probe = self._probe, None
            if raised:  # a forward cut short says nothing: the next one decides
                probe.cancel()
            else:
                self.relu_decisions = probe.finish()
                self.relu_pending = False
        if not self.warned and not raised:
            self.warned = True
            self._warn_unused()
        if seen is not None and not raised and not self.first_pending:
            self._narrow(seen, touched)

    # -- narrowing the routing after the observed forward ------------------------------------

    def _dense(self) -> tuple[bool, ...]:
        return tuple(layer.settings is None for layer in self.layers)

    def _narrow(self, seen: dict[int, dict[int, nn.Module]], touched: set[int]) -> None:
        """Direct forwards for the stock layers whose own forward made all their products, the
        mode only around the modules that need it, no hooks on the others (see the module
        docstring). ``seen``: per layer index, the innermost hooked modules of its products in the
        observed forward; ``touched``: the layers whose weight any torch function took there. An
        owner whose weight the observed forward used in no product but in other ops (an embedding
        table, a position embedding, a class token) needs no mode; one whose weight it did not use
        at all (an expert no token reached) keeps the mode, to route whatever it does later."""
        routed: dict[int, nn.Module] = {}
        direct: list[tuple[Layer, _Direct]] = []
        for index, layer in enumerate(self.layers):
            if layer.settings is None:
                continue  # dense: torch's own product, wherever it is made
            kind = None if layer.parametrized else _direct_kind(layer.module, layer.attr)
            if kind is not None:
                direct.append((layer, _Direct(self, index, kind)))
            elif index in seen or index not in touched:
                routed[id(layer.module)] = layer.module
            for where in seen.get(index, {}).values():
                if where is None:  # a product outside every hooked module: keep it all routed
                    return
                if where is not layer.module or kind is None:
                    routed[id(where)] = where
        root = self.hooked[0]
        for module in self.hooked:
            if module is not root:
                _remove_hooks(module, self)
        for module in routed.values():
            module.register_forward_pre_hook(_RouteEnter(self))
            module.register_forward_hook(_RouteExit(self), always_call=True)
        for layer, forward in direct:
            layer.module.__dict__["forward"] = forward
        self.narrowed = self._dense()

    def _widen(self) -> None:
        """Back to the full routing of an observed forward: hooks on every module of
        ``self.hooked``, no direct forward."""
        for module in self.hooked:
            _remove_hooks(module, self)
            _remove_direct(module, self)
            _hook(module, self)
        self.narrowed = None

    def _warn_unused(self) -> None:
        unused = []
        for layer in self.layers:
            w = layer.current() if not layer.parametrized else None
            frozen = w is not None and not w.requires_grad
            if layer.claimed and layer.settings is not None and layer.calls == 0 and not frozen \
                    and layer.module.training:
                unused.append(layer.name)
        uncovered = [f"{layer.name} ({layer.uncovered[0]})" for layer in self.layers
                     if layer.uncovered is not None and layer.name not in unused]
        if uncovered:
            shown = ", ".join(uncovered[:8]) + (f" and {len(uncovered) - 8} more" if len(uncovered) > 8 else "")
            warnings.warn(
                f"dropit_cuda: {len(uncovered)} converted weight(s) took part in a product DropIT does not "
                f"cover in the first training forward: {shown}; those products cache their input densely, "
                "see dropit_cuda.report(model).", UserWarning, stacklevel=2)
        if unused:
            shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
            warnings.warn(
                f"dropit_cuda: {len(unused)} converted weight(s) took part in no linear/conv product "
                f"through DropIT in the first training forward: {shown}. They were used some other "
                "way (or not at all), so their inputs are cached densely; see dropit_cuda.report(model).",
                UserWarning, stacklevel=2)


class _ThreadState:
    """One thread's forward through a conversion: the entered modules (True where a training
    forward runs), the mode object it pushes on that thread's torch-function mode stack, whether
    it did for the whole forward, the entries of the modules that need the mode (True where one
    entered it) and, during an observed forward, what :meth:`Conversion._narrow` decides from."""

    __slots__ = ("active", "mode", "mode_all", "routing", "stack", "seen", "touched", "weight_ids", "scope",
                 "gathered")

    def __init__(self, conversion: "Conversion") -> None:
        self.active: list[bool] = []
        self.mode = _Router(conversion, self)
        self.mode_all = False
        self.routing: list[bool] = []
        #: this forward's packs (one per distinct input)
        self.scope: Optional[pack_cache.Scope] = None
        #: id(gathered copy) -> (weak ref of it, how it was gathered), for this forward
        self.gathered: dict[int, tuple[Any, P.Gathered]] = {}
        self.observe(None)

    def observe(self, layers: Optional[list[Layer]]) -> None:
        """Starts observing a forward over ``layers`` (None: stops)."""
        #: the hooked modules entered, innermost last
        self.stack: list[nn.Module] = []
        #: per layer index, the innermost hooked modules in which a product used its weight
        self.seen: Optional[dict[int, dict[int, nn.Module]]] = None if layers is None else {}
        #: the indices of the layers whose weight any torch function took (in a product or not)
        self.touched: Optional[set[int]] = None if layers is None else set()
        #: layer index by id of its weight
        self.weight_ids: dict[int, int] = {} if layers is None else {
            id(w): i for i, w in enumerate(layer.current() for layer in layers) if w is not None}

    def touch(self, args: tuple, kwargs: dict) -> None:
        """Notes the covered weights among a torch function's tensor arguments (observed forward).
        Under torch.compile the observation is cancelled instead: a traced part of the forward
        leaves no record at run time (the write is replayed by the compiled code), so the
        routing must not narrow from it."""
        if torch.compiler.is_compiling():
            self.seen = self.touched = None
            return
        ids = self.weight_ids
        for a in itertools.chain(args, kwargs.values()):
            if isinstance(a, torch.Tensor):
                index = ids.get(id(a))
                if index is None and a._base is not None:
                    index = ids.get(id(a._base))
                if index is not None:
                    self.touched.add(index)


class _ReluProbe:
    """On the first training forward: which MaskedReLU outputs something keeps alive anyway.

    Masking a ReLU frees its output only if nothing else keeps that output for backward; where
    something does (a max-pool, a batch norm, a layer left dense), the mask costs one bit per
    element more and frees nothing. The probe holds a weak reference to the storage of each
    MaskedReLU output; when the forward has returned, a storage still alive is kept by the
    autograd graph (or the model's output), one that expired was freed thanks to the mask. Each
    MaskedReLU whose masks cost more than the outputs they freed turns back into ``nn.ReLU``.
    (Weak references change nothing the forward saves, unlike a ``saved_tensors_hooks`` probe,
    which would hide the saves from the caller's own hooks.)
    """

    def __init__(self, relus: list[tuple[str, nn.Module]]) -> None:
        self.relus = relus
        self.outputs: dict[int, list[tuple[int, int, int]]] = {id(m): [] for _, m in relus}
        self.handles: list[Any] = []
        self.thread = threading.get_ident()  # other threads' forwards are not watched

    def start(self) -> None:
        for _, m in self.relus:
            self.handles.append(m.register_forward_hook(self._watch))

    def _watch(self, module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor) and threading.get_ident() == self.thread:
            output = dtensor.local_of(output)  # a DTensor's memory is its local tensor
            storage = output.untyped_storage()
            mask_bytes = (output.numel() + 31) // 32 * 4
            self.outputs[id(module)].append((storage._weak_ref(), storage.nbytes(), mask_bytes))

    def finish(self) -> dict[str, str]:
        decisions = {}
        for name, m in self.relus:
            outs = self.outputs[id(m)]
            if not outs:
                decisions[name] = "masked (not called in the first training forward)"
                continue
            freed = sum(nbytes for ref, nbytes, _ in outs if torch.UntypedStorage._expired(ref))
            if sum(mask for _, _, mask in outs) >= freed:
                m.to_plain()
                decisions[name] = "plain (its output is kept alive by another op anyway)"
            else:
                decisions[name] = "masked"
        self.cancel()
        return decisions

    def cancel(self) -> None:
        """Stops watching and lets go of the weak references, deciding nothing."""
        for h in self.handles:
            h.remove()
        for outs in self.outputs.values():
            for ref, _, _ in outs:
                torch.UntypedStorage._free_weak_ref(ref)
        self.outputs.clear()


class _KeptProbe:
    """On the first training forward: which DropIT products pack an input that something else
    keeps alive anyway (an op's saved tensors, the model's output or input), so that packing it
    adds the pack's bytes and frees none (the model's own inputs are not judged: the caller may or
    may not keep them). Like :class:`_ReluProbe`, it holds weak references to
    the storages of the packed inputs; a storage still alive when the forward has returned is kept
    elsewhere. A weight all of whose packs freed nothing caches its input dense from the next
    forward on: its products save the input itself (no copy), still through DropIT, which keeps
    no autocast copy of the weight, unlike torch's own product."""

    def __init__(self, layers: list[Layer], inputs: tuple) -> None:
        self.thread = threading.get_ident()
        self.layers = layers
        self.seen: dict[int, list[tuple[Any, int]]] = {}
        # the model's own inputs: whether the caller keeps them during backward is not known here
        leaves, _ = torch.utils._pytree.tree_flatten(inputs)
        self.inputs = set()
        for t in leaves:
            try:
                self.inputs.add(t.untyped_storage().data_ptr())
            except (AttributeError, NotImplementedError, RuntimeError, TypeError):
                pass  # not a tensor, or one without a storage of its own
        for layer in layers:
            layer.probe = self

    def saw(self, layer: Layer, x: torch.Tensor, cached_bytes: int) -> None:
        try:
            storage = x.untyped_storage()
        except (NotImplementedError, RuntimeError, TypeError):  # a torch.func wrapper: not judged
            return
        if storage.data_ptr() not in self.inputs:
            self.seen.setdefault(id(layer), []).append((storage._weak_ref(), cached_bytes))

    def finish(self) -> dict[str, str]:
        decisions = {}
        for layer in self.layers:
            seen = self.seen.get(id(layer))
            if not seen or layer.settings is None or layer.keep_input:
                continue
            if all(not torch.UntypedStorage._expired(ref) for ref, _ in seen):
                decisions[layer.name] = "dense (its input is kept alive by another op anyway)"
        self.cancel()
        return decisions

    def cancel(self) -> None:
        """Stops watching and lets go of the weak references, deciding nothing."""
        for layer in self.layers:
            layer.probe = None
        for seen in self.seen.values():
            for ref, _ in seen:
                torch.UntypedStorage._free_weak_ref(ref)
        self.seen.clear()


# --- attaching and detaching a conversion -------------------------------------------------------


def _remove_hooks(module: nn.Module, conversion: Optional[Conversion] = None) -> None:
    """Removes the hooks of ``conversion`` (of any conversion if None) from ``module``."""
    always = getattr(module, "_forward_hooks_always_called", {})
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, HOOK_TYPES)
                    and (conversion is None or getattr(h, "conversion", None) is conversion)]:
            del hooks[key]
            always.pop(key, None)


def _remove_direct(module: nn.Module, conversion: Optional[Conversion] = None) -> None:
    """Removes a direct forward of ``conversion`` (of any conversion if None) from ``module``."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, _Direct) and (conversion is None or forward.conversion is conversion):
        del module.__dict__["forward"]


def _hook(module: nn.Module, conversion: Conversion) -> None:
    module.register_forward_pre_hook(_Enter(conversion))
    module.register_forward_hook(_Exit(conversion), always_call=True)


def detach(model: nn.Module) -> None:
    """Removes every conversion inside ``model``: hooks, direct forwards, records, and the ReLU
    swaps it made (DropIT module classes stay)."""
    for module in model.modules():
        conversion = module.__dict__.pop("_dropit_conversion", None)
        for _, relu in conversion.relus if conversion is not None else ():
            if type(relu) is MaskedReLU:
                relu.to_plain()
    for module in model.modules():
        _remove_hooks(module)
        _remove_direct(module)
        module.__dict__.pop("_dropit_layers", None)


def attach(root: nn.Module, layers: list[Layer], relus: list[tuple[str, nn.Module]], skip_first: bool,
           dense_where_kept: bool = True) -> Conversion:
    """Attaches a conversion of ``layers`` to ``root``: records and hooks (see :mod:`.routing`)."""
    by_name = dict(root.named_modules())
    for layer in layers:
        layer.module.__dict__.setdefault("_dropit_layers", {})[layer.attr] = layer
    # the root, the owners and every module between them
    hooked: set[str] = {""}
    for name, m in by_name.items():
        if "_dropit_layers" in m.__dict__:
            parts = name.split(".")
            hooked.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    modules = [root] + [m for name, m in by_name.items() if name in hooked and m is not root]
    conversion = Conversion(layers, relus, skip_first, modules, dense_where_kept)
    root.__dict__["_dropit_conversion"] = conversion
    for layer in layers:
        if layer.parametrized:
            layer.module.parametrizations[layer.attr].register_forward_hook(_Derived(layer))
    for module in modules:
        _hook(module, conversion)
    return conversion


def conversion_of(model: nn.Module) -> Optional[Conversion]:
    """The conversion attached to ``model`` itself, if any."""
    return model.__dict__.get("_dropit_conversion")
