"""Loads the native library: the ahead-of-time ``_C`` module, else a just-in-time build."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from . import _build

_state: dict = {}


def _jit_build() -> ModuleType:
    with_cuda = _build.want_cuda()
    if with_cuda:
        _build.prepare_cuda_env()
        if "torch.utils.cpp_extension" in sys.modules:  # it read CUDA_HOME at import
            sys.modules["torch.utils.cpp_extension"].CUDA_HOME = _build.find_cuda_home()
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise ImportError(
            "dropit_cuda's compiled module _C is missing, and building it just in time needs ninja "
            "(and a C++ compiler): `python -m pip install ninja` (the package's [jit] extra), or "
            "build ahead of time with `pip install .`"
        )
    args = _build.compile_args(with_cuda)
    return cpp_extension.load(
        name="dropit_cuda_jit" + ("_cuda" if with_cuda else "_cpu"),
        sources=_build.sources(with_cuda),
        extra_include_paths=[str(_build.root() / "csrc")],
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args["nvcc"],
        extra_ldflags=_build.link_args(),
        with_cuda=with_cuda,
        is_python_module=True,
        verbose=False,
    )


def load() -> str:
    """Loads the ops once; returns how they were built: ``"aot"`` or ``"jit"``."""
    if "mode" not in _state:
        try:
            spec = importlib.util.find_spec("dropit_cuda._C")
            if spec is None or spec.origin is None:
                raise ImportError("no compiled _C")
            # Only a _C built beside this very package: an import hook of another install of
            # dropit_cuda (an editable one, say) could otherwise hand over its older library.
            if Path(spec.origin).resolve().parent != Path(__file__).resolve().parent:
                raise ImportError(f"_C at {spec.origin} belongs to another copy of dropit_cuda")
            _state["module"] = importlib.import_module("dropit_cuda._C")
            _state["mode"] = "aot"
        except ImportError:
            if not (_build.root() / "csrc").is_dir():
                raise ImportError(
                    "dropit_cuda's compiled module _C is missing and its C++ sources are not "
                    "beside the package to build it just in time; reinstall with `pip install .`"
                ) from None
            _state["module"] = _jit_build()
            _state["mode"] = "jit"
    return _state["mode"]


def module() -> ModuleType:
    """The loaded Python module (``csrc/python_module.cpp``): the eager products bound unboxed."""
    load()
    return _state["module"]


def extension_info() -> dict:
    """How the native code was built.

    Keys: ``mode`` (``"aot"`` or ``"jit"``), ``cuda_kernels`` (whether CUDA implementations are
    registered), ``cuda_archs`` (the architectures they were compiled for), ``cuda_available``
    (whether torch sees a GPU now), ``openmp`` (whether the CPU kernels were compiled with
    OpenMP, without which they run on one thread under torch's OpenMP backend), ``torch`` and
    ``torch_cuda`` (versions).
    """
    mode = load()
    fields = dict(kv.split("=", 1) for kv in torch.ops.dropit_cuda.build_info().split("|"))
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("dropit_cuda::pack", "CUDA")
    return {
        "mode": mode,
        "cuda_kernels": bool(has_cuda),
        "cuda_archs": fields["archs"].split(",") if fields.get("archs") else [],
        "cuda_available": torch.cuda.is_available(),
        "openmp": fields.get("openmp") == "1",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
