"""The digits demo: CLI, outputs, shared initialisation and data order, the --check acceptance."""

from __future__ import annotations

import json

import pytest
import torch

from dropit_cuda import __main__ as cli
from dropit_cuda import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_tiny_run_writes_json_png_and_prints_table(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--epochs", "1", "--seeds", "1", "--gammas", "0.8", "--contrast", "random:0.5",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("run "))
    for column in ("test acc %", "train loss", "saved (model)", "saved (DropIT layers)", "ms/step"):
        assert column in header
    rows = {line.split("  ")[0].strip() for line in text.splitlines()}
    assert {"baseline", "parallel_min_k γ=0.8", "random γ=0.5"} <= rows

    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == ["baseline", "parallel_min_k@0.8", "random@0.5"]
    assert results["dropit_layers"], "the converted layers are listed"
    assert "stem.0" not in results["dropit_layers"]  # the first layer stays dense
    n_test = results["dataset"]["test"]
    for key, run in results["runs"].items():
        r = run["seeds"]["0"]
        assert len(r["train_loss"]) == len(r["test_acc"]) == 1
        # an accuracy is a whole number of test images
        assert abs(r["final_test_acc"] * n_test / 100 - round(r["final_test_acc"] * n_test / 100)) < 1e-6
        assert run["saved_bytes"] > 0 and run["layer_bytes"] > 0 and r["step_ms"] > 0
    base, packed = results["runs"]["baseline"], results["runs"]["parallel_min_k@0.8"]
    # the converted layers cache far less than the dense inputs the same layers keep in the baseline
    assert packed["layer_bytes"] < 0.5 * base["layer_bytes"]


def test_runs_share_initial_weights_and_batches(tmp_path):
    """γ = 0 keeps every element, so its run must follow the baseline's: same start, same batches."""
    cfg = demo.DemoConfig(gammas=(0.0,), contrast=("random", 0.9), epochs=1, seeds=1, out=str(tmp_path),
                          progress=False)
    runs = demo.run_demo(cfg, log=lambda _: None)["runs"]
    base = runs["baseline"]["seeds"]["0"]
    same = runs["parallel_min_k@0"]["seeds"]["0"]
    rand = runs["random@0.9"]["seeds"]["0"]
    assert same["train_loss"][0] == pytest.approx(base["train_loss"][0], rel=1e-4)
    assert abs(same["final_test_acc"] - base["final_test_acc"]) <= 100.0 * 2 / 450  # 2 images at most
    assert rand["train_loss"][0] != pytest.approx(base["train_loss"][0], rel=1e-3)


def test_batch_orders_are_seeded_permutations():
    a = demo.batch_orders(3, 100, epochs=2, batch_size=32)
    b = demo.batch_orders(3, 100, epochs=2, batch_size=32)
    c = demo.batch_orders(4, 100, epochs=2, batch_size=32)
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
    d = demo.load_digits_split(0)
    assert d.x_train.shape[1:] == (1, 8, 8) and len(d.x_train) + len(d.x_test) == 1797
    assert abs(len(d.x_test) - 0.25 * 1797) < 1
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert torch.bincount(d.y_test, minlength=10).min() >= 40  # stratified: every digit is tested
    again, other = demo.load_digits_split(0), demo.load_digits_split(1)
    assert torch.equal(d.y_test, again.y_test) and torch.equal(d.x_test, again.x_test)
    assert not torch.equal(d.x_test, other.x_test)
    with pytest.raises(ValueError, match="test_fraction"):
        demo.load_digits_split(0, test_fraction=1.0)


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
        (["--batch-size", "5000"], "batch_size"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv, name, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert name in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("epochs", 0, ValueError),
        ("seeds", 1.5, TypeError),
        ("gammas", (0.5, 1.0), ValueError),
        ("strategy", "top_k", ValueError),
        ("contrast", ("random", -0.1), ValueError),
        ("chunk", 0, ValueError),
        ("lr", 0.0, ValueError),
    ],
)
def test_config_validation_names_the_field(field, value, error, tmp_path):
    cfg = demo.DemoConfig(out=str(tmp_path), progress=False)
    setattr(cfg, field, value)
    with pytest.raises(error, match=field.split("_")[0]):
        demo.run_demo(cfg, log=lambda _: None)
    assert not (tmp_path / "results.json").exists()


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
    assert "--gammas" in capsys.readouterr().out


def test_check_flags_and_verdict(monkeypatch, tmp_path, capsys):
    args = demo.build_parser().parse_args(["--check", "--gammas", "0.5"])
    cfg = demo.config_from_args(args)
    assert cfg.seeds == demo.CHECK_SEEDS and cfg.gammas == (0.8,) and cfg.contrast is None
    assert [s.key for s in cfg.runs()] == ["baseline", "parallel_min_k@0.8"]

    def fake(base_acc, dropit_acc):
        def run_demo(cfg, log=print):
            runs = {
                "baseline": {"name": "baseline", "strategy": None, "gamma": 0.0, "test_acc_mean": base_acc},
                "parallel_min_k@0.8": {"name": "parallel_min_k γ=0.8", "strategy": "parallel_min_k",
                                       "gamma": 0.8, "test_acc_mean": dropit_acc},
            }
            for r in runs.values():
                r.update(seeds={"0": {}, "1": {}, "2": {}}, test_acc_std=0.0, train_loss_mean=0.1,
                         step_ms=1.0, saved_bytes=100, layer_bytes=10)
            return {"runs": runs, "elapsed_s": 0.0, "check": demo.check_result(runs, cfg)}
        return run_demo

    monkeypatch.setattr(demo, "run_demo", fake(98.0, 96.4))  # 1.6 points below: fails
    assert demo.main(["--check", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "check FAIL" in capsys.readouterr().out
    monkeypatch.setattr(demo, "run_demo", fake(98.0, 96.6))  # 1.4 points below: passes
    assert demo.main(["--check", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "check PASS" in capsys.readouterr().out


@pytest.mark.slow
def test_check_acceptance(tmp_path, capsys):
    """With the defaults, DropIT γ=0.8 parallel_min_k is within 1.5 points of the baseline (3 seeds)."""
    rc = demo.main(["--check", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    print(out)
    results = json.loads((tmp_path / "results.json").read_text())
    check = results["check"]
    assert check["seeds"] == 3
    assert check["gap_points"] <= demo.CHECK_TOLERANCE, out
    assert rc == 0
    # digits is an easy task, so accuracy alone is a weak signal; the training loss is a finer one
    base = results["runs"]["baseline"]["train_loss_mean"]
    dropit = results["runs"]["parallel_min_k@0.8"]["train_loss_mean"]
    assert dropit < 2.0 * base, (dropit, base)
