"""The demo: CLI, outputs, shared initialisation and data order, both tasks, the --check acceptance."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import zlib
from pathlib import Path

import pytest
import torch

from dropit_cuda import __main__ as cli
from dropit_cuda import demo
from dropit_cuda.demo import digits, runner, text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = lambda _: None  # noqa: E731


def _table_rows(stdout: str) -> tuple[str, set[str]]:
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    return header, {line.split("  ")[0].strip() for line in lines}


def test_cli_tiny_digits_run_writes_json_png_and_prints_table(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--task", "digits", "--epochs", "1", "--seeds", "1", "--gammas", "0.8",
                   "--contrast", "random:0.5", "--out", str(out), "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    header, rows = _table_rows(stdout)
    for column in ("test acc %", "train loss", "saved (model)", "saved (DropIT layers)", "ms/step"):
        assert column in header
    assert {"baseline", "parallel_min_k γ=0.8", "random γ=0.5"} <= rows

    assert (out / "digits" / "curves.png").read_bytes()[:8] == PNG_MAGIC
    results = json.loads((out / "digits" / "results.json").read_text())
    assert list(results["runs"]) == ["baseline", "parallel_min_k@0.8", "random@0.5"]
    assert results["dropit_layers"], "the converted layers are listed"
    assert "stem.0" not in results["dropit_layers"]  # the first layer stays dense
    n_test = results["dataset"]["test"]
    for run in results["runs"].values():
        r = run["seeds"]["0"]
        assert len(r["train_loss"]) == len(r["test_acc"]) == 1
        # an accuracy is a whole number of test images
        assert abs(r["final_test_acc"] * n_test / 100 - round(r["final_test_acc"] * n_test / 100)) < 1e-6
        assert run["saved_bytes"] > 0 and run["layer_bytes"] > 0 and r["step_ms"] > 0
    base, packed = results["runs"]["baseline"], results["runs"]["parallel_min_k@0.8"]
    # the converted layers cache far less than the dense inputs the same layers keep in the baseline
    assert packed["layer_bytes"] < 0.5 * base["layer_bytes"]
    _check_fidelity_output(stdout, results, steps=results["dataset"]["train"] // 64)


def _row(stdout: str, name: str) -> list[str]:
    """The cells of a table row (cells are separated by at least two spaces)."""
    line = next(line for line in stdout.splitlines() if line.startswith(name + "  "))
    return [c.strip() for c in line.split("  ") if c.strip()]


def _check_fidelity_output(stdout: str, results: dict, steps: int) -> None:
    """Every DropIT run (not the baseline) has a fidelity report of its first and last step in the
    JSON, over the layers DropIT converts, a one-line summary printed and its model cosines in
    the table's "cos first/last" column; the per-layer tables are not printed by default."""
    header, _ = _table_rows(stdout)
    assert "cos first/last" in header
    assert "baseline" not in " ".join(line for line in stdout.splitlines() if "weight-gradient cosine" in line)
    assert "fidelity" not in results["runs"]["baseline"]["seeds"]["0"]
    assert _row(stdout, "baseline")[-2] == "-"
    assert "DropIT fidelity:" not in stdout  # the per-layer tables need --fidelity-detail
    total = 0.0
    for run in results["runs"].values():
        if run["strategy"] is None:
            continue
        fid = run["seeds"]["0"]["fidelity"]
        assert fid["steps"] == [0, steps - 1]
        for when in ("first", "last"):
            rep = fid[when]
            measured = {r["name"]: r["cosine"] for r in rep["layers"] if r["cosine"] is not None}
            assert set(measured) <= set(results["dropit_layers"])
            assert all(-1.0 <= c <= 1.0 for c in measured.values()) and -1.0 <= rep["cosine"] <= 1.0
            assert rep["cached_bytes"] < rep["dense_bytes"] or run["gamma"] == 0
        assert _row(stdout, run["name"])[-2] == f"{fid['first']['cosine']:.4f}/{fid['last']['cosine']:.4f}"
        summary = next(line for line in stdout.splitlines() if f"{run['name']} seed 0: weight-gradient cosine" in line)
        worst = min((r for r in fid["first"]["layers"] if r["cosine"] is not None), key=lambda r: r["cosine"])
        assert f"model {fid['first']['cosine']:.4f} -> {fid['last']['cosine']:.4f}" in summary
        assert f"worst layer {worst['name']} {worst['cosine']:.4f} -> " in summary
        assert fid["seconds"] > 0
        total += fid["seconds"]
    assert results["fidelity_s"] == pytest.approx(total)


