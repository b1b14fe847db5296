"""Build configuration shared by ``setup.py`` (ahead of time) and the just-in-time loader.

Kept free of package imports so that ``setup.py`` can load it from its file path.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder, or None.

    torch guesses ``CUDA_HOME`` from the folder above ``nvcc`` on ``PATH``; where ``nvcc`` is a
    wrapper script (``/usr/local/bin/nvcc`` here) that guess is wrong, so a candidate counts only
    if it really holds ``bin/nvcc`` and ``include/cuda_runtime.h``.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for cand in candidates:
        if cand and (Path(cand) / "bin" / "nvcc").exists() and (
            Path(cand) / "include" / "cuda_runtime.h"
        ).exists():
            return cand
    return None


def want_cuda() -> bool:
    """Whether to compile the CUDA kernels: ``DROPIT_CUDA=0/1`` forces it, else toolkit and a
    CUDA build of torch decide (no GPU is needed to compile)."""
    forced = os.environ.get("DROPIT_CUDA")
    import torch

    available = find_cuda_home() is not None and torch.version.cuda is not None
    if forced is not None and forced.strip() not in ("", "auto"):
        if forced.strip() == "1" and not available:
            raise RuntimeError(
                "DROPIT_CUDA=1 but no CUDA toolkit was found or torch is not a CUDA build "
                f"(torch.version.cuda={torch.version.cuda})"
            )
        return forced.strip() == "1"
    return available


def prepare_cuda_env() -> None:
    """Point torch's extension builder at the real toolkit and set a default arch list.

    Must run before ``torch.utils.cpp_extension`` is imported: it reads ``CUDA_HOME`` once.
    """
    home = find_cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)


def root() -> Path:
    return Path(__file__).resolve().parent.parent


def sources(with_cuda: bool, base: Path | None = None) -> list[str]:
    """Every native source, relative to ``base`` when given (setup.py wants relative paths)."""
    top = root()
    files = sorted((top / "csrc").glob("*.cpp")) + sorted((top / "csrc" / "cpu").glob("*.cpp"))
    if with_cuda:
        files += sorted((top / "csrc" / "cuda").glob("*.cu"))
    return [str(f.relative_to(base) if base else f) for f in files]


def openmp_flags() -> list[str]:
    """The compiler and linker flag that lets the CPU kernels run on several threads.

    With torch's OpenMP backend (Linux wheels), ``at::parallel_for`` is inline in the headers: it
    runs its loop serially unless the extension itself is compiled and linked with OpenMP. The
    library then needs ``libgomp.so.1``, the one torch has already loaded.
    """
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []  # the native backend's parallel_for lives in libtorch: nothing to add
    return ["/openmp"] if sys.platform == "win32" else ["-fopenmp"]


def compile_args(with_cuda: bool) -> dict[str, list[str]]:
    cxx = ["-O3", "-std=c++20", "-DDROPIT_PYTHON_MODULE", *openmp_flags()]
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        define = "-DDROPIT_CUDA_ARCHS=" + ",".join(archs.replace(";", " ").split())
        cxx += ["-DDROPIT_WITH_CUDA", define]
        # Not to nvcc: it splits -D values at commas. Only ops.cpp (a C++ file) reads it.
        nvcc += ["-DDROPIT_WITH_CUDA"]
    return {"cxx": cxx, "nvcc": nvcc}


def link_args() -> list[str]:
    return openmp_flags()
