"""DropIT modules: drop-in subclasses of ``nn.Linear``, ``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d`` and ``nn.MultiheadAttention``.

Each takes its parent's constructor arguments plus the keyword-only ``gamma``, ``strategy`` and
``chunk``, and has the parent's parameters, ``state_dict`` and forward: it is the parent module
with its weights covered by DropIT the way :func:`dropit_cuda.convert` covers a model's (the
settings are plain attributes, not state). In training mode with autograd enabled the products
against its weights cache a compressed input; in eval mode or under ``torch.no_grad()`` it runs
exactly as the parent. Inside a model that is converted as a whole, the model's conversion takes
the module over (with the settings ``convert`` gives it).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .routing import Layer, attach, detach
from .settings import DEFAULT_CHUNK, DEFAULT_GAMMA, DEFAULT_STRATEGY, Settings

__all__ = [
    "DropITConv1d",
    "DropITConv2d",
    "DropITConv3d",
    "DropITConvTranspose1d",
    "DropITConvTranspose2d",
    "DropITConvTranspose3d",
    "DropITLayer",
    "DropITLinear",
    "DropITMultiheadAttention",
]


class DropITLayer:
    """Mixin of every DropIT module: its settings, the class swap in and out."""

    #: the ``torch.nn`` class a module built directly as this class reverts to
    plain_class: type = nn.Module

    def _weight_attrs(self) -> list[str]:
        """This module's own weights DropIT covers."""
        return ["weight"]

    def _covered(self) -> list[tuple[str, nn.Module, str]]:
        """``(layer name, owner, attribute)`` of every weight this module covers on its own."""
        return [(attr, self, attr) for attr in self._weight_attrs() if getattr(self, attr, None) is not None]

    @property
    def dropit_settings(self) -> Optional[Settings]:
        """The settings of this module's (first) weight; None when its conversion keeps it dense."""
        layers = self.__dict__.get("_dropit_layers", {})
        layer = layers.get(self._weight_attrs()[0])
        return None if layer is None else layer.settings

    def _setting(self, name: str):
        s = self.dropit_settings
        return None if s is None else getattr(s, name)

    def _set_setting(self, name: str, value) -> None:
        current = self.dropit_settings or Settings()
        values = {"gamma": current.gamma, "strategy": current.strategy, "chunk": current.chunk, name: value}
        self.set_dropit(**values)

    gamma = property(lambda self: self._setting("gamma"), lambda self, v: self._set_setting("gamma", v),
                     doc="The dropping rate (None while a model's conversion keeps this layer dense).")
    strategy = property(lambda self: self._setting("strategy"), lambda self, v: self._set_setting("strategy", v),
                        doc="The strategy (None while a model's conversion keeps this layer dense).")
    chunk = property(lambda self: self._setting("chunk"), lambda self, v: self._set_setting("chunk", v),
                     doc="The chunk size (None while a model's conversion keeps this layer dense).")

    def set_dropit(self, gamma: float = DEFAULT_GAMMA, strategy: str = DEFAULT_STRATEGY,
                   chunk: int = DEFAULT_CHUNK) -> None:
        """Checks the settings (TypeError/ValueError naming the argument), then covers this module's
        weights with them on its own (a conversion of this module alone, no ``skip_first``)."""
        settings = Settings(gamma, strategy, chunk)
        detach(self)  # type: ignore[arg-type]
        layers = [Layer(name, owner, attr, settings, None, True, False) for name, owner, attr in self._covered()]
        attach(self, layers, [], skip_first=False)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        s = self.dropit_settings
        own = str(s) if s is not None else "dense"
        return f"{base}, {own}" if base else own

    @classmethod
    def from_module(cls, module: nn.Module, gamma: float = DEFAULT_GAMMA, strategy: str = DEFAULT_STRATEGY,
                    chunk: int = DEFAULT_CHUNK) -> nn.Module:
        """Turns ``module`` (an instance of ``plain_class``) into ``cls`` in place, keeping its
        parameters, buffers and hooks; returns it. Nothing changes if the settings are bad."""
        if not isinstance(module, cls.plain_class):
            raise TypeError(f"module must be a {cls.plain_class.__name__}, got {type(module).__name__}")
        settings = Settings(gamma, strategy, chunk)
        original = type(module)
        module.__class__ = cls
        module.__dict__["_dropit_plain_class"] = original
        module.set_dropit(settings.gamma, settings.strategy, settings.chunk)  # type: ignore[attr-defined]
        return module

    def to_plain(self) -> nn.Module:
        """Turns this module back into its plain ``torch.nn`` class in place; returns it."""
        detach(self)  # type: ignore[arg-type]
        self.__class__ = self.__dict__.pop("_dropit_plain_class", type(self).plain_class)
        return self  # type: ignore[return-value]


