"""benchmarks/gpu_check.sh's control flow, with a stub interpreter standing in for Python.

The stub plays each step's part (a build that succeeds, tests that fail, a benchmark that hangs),
so the script's own logic is what is checked: it finds `python3` when `python` is missing, goes
on past a failed step, stops a step at the time left, skips what no longer fits, records each
step's status and seconds, and leaves exactly a summary and one archive in the output folder.
"""

import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STUB = """#!/bin/bash
echo "stub $* (PYTHONPATH=$PYTHONPATH)" >> "$STUB_CALLS"
case "$*" in
  *get_device_capability*) echo 9.0 ;;
  *extension_info*) echo '{"cuda_kernels": true, "cuda_available": true}' ;;
  *"-m pytest"*) echo "1 failed, 41 passed in 3.00s"; exit 1 ;;
  *bench_select.py*) sleep 60 ;;
  *) echo "stub ran: $*" ;;
esac
"""


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_steps_are_time_boxed_and_results_archived(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "python3"  # and no `python` on PATH: the script must fall back to python3
    stub.write_text(STUB)
    stub.chmod(0o755)
    calls = tmp_path / "calls.txt"
    out = tmp_path / "out"
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_CALLS": str(calls),
           "GPU_CHECK_BUDGET": "12", "TMPDIR": str(tmp_path)}
    t0 = time.monotonic()
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert run.returncode == 1, run.stdout + run.stderr
    assert elapsed < 12 + 15  # the budget, plus timeout's grace and the archiving
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]

    summary = (out / "summary.txt").read_text()
    status = {}
    for line in summary.splitlines():
        words = line.split()
        if len(words) == 5 and words[0] in ("machine", "build", "test_cuda", "bench_select",
                                            "bench_relu_mask", "bench_memory"):
            status[words[0]] = (words[1], words[2])
    assert summary.startswith("gpu_check: FAILED")
    assert status["build"] == ("ok", "0")
    assert status["test_cuda"] == ("FAILED", "1")  # and the steps after it still ran
    assert status["bench_select"][0] == "timeout"  # cut at the time left, not its own 40 s
    assert status["bench_memory"][0] == "skipped"
    assert "1 failed, 41 passed" in summary  # the tail of the failing step's log

    stub_calls = calls.read_text()
    assert "stub -m pytest" in stub_calls and "bench_select.py" in stub_calls
    # The benchmarks import this checkout's dropit_cuda, which is not installed there.
    bench_call = next(line for line in stub_calls.splitlines() if "bench_select.py" in line)
    assert f"(PYTHONPATH={ROOT})" in bench_call
    assert "bench_memory.py" not in stub_calls
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"build.log", "test_cuda.log", "bench_select.log", "machine.log"} <= names