def test_cli_tiny_text_run(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = demo.main(["--task", "text", "--steps", "3", "--eval-every", "1", "--batch-size", "2", "--gammas", "0.8",
                    "--contrast", "random:0.5", "--out", str(out), "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    header, rows = _table_rows(stdout)
    for column in ("val loss", "val ppl", "train loss", "saved (model)", "saved (DropIT layers)", "ms/step"):
        assert column in header
    assert {"baseline", "parallel_min_k γ=0.8", "random γ=0.5"} <= rows
    assert (out / "text" / "curves.png").read_bytes()[:8] == PNG_MAGIC
    results = json.loads((out / "text" / "results.json").read_text())
    assert results["round"] == {"label": "step", "size": 1}
    layers = results["dropit_layers"]
    # every block's qkv, fc1 and fc2 and the head, less the first layer; not the attention output
    assert set(layers) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.qkv", "blocks.1.fc1", "blocks.1.fc2", "head"}
    for run in results["runs"].values():
        r = run["seeds"]["0"]
        assert len(r["train_loss"]) == len(r["val_loss"]) == len(r["val_ppl"]) == 3
        assert r["final_val_ppl"] == pytest.approx(math.exp(r["final_val_loss"]))
        assert 0 < r["final_val_loss"] < math.log(256) + 0.5  # near or below a uniform guess over bytes
        if run["strategy"] is not None:
            # the fidelity passes ran on the first and the last step's batch with that step's weights:
            # their loss is the training loss of that step (one step per round here)
            assert r["fidelity"]["first"]["loss"] == pytest.approx(r["train_loss"][0], rel=1e-5)
            assert r["fidelity"]["last"]["loss"] == pytest.approx(r["train_loss"][-1], rel=1e-5)
    base, packed = results["runs"]["baseline"], results["runs"]["parallel_min_k@0.8"]
    assert packed["layer_bytes"] < 0.5 * base["layer_bytes"]
    assert packed["saved_bytes"] < base["saved_bytes"]
    _check_fidelity_output(stdout, results, steps=3)


def test_runs_share_initial_weights_and_batches(tmp_path):
    """γ = 0 keeps every element, so its run must follow the baseline's: same start, same batches."""
    cfg = digits.DigitsConfig(gammas=(0.0,), contrast=("random", 0.9), epochs=1, out=str(tmp_path), progress=False)
    runs = runner.run_task(digits.DigitsTask(), cfg, log=QUIET)["runs"]
    base = runs["baseline"]["seeds"]["0"]
    same = runs["parallel_min_k@0"]["seeds"]["0"]
    rand = runs["random@0.9"]["seeds"]["0"]
    assert same["train_loss"][0] == pytest.approx(base["train_loss"][0], rel=1e-4)
    assert abs(same["final_test_acc"] - base["final_test_acc"]) <= 100.0 * 2 / 450  # 2 images at most
    assert rand["train_loss"][0] != pytest.approx(base["train_loss"][0], rel=1e-3)
    # γ = 0 keeps every element: its weight gradients are the exact ones at both steps, in every layer
    for when in ("first", "last"):
        exact, dropped = same["fidelity"][when], rand["fidelity"][when]
        assert exact["cosine"] == 1.0 and exact["rel_error"] == 0.0
        assert all(r["cosine"] == 1.0 for r in exact["layers"] if r["cosine"] is not None)
        assert dropped["cosine"] < 0.9  # random dropping at γ = 0.9 bends the gradient


def test_text_runs_share_initial_weights_and_batches(tmp_path):
    cfg = text.TextConfig(gammas=(0.0,), contrast=("random", 0.9), steps=3, eval_every=3, batch_size=2,
                          out=str(tmp_path), progress=False)
    runs = runner.run_task(text.TextTask(), cfg, log=QUIET)["runs"]
    base, same, rand = (runs[k]["seeds"]["0"] for k in ("baseline", "parallel_min_k@0", "random@0.9"))
    assert same["train_loss"][0] == pytest.approx(base["train_loss"][0], rel=1e-5)
    assert same["val_loss"][0] == pytest.approx(base["val_loss"][0], rel=1e-5)
    assert rand["val_loss"][0] != pytest.approx(base["val_loss"][0], rel=1e-5)


@pytest.mark.parametrize("task_name", ["digits", "text"])
def test_fidelity_passes_leave_training_bit_identical(task_name):
    """A short run with the fidelity passes and one without end with the very same weights and
    batch-norm statistics: the passes change no gradient, no random draw (the ``random`` strategy
    draws its keys from torch's generator) and no buffer."""
    task = demo.TASKS[task_name]
    small = {"digits": dict(epochs=2, batch_size=32), "text": dict(steps=4, eval_every=2, batch_size=2)}[task_name]
    device = torch.device("cpu")
    data = task.load(task.config_class(**small), device)
    trained = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs (two threads on a busy machine are many times slower)
    try:
        for fidelity in (True, False):
            cfg = task.config_class(progress=False, fidelity=fidelity, **small).validate()
            rounds = [r[:3] for r in task.schedule(data, cfg, seed=0)]  # 3 steps per round
            torch.manual_seed(0)
            model = task.build_model(cfg)
            inputs, _ = task.inputs_and_targets(data, cfg, rounds[0][0])
            runner.convert_run(task, model, cfg, inputs, "random", 0.8)
            result = runner.train_run(task, model, data, rounds, cfg, device, seed=0, log=QUIET)
            trained[fidelity] = model.state_dict(), result
    finally:
        torch.set_num_threads(threads)
    (with_sd, with_result), (without_sd, without_result) = trained[True], trained[False]
    assert with_result["fidelity"]["steps"] == [0, sum(map(len, rounds)) - 1] and "fidelity" not in without_result
    assert with_sd.keys() == without_sd.keys()
    for name in with_sd:
        assert torch.equal(with_sd[name], without_sd[name]), name
    metrics = ["train_loss", *(m.key for m in task.metrics)]
    assert [with_result[k] for k in metrics] == [without_result[k] for k in metrics]


def test_no_fidelity_flag_skips_the_passes(tmp_path, capsys):
    rc = demo.main(["--task", "text", "--steps", "2", "--eval-every", "2", "--batch-size", "2", "--gammas", "0.8",
                    "--contrast", "none", "--no-fidelity", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    results = json.loads((tmp_path / "text" / "results.json").read_text())
    assert results["config"]["fidelity"] is False and results["fidelity_s"] == 0.0
    assert not any("fidelity" in run["seeds"]["0"] for run in results["runs"].values())
    assert "weight-gradient cosine" not in stdout and "fidelity passes" not in stdout and "tuning" not in stdout
    assert _row(stdout, "parallel_min_k γ=0.8")[-2] == "-"


def test_tune_run_meets_its_floor_and_caches_no_more_than_a_uniform_run_that_does(tmp_path, capsys):
    floor = 0.75
    rc = demo.main(["--task", "digits", "--epochs", "1", "--gammas", "0.5", "--contrast", "none",
                    "--tune", str(floor), "--fidelity-detail", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    results = json.loads((tmp_path / "digits" / "results.json").read_text())
    runs = results["runs"]
    assert list(runs) == ["baseline", "parallel_min_k@0.5", "tuned@0.75"]
    tuned = runs["tuned@0.75"]
    assert tuned["name"] == "tuned (cos≥0.75)" and tuned["strategy"] == "parallel_min_k"
    assert tuned["tune_gammas"] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    run = tuned["seeds"]["0"]
    plan = run["plan"]
    assert plan["min_cosine"] == floor
    # the tuned run's first fidelity pass is an independent measurement on the tuning batch (the
    # first training batch, the initial weights) of the model converted with the plan: every
    # layer is at its planned γ and meets the floor, with the cosine the plan recorded
    first = {r["name"]: r for r in run["fidelity"]["first"]["layers"]}
    planned = {r["name"]: r for r in plan["layers"] if r["cosines"]}
    assert set(planned) == set(results["dropit_layers"])
    for name, p in planned.items():
        assert first[name]["gamma"] == p["gamma"], name
        if p["gamma"] is not None:
            assert first[name]["cosine"] >= floor, name
            assert first[name]["cosine"] == pytest.approx(p["cosine"], rel=1e-9), name
    assert any(p["gamma"] not in (None, 0.5) for p in planned.values())  # a plan, not a uniform γ
    # the plan's predicted bytes are what the converted layers cache (dc.memory.measure)
    assert tuned["layer_bytes"] == plan["cached_bytes"]
    # no more bytes than any uniform run whose worst layer meets the floor on the same batch
    meeting = [r for r in runs.values() if r["strategy"] == "parallel_min_k" and "min_cosine" not in r
               and min(x["cosine"] for x in r["seeds"]["0"]["fidelity"]["first"]["layers"]
                       if x["cosine"] is not None) >= floor]
    assert [r["gamma"] for r in meeting] == [0.5]  # the comparison has a run to compare with
    for r in meeting:
        assert tuned["layer_bytes"] <= r["layer_bytes"] and tuned["saved_bytes"] <= r["saved_bytes"]
    # printed: the plan's line, the tuned row with its accuracy, bytes and cosines, the detail tables
    assert "digits: tuned plan, seed 0 (cosine >= 0.75 on the first training batch)" in stdout
    row = _row(stdout, "tuned (cos≥0.75)")
    assert row[1] == f"{tuned['test_acc_mean']:.2f}"
    assert row[-2] == f"{tuned['cosine_first_mean']:.4f}/{tuned['cosine_last_mean']:.4f}"
    assert "DropIT plan: per layer the largest γ" in stdout
    assert stdout.count("DropIT fidelity: weight gradients vs exact") == 4  # 2 DropIT runs x 2 steps
    assert results["tune_s"] > 0


def test_tune_applies_to_every_task():
    parse = demo.build_parser().parse_args
    overrides = demo.flag_overrides(parse(["--task", "all", "--tune", "0.9"]))
    for task in demo.TASKS.values():
        cfg = demo.config_for(task, overrides)
        assert cfg.tune == 0.9 and cfg.runs()[-1].key == "tuned@0.9"
        assert set(cfg.gammas) <= set(cfg.tune_gammas())


def test_text_amp_bf16_caches_bf16(tmp_path):
    kw = dict(gammas=(0.8,), contrast=None, steps=2, eval_every=2, batch_size=2, progress=False)
    fp32 = runner.run_task(text.TextTask(), text.TextConfig(out=str(tmp_path / "a"), **kw), log=QUIET)
    bf16 = runner.run_task(text.TextTask(), text.TextConfig(out=str(tmp_path / "b"), amp="bf16", **kw), log=QUIET)
    for key in ("baseline", "parallel_min_k@0.8"):
        # the cached activations are bf16: the DropIT layers' inputs (dense or packed) take about half
        ratio = bf16["runs"][key]["layer_bytes"] / fp32["runs"][key]["layer_bytes"]
        assert 0.45 < ratio < 0.7, (key, ratio)
        assert math.isfinite(bf16["runs"][key]["val_loss_mean"])
    assert bf16["config"]["amp"] == "bf16"


def test_batch_orders_are_seeded_permutations():
    a = digits.batch_orders(3, 100, epochs=2, batch_size=32)
    b = digits.batch_orders(3, 100, epochs=2, batch_size=32)
    c = digits.batch_orders(4, 100, epochs=2, batch_size=32)
    assert len(a) == 2 and all(len(epoch) == 3 for epoch in a)
    for ea, eb in zip(a, b):
        for ba, bb in zip(ea, eb):
            assert torch.equal(ba, bb)
    for epoch in a:
        seen = torch.cat(epoch)
        assert len(set(seen.tolist())) == 96 and int(seen.min()) >= 0 and int(seen.max()) < 100
    assert not torch.equal(torch.cat(a[0]), torch.cat(a[1]))
    assert not torch.equal(torch.cat(a[0]), torch.cat(c[0]))


def test_digits_split():
    d = digits.load_digits_split(0)
    assert d.x_train.shape[1:] == (1, 8, 8) and len(d.x_train) + len(d.x_test) == 1797
    assert abs(len(d.x_test) - 0.25 * 1797) < 1
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert torch.bincount(d.y_test, minlength=10).min() >= 40  # stratified: every digit is tested
    again, other = digits.load_digits_split(0), digits.load_digits_split(1)
    assert torch.equal(d.y_test, again.y_test) and torch.equal(d.x_test, again.x_test)
    assert not torch.equal(d.x_test, other.x_test)
    with pytest.raises(ValueError, match="test_fraction"):
        digits.load_digits_split(0, test_fraction=1.0)


# ---------------------------------------------------------------------------------- text corpus


def _fake_stdlib(root: Path) -> dict[str, bytes]:
    """A folder shaped like a standard library: top-level modules, a package, build data."""
    files = {f"mod{i:02d}.py": (f"# module {i}\n" + "x = 1\n" * (300 + i)).encode() for i in range(40)}
    for name, body in files.items():
        (root / name).write_bytes(body)
    (root / "pkg").mkdir()
    (root / "pkg" / "inner.py").write_bytes(b"left out\n" * 1000)
    (root / "_sysconfigdata__linux.py").write_bytes(b"build = 'this machine'\n" * 1000)
    (root / "notes.txt").write_bytes(b"not python\n" * 1000)
    return files


def test_corpus_split_by_file_with_caps(tmp_path):
    files = _fake_stdlib(tmp_path)
    corpus = text.load_corpus(tmp_path, train_bytes=20000, val_bytes=8000)
    # the rule, restated: a file is for validation when the CRC-32 of its name is divisible by 10
    want_val = [n for n in sorted(files) if zlib.crc32(n.encode()) % 10 == 0]
    want_train = [n for n in sorted(files) if n not in want_val]
    assert want_val and corpus.val_files == want_val[: len(corpus.val_files)]
    assert corpus.train_files == want_train[: len(corpus.train_files)]
    assert not set(corpus.val_files) & set(corpus.train_files)
    # the training bytes are the training files in order, cut at the cap
    expected = b"".join(files[n] for n in want_train)[:20000]
    assert bytes(corpus.train.numpy()) == expected
    val_expected = b"".join(files[n] for n in want_val)[:8000]
    assert bytes(corpus.val.numpy()) == val_expected
    assert corpus.digest() == text.load_corpus(tmp_path, 20000, 8000).digest()


def test_stdlib_corpus_is_the_running_interpreters(tmp_path):
    import sysconfig

    corpus = text.load_corpus()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(corpus.train) == text.TRAIN_BYTES and len(corpus.val) == text.VAL_BYTES
    first = corpus.train_files[0]
    assert bytes(corpus.train[:100].numpy()) == (stdlib / first).read_bytes()[:100]
    assert "os.py" in corpus.train_files + corpus.val_files or len(corpus.train_files) < 120
    assert not any(n.startswith("_sysconfigdata") for n in corpus.train_files + corpus.val_files)


def test_windows_are_shifted_by_one():
    data = torch.arange(50, dtype=torch.uint8)
    x, y = text.windows(data, torch.tensor([0, 7, 40]), 9)
    assert x.dtype == torch.int64 and x.shape == y.shape == (3, 9)
    assert x[1].tolist() == list(range(7, 16)) and y[1].tolist() == list(range(8, 17))
    assert y[2].tolist()[-1] == 49


def test_tiny_gpt_is_causal():
    torch.manual_seed(0)
    model = text.TinyGPT(width=32, layers=2, heads=4, context=16).eval()
    a = torch.randint(0, 256, (2, 16))
    b = a.clone()
    b[:, 10] = (b[:, 10] + 1) % 256
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert la.shape == (2, 16, 256)
    torch.testing.assert_close(la[:, :10], lb[:, :10])  # the past does not see the future
    assert not torch.allclose(la[:, 10:], lb[:, 10:])
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ----------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--gammas", "0.5,1.0"], "--gammas"),
        (["--gammas", "x"], "--gammas"),
        (["--contrast", "bogus:0.5"], "--contrast"),
        (["--seeds", "0"], "--seeds"),
        (["--strategy", "nope"], "--strategy"),
        (["--device", "tpu:7"], "device"),
        (["--chunk", "70000"], "chunk"),
        (["--task", "digits", "--batch-size", "5000"], "batch_size"),
        (["--task", "digits", "--amp", "bf16"], "--amp"),
        (["--task", "text", "--epochs", "3"], "--epochs"),
        (["--task", "text", "--steps", "30", "--eval-every", "25"], "eval_every"),
        (["--amp", "fp8"], "--amp"),
        (["--task", "poetry"], "--task"),
        (["--tune", "1.5"], "--tune"),
        (["--tune", "-2"], "--tune"),
        (["--tune", "nan"], "--tune"),
        (["--tune", "high"], "--tune"),
        (["--no-fidelity", "--fidelity-detail"], "--fidelity-detail"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv, name, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert name in capsys.readouterr().err


@pytest.mark.parametrize(
    "task, field, value, error",
    [
        ("digits", "epochs", 0, ValueError),
        ("digits", "seeds", 1.5, TypeError),
        ("digits", "gammas", (0.5, 1.0), ValueError),
        ("digits", "strategy", "top_k", ValueError),
        ("digits", "contrast", ("random", -0.1), ValueError),
        ("digits", "chunk", 0, ValueError),
        ("digits", "lr", 0.0, ValueError),
        ("text", "steps", 0, ValueError),
        ("text", "heads", 3, ValueError),
        ("text", "amp", "fp16", ValueError),
        ("text", "context", 2.0, TypeError),
        ("digits", "tune", 1.01, ValueError),
        ("text", "tune", "0.9", TypeError),
        ("text", "fidelity", False, None),  # with fidelity_detail below
    ],
)
def test_config_validation_names_the_field(task, field, value, error, tmp_path):
    t = demo.TASKS[task]
    cfg = t.config_class(out=str(tmp_path), progress=False)
    setattr(cfg, field, value)
    if error is None:
        cfg.fidelity_detail, error = True, ValueError
    with pytest.raises(error, match=field.split("_")[0]):
        runner.run_task(t, cfg, log=QUIET)
    assert not (tmp_path / "results.json").exists()


def test_flags_left_out_take_task_defaults_and_none_is_kept():
    parse = demo.build_parser().parse_args
    assert demo.flag_overrides(parse([])) == {}
    assert demo.flag_overrides(parse(["--contrast", "none", "--no-progress"])) == {"contrast": None, "progress": False}
    cfg = demo.config_for(demo.TASKS["text"], demo.flag_overrides(parse(["--contrast", "none"])))
    assert [s.key for s in cfg.runs()] == ["baseline", "parallel_min_k@0.8", "parallel_min_k@0.9"]


def test_flags_reach_each_task_and_out_is_per_task():
    overrides = {"lr": 0.01, "epochs": 3, "steps": 50, "out": "o"}
    d = demo.config_for(demo.TASKS["digits"], overrides)
    t = demo.config_for(demo.TASKS["text"], overrides)
    assert (d.lr, d.epochs, d.out) == (0.01, 3, str(Path("o") / "digits"))
    assert (t.lr, t.steps, t.out) == (0.01, 50, str(Path("o") / "text"))
    # left out: each task's own default
    assert d.batch_size == digits.DigitsConfig.batch_size and t.batch_size == text.TextConfig.batch_size
    assert d.gammas == (0.5, 0.8, 0.9) and t.gammas == (0.8, 0.9)


def test_cli_dispatch(capsys):
    assert cli.main([]) == 2
    assert "usage:" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--gammas" in out and "--task" in out and "--amp" in out


def _fake_results(task, cfg, headline):
    """What run_task returns, with the headline metric of each run set to ``headline[key]``."""
    runs = {}
    for spec in cfg.runs():
        entry = {"name": spec.name, "strategy": spec.strategy, "gamma": spec.gamma,
                 "seeds": {str(s): {} for s in cfg.seed_list()}, "train_loss_mean": 0.1, "step_ms": 1.0,
                 "saved_bytes": 100, "layer_bytes": 10}
        for m in task.metrics:
            entry[f"{m.key}_mean"], entry[f"{m.key}_std"] = headline[spec.key], 0.0
        runs[spec.key] = entry
    return {"runs": runs, "metrics": [dataclasses.asdict(m) for m in task.metrics], "elapsed_s": 0.0,
            "fidelity_s": 0.0, "tune_s": 0.0, "check": runner.check_result(task, runs, cfg)}


@pytest.mark.parametrize(
    "task, base, failing, passing",
    [
        ("digits", 98.0, 96.4, 96.6),  # 1.6 points below fails, 1.4 passes
        ("text", 2.0, 2.062, 2.058),  # 3.1% above fails, 2.9% passes
    ],
)
def test_check_flags_and_verdict(task, base, failing, passing, monkeypatch, tmp_path, capsys):
    cfg = demo.config_for(demo.TASKS[task], {"gammas": (0.5,)}, check=True)
    assert cfg.seeds == 3 and cfg.gammas == (0.8,) and cfg.contrast is None
    assert [s.key for s in cfg.runs()] == ["baseline", "parallel_min_k@0.8"]

    def fake(dropit):
        return lambda t, cfg, log=print: _fake_results(t, cfg, {"baseline": base, "parallel_min_k@0.8": dropit})

    argv = ["--task", task, "--check", "--out", str(tmp_path), "--no-progress"]
    monkeypatch.setattr(demo, "run_task", fake(failing))
    assert demo.main(argv) == 1
    assert f"check FAIL ({task})" in capsys.readouterr().out
    monkeypatch.setattr(demo, "run_task", fake(passing))
    assert demo.main(argv) == 0
    assert f"check PASS ({task})" in capsys.readouterr().out
    # with both tasks, one failing check fails the run
    results = {"digits": (98.0, 96.0), "text": (2.0, 2.0)}
    monkeypatch.setattr(demo, "run_task", lambda t, cfg, log=print: _fake_results(
        t, cfg, {"baseline": results[t.name][0], "parallel_min_k@0.8": results[t.name][1]}))
    assert demo.main(["--check", "--out", str(tmp_path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "check FAIL (digits)" in out and "check PASS (text)" in out


# ------------------------------------------------------------------------------ the [demo] extra


def test_demo_without_its_extra_names_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    ran = []
    monkeypatch.setattr(demo, "run_task", lambda *a, **k: ran.append(a))
    assert demo.main(["--task", "text", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "[demo]" in err and "tqdm" in err and "scikit-learn" not in err
    assert not ran
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert demo.main(["--task", "digits", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "tqdm" in err


# ------------------------------------------------------------------------------------ acceptance


def _acceptance(task: str, tmp_path, capsys) -> dict:
    rc = demo.main(["--task", task, "--check", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    print(out)
    results = json.loads((tmp_path / task / "results.json").read_text())
    check = results["check"]
    assert check["seeds"] == demo.TASKS[task].check.seeds
    assert check["gap"] <= check["tolerance"], out
    assert rc == 0
    return results


@pytest.mark.slow
def test_check_acceptance(tmp_path, capsys):
    """With the defaults, DropIT γ=0.8 parallel_min_k is within 1.5 points of the baseline (3 seeds)."""
    results = _acceptance("digits", tmp_path, capsys)
    # digits is an easy task, so accuracy alone is a weak signal; the training loss is a finer one
    base = results["runs"]["baseline"]["train_loss_mean"]
    dropit = results["runs"]["parallel_min_k@0.8"]["train_loss_mean"]
    assert dropit < 2.0 * base, (dropit, base)


@pytest.mark.slow
def test_text_check_acceptance(tmp_path, capsys):
    """With the defaults, DropIT γ=0.8's validation loss is within 3% of the baseline's."""
    results = _acceptance("text", tmp_path, capsys)
    # the model learnt something: well below the 5.5 nats of a uniform guess over bytes
    assert results["runs"]["baseline"]["val_loss_mean"] < 3.0
