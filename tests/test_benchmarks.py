"""The kernel benchmarks run end to end on tiny sizes and write the figures they print."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(name, *args, returncode=0):
    """The script's stdout, or its stderr when it is expected to fail."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == returncode, out.stderr
    return out.stdout if returncode == 0 else out.stderr


def test_bench_select(tmp_path):
    path = tmp_path / "select.json"
    stdout = run_script("bench_select.py", "--device", "cpu", "--numel", str(4 * 4096), "--chunk", "4096",
                        "--repeats", "1", "--threads", "1,2", "--json", str(path))
    figures = json.loads(path.read_text())
    results = figures["results"]
    assert [(r["dtype"], r["threads"]) for r in results] == [
        ("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
    for r in results:
        assert r["pack_ms"] > 0 and r["topk_chunked_ms"] > 0 and r["topk_full_ms"] > 0
        assert r["pack_cpu_ms"] >= 0 and r["unpack_cpu_ms"] >= 0
        assert r["pack_speedup_vs_topk"] == r["topk_chunked_ms"] / r["pack_ms"]
        # bitmap: (1-γ)·s + 1/8 bytes per element, with keep() rounded up
        s = 4 if r["dtype"] == "float32" else 2
        assert abs(r["bytes_per_element_dropit"] - (410 * s / 4096 + 1 / 8)) < 1e-9
        assert r["bytes_per_element_topk"] == 410 * (s + 8) / 4096
    one, two = results[0], results[1]
    pack_scaling = next(s for s in figures["scaling"] if (s["dtype"], s["op"]) == ("float32", "pack"))
    assert (pack_scaling["from_threads"], pack_scaling["to_threads"]) == (1, 2)
    assert pack_scaling["speedup"] == one["pack_ms"] / two["pack_ms"]
    assert "x topk" in stdout and "pack 2 threads vs 1" in stdout and "load average" in figures["load_before"]


def test_bench_relu_mask(tmp_path):
    path = tmp_path / "relu.json"
    stdout = run_script("bench_relu_mask.py", "--device", "cpu", "--numel", "65536", "--repeats", "1",
                        "--threads", "1,2", "--json", str(path))
    figures = json.loads(path.read_text())
    rows = figures["rows"]
    assert [(r["dtype"], r["threads"]) for r in rows] == [
        ("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
    for r in rows:
        assert r["fwd_ms"] > 0 and r["torch_bwd_ms"] > 0 and r["cached_bytes_per_element"] == 1 / 8
    bwd = next(s for s in figures["scaling"] if (s["dtype"], s["op"]) == ("bfloat16", "bwd"))
    assert bwd["speedup"] == rows[2]["bwd_ms"] / rows[3]["bwd_ms"]
    assert "bwd 2 threads vs 1" in stdout


def test_bench_threads_option_rejects_bad_counts():
    assert "--threads counts must be >= 1" in run_script("bench_select.py", "--threads", "0,2", returncode=2)
    assert "--threads takes counts like 1,2" in run_script("bench_relu_mask.py", "--threads", "two", returncode=2)


def test_bench_coverage(tmp_path):
    path = tmp_path / "coverage.json"
    stdout = run_script("bench_coverage.py", "--models", "vit", "convtranspose1d3d", "--json", str(path))
    report = json.loads(path.read_text())
    assert [r["model"] for r in report["rows"]] == ["vit", "convtranspose1d3d"]
    for r in report["rows"]:
        assert r["plain_bytes"] > 0 and r["converted_bytes"] > 0
        assert r["change_pct"] == 100 * (r["converted_bytes"] - r["plain_bytes"]) / r["plain_bytes"]
    assert [t["target"] for t in report["targets"]][-1].startswith("no model saves more")
    assert "plain MiB" in stdout


def test_bench_tradeoff(tmp_path):
    path, png = tmp_path / "tradeoff.json", tmp_path / "tradeoff.png"
    stdout = run_script("bench_tradeoff.py", "--resnet-batch", "2", "--gpt-batch", "2", "--gpt-width", "64",
                        "--gpt-layers", "2", "--gammas", "0.5", "0.9", "--warmup", "0", "--repeats", "2",
                        "--json", str(path), "--plot", str(png))
    rows = json.loads(path.read_text())["rows"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "Pareto" in stdout
    for model in ("resnet18_cifar", "gpt"):
        got = {r["variant"]: r for r in rows if r["model"] == model}
        assert list(got) == ["baseline", "dropit g=0.5", "dropit g=0.9", "checkpoint", "checkpoint/2 + dropit g=0.9"]
        saved = {k: r["saved_bytes"] for k, r in got.items()}
        # more dropping saves less; checkpointing every block saves least; the mix lies between
        assert saved["baseline"] > saved["dropit g=0.5"] > saved["dropit g=0.9"] > saved["checkpoint"]
        assert saved["checkpoint"] < saved["checkpoint/2 + dropit g=0.9"] < saved["dropit g=0.9"]
        for r in got.values():
            assert len(r["step_ms_samples"]) == 2 and r["step_ms"] > 0
        assert got["baseline"]["time_vs_baseline"] == 1.0
        # the Pareto flags, restated: a row is on the front iff no other row is as good on both and
        # better on one
        for r in got.values():
            beaten = any((o["time_vs_baseline"] <= r["time_vs_baseline"] and o["saved_bytes"] <= r["saved_bytes"])
                         and (o["time_vs_baseline"], o["saved_bytes"]) != (r["time_vs_baseline"], r["saved_bytes"])
                         for o in got.values())
            assert r["pareto"] == (not beaten)
        assert got["checkpoint"]["pareto"]  # the fewest bytes is never beaten


def _bench_tradeoff_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_tradeoff
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_tradeoff


def test_bench_tradeoff_saved_bytes_counts_storages_once():
    import torch
    from torch import nn

    bt = _bench_tradeoff_module()
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()))
    # Linear 1 keeps x (4x8 floats), ReLU 1 its output (4x16), which Linear 2 keeps too (counted
    # once), ReLU 2 its output (4x16); the weights are parameters and not counted
    assert bt.saved_bytes(model, x) == 4 * (4 * 8 + 4 * 16 + 4 * 16)
    # checkpointed, the inner block keeps only its input: ReLU 1's output again
    bt.with_checkpoints(model, ["2"])
    assert isinstance(model[2], bt.Checkpointed)
    assert bt.saved_bytes(model, x) == 4 * (4 * 8 + 4 * 16)


def test_bench_tradeoff_counts_what_dc_memory_counts():
    bt = _bench_tradeoff_module()
    import dropit_cuda as dc

    work = bt.gpt(batch=2, width=64, layers=2, context=32)
    for label, model in bt.variants(work, [0.8], 0.8):
        assert bt.saved_bytes(model, work.inputs) == dc.memory.measure(model.train(), work.inputs).total_bytes, label


def test_bench_overhead(tmp_path):
    path = tmp_path / "overhead.json"
    stdout = run_script("bench_overhead.py", "--gpt-layers", "2", "--gpt-width", "32", "--tokens", "4",
                        "--product-rows", "4", "--product-width", "8", "--wide-rows", "8", "--wide-width", "16",
                        "--warmup", "2", "--repeats", "3", "--wide-repeats", "2", "--json", str(path))
    figures = json.loads(path.read_text())
    rows = {(r["case"], r["variant"]): r for r in figures["rows"]}
    assert list(rows) == [("gpt2", "plain"), ("gpt2", "routing only"), ("gpt2", "dropit"),
                          ("product", "plain"), ("product", "dropit"), ("wide", "plain"), ("wide", "dropit")]
    for (case, variant), r in rows.items():
        base = rows[(case, "plain")]
        assert r["median_us"] > 0 and r["q1_us"] <= r["median_us"] <= r["q3_us"]
        assert r["ratio"] == r["median_us"] / base["median_us"]
        assert r["excess_us"] == r["median_us"] - base["median_us"]
        assert r["rounds"] == (2 if case == "wide" else 3)
    assert "load average" in figures["load_before"] and "routing only" in stdout


def test_bench_overhead_rejects_no_warmup():
    assert "--warmup" in run_script("bench_overhead.py", "--warmup", "0", returncode=2)