def _dropit_class(plain: type, doc: str) -> type:
    def __init__(self, *args, gamma: float = DEFAULT_GAMMA, strategy: str = DEFAULT_STRATEGY,
                 chunk: int = DEFAULT_CHUNK, **kwargs) -> None:
        settings = Settings(gamma, strategy, chunk)  # checked before anything is built
        plain.__init__(self, *args, **kwargs)
        self.set_dropit(settings.gamma, settings.strategy, settings.chunk)

    name = f"DropIT{plain.__name__}"
    return type(name, (DropITLayer, plain), {
        "__init__": __init__, "plain_class": plain, "__doc__": doc, "__module__": __name__,
        "__qualname__": name,
    })


DropITLinear = _dropit_class(nn.Linear, "``nn.Linear`` that caches a DropIT-compressed input for the "
                             "weight gradient (channel strategies: the last dimension).")
DropITConv1d = _dropit_class(nn.Conv1d, "``nn.Conv1d`` that caches a DropIT-compressed input "
                             "(channel strategies: dimension 1).")
DropITConv2d = _dropit_class(nn.Conv2d, "``nn.Conv2d`` that caches a DropIT-compressed input "
                             "(channel strategies: dimension 1).")
DropITConv3d = _dropit_class(nn.Conv3d, "``nn.Conv3d`` that caches a DropIT-compressed input "
                             "(channel strategies: dimension 1).")
DropITConvTranspose1d = _dropit_class(nn.ConvTranspose1d, "``nn.ConvTranspose1d`` that caches a "
                                      "DropIT-compressed input.")
DropITConvTranspose2d = _dropit_class(nn.ConvTranspose2d, "``nn.ConvTranspose2d`` that caches a "
                                      "DropIT-compressed input.")
DropITConvTranspose3d = _dropit_class(nn.ConvTranspose3d, "``nn.ConvTranspose3d`` that caches a "
                                      "DropIT-compressed input.")


class DropITMultiheadAttention(DropITLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projections (``in_proj_weight`` or ``q/k/v_proj_weight``,
    and ``out_proj.weight``) cache DropIT-compressed inputs; its forward is the parent's."""

    plain_class = nn.MultiheadAttention

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, device=None, dtype=None, *, gamma: float = DEFAULT_GAMMA,
                 strategy: str = DEFAULT_STRATEGY, chunk: int = DEFAULT_CHUNK) -> None:
        settings = Settings(gamma, strategy, chunk)
        nn.MultiheadAttention.__init__(self, embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn,
                                       kdim, vdim, batch_first, device, dtype)
        self.set_dropit(settings.gamma, settings.strategy, settings.chunk)

    def _weight_attrs(self) -> list[str]:
        return ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]

    @property
    def dropit_settings(self) -> Optional[Settings]:
        layers = self.__dict__.get("_dropit_layers", {})
        for attr in self._weight_attrs():
            if attr in layers:
                return layers[attr].settings
        return None

    def _covered(self) -> list[tuple[str, nn.Module, str]]:
        return super()._covered() + [("out_proj", self.out_proj, "weight")]
