"""Builds the test-only extension that runs the CUDA kernel bodies under the host SIMT layer.

``load()`` compiles ``tests/simt/*.cpp`` (with ``csrc/`` on the include path) just in time with
``torch.utils.cpp_extension.load`` under the name ``dropit_simt_ext``, in
``$TORCH_EXTENSIONS_DIR/dropit_simt_ext`` (torch's default extensions folder when unset).
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NAME = "dropit_simt_ext"

_module = None


def load(verbose: bool = False, debug_info: bool = False):
    """The compiled extension module (built once per process, cached on disk by torch).

    ``debug_info``: a build with line tables (``-g``, named ``dropit_simt_ext_g``), so that the
    profile's sites resolve to source lines (``benchmarks/bench_kernel_cost.py``). One process
    loads one of the two builds."""
    global _module
    if _module is None:
        from torch.utils import cpp_extension

        name = NAME + ("_g" if debug_info else "")
        build_dir = None
        base = os.environ.get("TORCH_EXTENSIONS_DIR")
        if base:
            build_dir = os.path.join(base, name)
            os.makedirs(build_dir, exist_ok=True)
        _module = cpp_extension.load(
            name=name,
            sources=[str(p) for p in sorted(HERE.glob("*.cpp"))],
            extra_include_paths=[str(ROOT / "csrc"), str(HERE)],
            extra_cflags=["-O2", "-std=c++20"] + (["-g"] if debug_info else []),
            build_directory=build_dir,
            with_cuda=False,
            verbose=verbose,
        )
    return _module
