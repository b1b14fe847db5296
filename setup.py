"""Ahead-of-time build: ``pip install .``.

Compiles the CUDA kernels when a CUDA toolkit is found and torch is a CUDA build (no GPU needed);
``DROPIT_CUDA=0/1`` forces the choice. ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0+PTX``.
"""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_dropit_build", HERE / "dropit_cuda" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

WITH_CUDA = _build.want_cuda()
if WITH_CUDA:
    _build.prepare_cuda_env()  # before cpp_extension reads CUDA_HOME

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

extension = (CUDAExtension if WITH_CUDA else CppExtension)(
    "dropit_cuda._C",
    _build.sources(WITH_CUDA, base=HERE),
    include_dirs=[str(HERE / "csrc")],
    extra_compile_args=_build.compile_args(WITH_CUDA),
    extra_link_args=_build.link_args(),
)

setup(
    packages=find_packages(include=["dropit_cuda", "dropit_cuda.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
