"""The DropIT settings of a layer, their defaults and their validation, in one place.

A layer caches its input according to three settings: the dropping rate ``gamma``, the
``strategy`` that picks what is kept, and the ``chunk`` size ``D`` of the chunked strategies.
:class:`Settings` holds them, checked once when it is made; everything downstream (the autograd
functions, ``convert``, the report) takes a ``Settings`` and never re-checks it.

``convert`` also accepts each setting per layer (:data:`LayerSpec`): one value for every layer, a
dict of ``fnmatch`` patterns (first matching pattern wins; ``None`` keeps the layer dense), or a
callable ``(name, module) -> value or None``. :func:`resolve` turns such a spec into the value for
one layer.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_GAMMA",
    "DEFAULT_STRATEGY",
    "MAX_CHUNK",
    "STRATEGY_NAMES",
    "LayerSpec",
    "Settings",
    "check_chunk",
    "check_gamma",
    "check_strategy",
    "keep_count",
    "name_matches",
]

DEFAULT_GAMMA = 0.9
DEFAULT_STRATEGY = "parallel_min_k"
DEFAULT_CHUNK = 16384  # the paper's D = 2^14
MAX_CHUNK = 65536  # offsets are 16-bit
#: the strategies of the paper's Table 2 (implemented in :mod:`dropit_cuda.strategies`)
STRATEGY_NAMES = ("parallel_min_k", "min_k", "random", "min_k_channel", "random_channel")


def check_gamma(gamma: Any, name: str = "gamma") -> float:
    """``gamma`` as a float in ``[0, 1)``; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(gamma).__name__}")
    if not 0.0 <= gamma < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {gamma}")
    return float(gamma)


def check_chunk(chunk: Any, name: str = "chunk") -> int:
    """``chunk`` as an int in ``[1, MAX_CHUNK]``; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(f"{name} must be an int in [1, {MAX_CHUNK}], got {type(chunk).__name__}")
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"{name} must be in [1, {MAX_CHUNK}], got {chunk}")
    return chunk


def check_strategy(strategy: Any, name: str = "strategy") -> str:
    """``strategy`` if it names a known strategy; TypeError/ValueError naming ``name`` otherwise."""
    if not isinstance(strategy, str):
        raise TypeError(f"{name} must be a str, one of {list(STRATEGY_NAMES)}, got {type(strategy).__name__}")
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"{name} must be one of {list(STRATEGY_NAMES)}, got {strategy!r}")
    return strategy


def keep_count(length: int, gamma: float) -> int:
    """Elements a chunk of ``length`` keeps: ``length - floor(gamma * length)``."""
    return length - math.floor(gamma * length)


@dataclass(frozen=True)
class Settings:
    """How a DropIT layer caches its input; validated when made (TypeError/ValueError naming the
    field)."""

    gamma: float = DEFAULT_GAMMA
    strategy: str = DEFAULT_STRATEGY
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", check_gamma(self.gamma))
        object.__setattr__(self, "strategy", check_strategy(self.strategy))
        object.__setattr__(self, "chunk", check_chunk(self.chunk))

    def __str__(self) -> str:
        return f"gamma={self.gamma}, strategy={self.strategy!r}, chunk={self.chunk}"

    @staticmethod
    def of(gamma: Any, strategy: Any, chunk: Any) -> "Settings":
        """``Settings(gamma, strategy, chunk)``, memoised for the functional API (which makes one
        per call): the same checks and errors, each combination validated once."""
        try:
            return _memo(type(gamma), gamma, type(strategy), strategy, type(chunk), chunk)
        except TypeError as e:  # an unhashable argument: unmemoised, with Settings' own error
            if "unhashable" not in str(e):
                raise
            return Settings(gamma, strategy, chunk)


@functools.lru_cache(maxsize=256)
def _memo(_gt: type, gamma: Any, _st: type, strategy: Any, _ct: type, chunk: Any) -> Settings:
    # the types are part of the key: True == 1 and 0 == 0.0 must not share an entry
    return Settings(gamma, strategy, chunk)


#: A setting for every layer: one value, ``{pattern: value or None}`` (``fnmatch`` on the layer's
#: name or an ancestor's; first match wins), or ``(name, module) -> value or None``.
LayerSpec = Union[Any, Mapping[str, Any], Callable[[str, Any], Any]]


def name_matches(name: str, pattern: str) -> bool:
    """``name`` or one of its ancestors (``a``, ``a.b`` for ``a.b.c``) matches ``pattern``."""
    parts = name.split(".") if name else [""]
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: what :func:`resolve` returns for a dict spec with no matching pattern
UNSET = _Unset()


def check_spec(spec: LayerSpec, what: str) -> None:
    """Raises TypeError for a dict spec whose keys are not strings (values are checked per layer)."""
    if isinstance(spec, Mapping):
        for pattern in spec:
            if not isinstance(pattern, str):
                raise TypeError(f"{what}: dict keys must be fnmatch patterns (str), got {pattern!r}")


def resolve(spec: LayerSpec, name: str, module: Any, what: str) -> tuple[Any, Optional[str]]:
    """The value ``spec`` gives the layer ``name`` (owned by ``module``), and the pattern that gave
    it (None for a plain value or a callable). A dict with no matching pattern gives
    :data:`UNSET`; ``None`` means "keep this layer dense"."""
    if isinstance(spec, Mapping):
        for pattern, value in spec.items():
            if name_matches(name, pattern):
                return value, pattern
        return UNSET, None
    if callable(spec) and not isinstance(spec, type):
        return spec(name, module), None
    return spec, None


_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "gamma": check_gamma, "strategy": check_strategy, "chunk": check_chunk,
}
_DEFAULTS = {"gamma": DEFAULT_GAMMA, "strategy": DEFAULT_STRATEGY, "chunk": DEFAULT_CHUNK}


def settings_for(specs: Mapping[str, LayerSpec], name: str, module: Any) -> tuple[Optional[Settings], set]:
    """The settings that ``specs`` (``{"gamma": spec, "strategy": spec, "chunk": spec}``) give the
    layer ``name``, or None when one of them says "dense"; also the dict patterns that matched.

    A dict with no matching pattern leaves that setting at its default. A bad value raises a
    TypeError/ValueError naming the setting and, for dict specs, the pattern it came from.
    """
    values, used = {}, set()
    dense = False
    for what, spec in specs.items():
        value, pattern = resolve(spec, name, module, what)
        if pattern is not None:
            used.add((what, pattern))
        if value is UNSET:
            value = _DEFAULTS[what]
        if value is None:
            dense = True
            continue
        where = f"{what}[{pattern!r}]" if pattern is not None else (
            f"{what}({name!r})" if callable(spec) and not isinstance(spec, (Mapping, type)) else what)
        values[what] = _CHECKS[what](value, where)
    return (None if dense else Settings(**values)), used
