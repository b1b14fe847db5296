"""benchmarks/gpu_check.sh's control flow, with a stub interpreter standing in for Python.

The stub plays each step's part (a build that succeeds, tests that fail, a benchmark that hangs),
so the script's own logic is what is checked: it finds `python3` when `python` is missing, goes
on past a failed step, stops a step at the time left, skips what no longer fits, records each
step's status and seconds, and leaves exactly a summary and one archive in the output folder.
"""

import json
import math
import os
import shutil
import subprocess
import sys
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
        if len(words) == 5 and words[0] in ("machine", "build", "test_cuda", "train_eager", "train_compiled",
                                            "bench_select", "bench_relu_mask", "bench_memory"):
            status[words[0]] = (words[1], words[2])
    assert summary.startswith("gpu_check: FAILED")
    assert status["build"] == ("ok", "0")
    assert status["test_cuda"] == ("FAILED", "1")  # and the steps after it still ran
    assert status["train_eager"] == ("ok", "0") and status["train_compiled"] == ("ok", "0")
    assert status["bench_select"][0] == "timeout"  # cut at the time left, not its own 25 s
    assert status["bench_memory"][0] == "skipped"
    assert "1 failed, 41 passed" in summary  # the tail of the failing step's log

    stub_calls = calls.read_text()
    assert "stub -m pytest" in stub_calls and "bench_select.py" in stub_calls
    # The benchmarks import this checkout's dropit_cuda, which is not installed there.
    bench_call = next(line for line in stub_calls.splitlines() if "bench_select.py" in line)
    assert f"(PYTHONPATH={ROOT})" in bench_call
    assert "bench_memory.py" not in stub_calls
    train_calls = [line for line in stub_calls.splitlines() if "bench_train_step.py" in line]
    assert len(train_calls) == 2 and "--modes eager" in train_calls[0] and "--modes compiled" in train_calls[1]
    assert "--parts bandwidth train" in train_calls[0]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"build.log", "test_cuda.log", "bench_select.log", "machine.log"} <= names


def test_train_step_bench_runs_tiny_on_cpu(tmp_path):
    # The training-step bench's own code (models, convert, autocast, compile, the bandwidth
    # arithmetic), at tiny sizes on the CPU: what gpu_check.sh runs on a GPU at full size.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    # Eager: both models and the bandwidth part; compiled (aot_eager: tracing, no code generation,
    # to stay quick on a CPU): the decoder.
    for i, args in enumerate((["--modes", "eager"], ["--parts", "train", "--models", "gpt2_small", "--modes",
                                                     "compiled", "--compile-backend", "aot_eager"])):
        out = tmp_path / f"tiny{i}.json"
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"), "--device", "cpu",
                              "--tiny", "--steps", "2", "--warmup", "1", "--json", str(out)] + args,
                             env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        rows += json.loads(out.read_text())["results"]
    train = {(r["model"], r["variant"], r["mode"]): r for r in rows if r["part"] == "train"}
    assert set(train) == {(m, v, "eager") for m in ("gpt2_small", "resnet50") for v in ("plain", "converted")} | {
        ("gpt2_small", v, "compiled") for v in ("plain", "converted")}
    for r in train.values():
        assert r["step_ms"] > 0 and r["max_memory_allocated"] is None  # no CUDA memory on a CPU
    # Converted models cache less than their dense inputs (DropIT ran inside the step).
    for model in ("gpt2_small", "resnet50"):
        assert 0 < train[(model, "converted", "eager")]["report_cached_fraction"] < 0.5
    bw = {r["dtype"]: r for r in rows if r["part"] == "bandwidth"}
    assert set(bw) == {"float32", "bfloat16"}
    for dtype, r in bw.items():
        es = 4 if dtype == "float32" else 2
        n, keep = r["numel"], 16384 - int(0.9 * 16384)
        moved = n * es + (n // 16384) * (keep * es + 4 * 16384 // 32)
        # The fractions are the bytes each op must move over its time, against 2 bytes a byte copied.
        assert math.isclose(r["pack_fraction_of_copy"], (moved / r["pack_ms"]) / (2 * n * es / r["copy_ms"]),
                            rel_tol=1e-6)
        assert math.isclose(r["unpack_fraction_of_copy"],
                            (moved / r["unpack_ms"]) / (2 * n * es / r["copy_ms"]), rel_tol=1e-6)


def test_train_step_bench_records_a_failing_part(tmp_path):
    # One part failing (here: an unknown device for the bandwidth part) is recorded with its error;
    # the others still run and the exit status says something failed.
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = []
    bench.attempt({"part": "bandwidth", "dtype": "float32"}, lambda: 1 / 0, results, str(tmp_path / "r.json"))
    bench.attempt({"part": "x"}, lambda: {"part": "x", "ok": True}, results, str(tmp_path / "r.json"))
    assert "ZeroDivisionError" in results[0]["error"] and results[1]["ok"]
    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == 2
