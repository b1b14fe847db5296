"""CMakeLists.txt builds the same ops: configure, build and load the library in a fresh process."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dropit_cuda._build import find_cuda_home

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys, torch
torch.ops.load_library(sys.argv[1])
x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
values, index = torch.ops.dropit_cuda.pack(x, 0.9, 1000, True, None)
y = torch.ops.dropit_cuda.unpack(values, index, x.numel(), 0.9, 1000, True)
# keep(1000) = 100 per chunk, the largest |x| of each chunk
for c in range(5):
    chunk = x[c * 1000:(c + 1) * 1000]
    top = chunk.abs().topk(100).indices.sort().values
    assert torch.equal(y[c * 1000:(c + 1) * 1000].nonzero().flatten(), top), c
print("ok", values.numel(), index.numel(), torch.ops.dropit_cuda.build_info())
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_a_loadable_library(tmp_path):
    build = tmp_path / "build"
    prefix = torch.utils.cmake_prefix_path
    # With the CUDA kernels wherever the setup.py build would compile them (no GPU needed).
    with_cuda = find_cuda_home() is not None and torch.version.cuda is not None
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DDROPIT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
                    f"-DCMAKE_PREFIX_PATH={prefix}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    lib = build / "libdropit_cuda.so"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(lib)], check=True, capture_output=True, text=True)
    words = out.stdout.split()
    assert words[:3] == ["ok", "500", str(5 * 32)]
    info = dict(field.split("=", 1) for field in words[3].split("|"))
    assert info["cuda"] == ("1" if with_cuda else "0")
    assert bool(info.get("archs")) == with_cuda
    # Under torch's OpenMP backend the CPU kernels need OpenMP to run on more than one thread.
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert info["openmp"] == "1", info
