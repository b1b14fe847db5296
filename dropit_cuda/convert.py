"""``convert``: turn a model's conv/linear layers into DropIT layers in place; ``revert`` undoes it."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch.nn as nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .modules import (
    DropITConv1d,
    DropITConv2d,
    DropITConv3d,
    DropITLayer,
    DropITLinear,
    DropITMultiheadAttention,
)
from .ops import check_chunk, check_gamma
from .relu import MaskedReLU
from .strategies import check_strategy

__all__ = ["SWAPS", "Swap", "convert", "revert"]

Patterns = Union[str, Sequence[str], None]


@dataclass(frozen=True)
class Swap:
    """One entry of the conversion table.

    ``plain``: the exact module type that gets converted (subclasses are left alone: their
    forward may differ). ``make(module, **settings)`` returns the converted module (the same object
    changed in place, or a new one to put in its place). ``is_layer``: it is a conv/linear-like
    layer, a candidate for ``skip_first``.
    """

    plain: type
    make: Callable[..., nn.Module]
    is_layer: bool = True


def _swap_to(cls: type) -> Callable[..., nn.Module]:
    def make(module: nn.Module, gamma: float, strategy: str, chunk: int, **_: Any) -> nn.Module:
        return cls.from_module(module, gamma, strategy, chunk)

    return make


#: the default conversion table; options of ``convert`` may extend it
SWAPS: tuple[Swap, ...] = (
    Swap(nn.Linear, _swap_to(DropITLinear)),
    # the out_proj of nn.MultiheadAttention
    Swap(NonDynamicallyQuantizableLinear, _swap_to(DropITLinear)),
    Swap(nn.Conv1d, _swap_to(DropITConv1d)),
    Swap(nn.Conv2d, _swap_to(DropITConv2d)),
    Swap(nn.Conv3d, _swap_to(DropITConv3d)),
    Swap(nn.MultiheadAttention, _swap_to(DropITMultiheadAttention)),
)


def _swap_table(**options: Any) -> dict[type, Swap]:
    """The table ``convert`` uses for these options (a hook for options that add swaps)."""
    table = {s.plain: s for s in SWAPS}
    if options.get("relu_mask"):
        table[nn.ReLU] = RELU_MASK_SWAP
    return table


# --- relu_mask: nn.ReLU -> MaskedReLU (dropit_cuda/relu.py) --------------------------------------
def _mask_relu(module: nn.Module, **_: Any) -> nn.Module:
    return MaskedReLU.from_module(module)


#: the swap ``relu_mask=True`` adds; ReLUs are not layers, so ``skip_first`` never skips one
RELU_MASK_SWAP = Swap(nn.ReLU, _mask_relu, is_layer=False)


def _patterns(value: Patterns, name: str) -> Optional[list[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        out = list(value)
        if all(isinstance(p, str) for p in out):
            return out
    raise TypeError(f"{name} must be a str, a sequence of str, or None, got {value!r}")


def _matches(name: str, pattern: str) -> bool:
    """``name`` or one of its ancestors (``a``, ``a.b`` for ``a.b.c``) matches ``pattern``."""
    parts = name.split(".") if name else [""]
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _first_called(model: nn.Module, candidates: list[tuple[str, nn.Module]], example_inputs: Any) -> Optional[str]:
    """Name of the first candidate module a forward pass on ``example_inputs`` calls."""
    import torch

    order: list[str] = []
    handles = []
    for name, module in candidates:
        def hook(mod, args, _name=name):
            if not order:
                order.append(_name)
        handles.append(module.register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return order[0] if order else None


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert(
    model: nn.Module,
    gamma: float = 0.9,
    strategy: str = "parallel_min_k",
    chunk: int = 16384,
    skip_first: bool = True,
    include: Patterns = None,
    exclude: Patterns = None,
    *,
    relu_mask: bool = True,
    example_inputs: Any = None,
) -> nn.Module:
    """Swaps ``model``'s layers for DropIT layers in place and returns ``model``.

    Converted: ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.MultiheadAttention`` (exact types;
    subclasses with their own forward are left alone), and ``nn.ReLU`` into :class:`MaskedReLU`
    unless ``relu_mask=False``. The modules keep their class's parameters
    (the very same ``Parameter`` objects), buffers, hooks and ``state_dict``: only their class
    changes. ``nn.MultiheadAttention`` becomes :class:`DropITMultiheadAttention`, whose input
    projections go through DropIT, and its ``out_proj`` becomes a :class:`DropITLinear` that it
    applies (its output projection is DropIT only when the attention module itself is converted).
    Layers converted before get the new settings.

    Args:
        model: the model, changed in place.
        gamma, strategy, chunk: the DropIT settings (see :func:`dropit_cuda.functional.linear`).
        skip_first: leave the first layer the input meets dense (the paper's rule: dropping
            elements of the input data itself hurts). Without ``example_inputs`` that layer is
            taken to be the first convertible conv/linear/attention module in registration order
            (``model.named_modules()``), which is the input layer of torchvision's ResNets and
            ViTs and of most ``nn.Sequential`` models. With ``example_inputs`` it is found by a
            forward pass (eval mode, ``torch.no_grad()``, training flags restored afterwards)
            with pre-hooks recording the first convertible module called.
        include: module-name patterns (``fnmatch``, e.g. ``"layer*.conv1"``; a str or a list);
            only modules whose qualified name or an ancestor's matches are converted.
        exclude: patterns of the same kind; matching modules are not converted.
        example_inputs: optional input (a tensor or a tuple of positional arguments) for
            ``skip_first``'s detection.
        relu_mask: also turn every ``nn.ReLU`` (exact type) into a :class:`MaskedReLU`, which caches
            a 1-bit mask instead of its output (outputs and gradients unchanged, bit for bit).
            Without it, in conv -> BatchNorm -> ReLU -> conv stacks (ResNets) DropIT frees almost
            nothing: the ReLU keeps the dense tensor the next conv packs. With it, that tensor is
            held by the conv alone and its packing frees it. The module object itself changes class,
            so one ReLU applied in several places is masked everywhere. ``include``/``exclude``
            apply to ReLUs too; ``skip_first`` does not (a ReLU is not a layer). Turn it off when
            code needs ``type(m) is nn.ReLU`` (e.g. module-fusion passes matching on types), for
            forward-mode AD, ``torch.func`` transforms or TorchScript (MaskedReLU's Python autograd
            function supports none of them; ``torch.compile`` works), or where it gains nothing: a
            ReLU whose output another op saves anyway (a max-pool, a BatchNorm, a layer left dense)
            keeps that output alive, so the mask costs 1 bit per element more. Activations called as
            functions (``F.relu``, ``torch.relu``) are not modules and stay as they are.

    Raises:
        TypeError/ValueError naming the argument: bad settings, patterns of the wrong type, or an
        ``include``/``exclude`` pattern that matches no convertible module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    gamma = check_gamma(gamma)
    strategy = check_strategy(strategy)
    chunk = check_chunk(chunk)
    if not isinstance(skip_first, bool):
        raise TypeError(f"skip_first must be a bool, got {type(skip_first).__name__}")
    if not isinstance(relu_mask, bool):
        raise TypeError(f"relu_mask must be a bool, got {type(relu_mask).__name__}")
    inc = _patterns(include, "include")
    exc = _patterns(exclude, "exclude")
    table = _swap_table(relu_mask=relu_mask)

    candidates: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module) in table or isinstance(module, DropITLayer):
            candidates.append((name, module))
    layer_names = [n for n, m in candidates if isinstance(m, DropITLayer) or table[type(m)].is_layer]

    for arg, pats in (("include", inc), ("exclude", exc)):
        for pat in pats or ():
            if not any(_matches(n, pat) for n, _ in candidates):
                raise ValueError(f"{arg} pattern {pat!r} matches no convertible module of the model")

    first = None
    if skip_first and layer_names:
        if example_inputs is not None:
            layers = [(n, m) for n, m in candidates if n in set(layer_names)]
            first = _first_called(model, layers, example_inputs)
        else:
            first = layer_names[0]

    for name, module in candidates:
        if name == first:
            continue
        if inc is not None and not any(_matches(name, p) for p in inc):
            continue
        if exc is not None and any(_matches(name, p) for p in exc):
            continue
        if isinstance(module, DropITLayer):
            module.set_dropit(gamma, strategy, chunk)
            continue
        new = table[type(module)].make(module, gamma=gamma, strategy=strategy, chunk=chunk)
        if new is not module:
            if not name:
                raise ValueError("model itself would be replaced; wrap it in a container first")
            _set_child(model, name, new)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Turns every DropIT module of ``model`` back into its plain ``torch.nn`` class, in place.

    Any module whose class defines ``to_plain()`` is reverted by it (the result replaces the module
    when it is a different object); parameters are shared, not copied. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, module in list(model.named_modules()):
        to_plain = getattr(type(module), "to_plain", None)
        if to_plain is None:
            continue
        new = to_plain(module)
        if new is not module:
            if not name:
                return new
            _set_child(model, name, new)
    return model
