"""``fbp train --precision``: saved, resumed, refused, and through the non-finite policy."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_runs import summary as _summary
from cli_runs import train as _train
from cli_runs import use_test_experiments

from fbp.run import cli, export, options

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _experiments(monkeypatch):
    use_test_experiments(monkeypatch)


def test_bf16_mixed_run_saves_precision_and_float32_params(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--epochs", 2, "--precision", "bf16-mixed") == 0
    s = _summary(out)
    assert s["config"]["precision"] == "bf16-mixed"
    params = export.load_run(out, which="last")["params"]
    assert {np.asarray(v).dtype for v in jax.tree.leaves(params)} == {np.dtype("float32")}
    assert np.isfinite(s["test"]["loss"])
    assert s["test"]["accuracy"] > 0.5  # iris, 2 epochs: learning, not just running


def test_unknown_precision_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "tiny", "--out", str(out), "--precision", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "run: precision must be one of ('f32', 'bf16-mixed', 'bf16'), got 'fp8'." in err[0]
    assert not out.exists()


def test_resume_keeps_precision_and_refuses_another(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--epochs", 1, "--precision", "bf16-mixed") == 0
    capsys.readouterr()
    assert _train(out, "--epochs", 2, "--resume", "--precision", "f32") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--precision cannot change on resume (the run has 'bf16-mixed', given 'f32')" in err[0]
    assert _train(out, "--epochs", 2, "--resume") == 0
    assert _summary(out)["config"]["precision"] == "bf16-mixed"


def test_precision_is_fixed_on_resume():
    exp = options.TrainingOptions(epochs=2, lr=0.1)
    saved = {"epochs": 2, "precision": "f32"}
    cfg = options.resolve(exp, saved, overrides={"precision": "bf16"})
    with pytest.raises(ValueError, match=r"--precision cannot change on resume"):
        options.resume_changes(saved, cfg)


def test_nonfinite_bf16_step_goes_through_the_skip_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_POISON", "1")
    out = tmp_path / "run"
    assert _train(out, "--precision", "bf16-mixed", name="tiny-poison") == 0
    s = _summary(out)
    assert s["skipped_steps"] == 3 and s["steps"] == 9  # one poisoned batch an epoch
    params = export.load_run(out, which="last")["params"]
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(params))


def test_precision_with_data_parallel_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--precision", "bf16-mixed", "--devices", "1") == 2
    assert "--precision bf16-mixed is not supported with --devices" in capsys.readouterr().err


@pytest.mark.parametrize("flag, calls", [([], 1), (["--no-compilation-cache"], 0)])
def test_fbp_train_enables_the_compilation_cache_unless_told_not_to(
    tmp_path, monkeypatch, flag, calls
):
    seen = []
    monkeypatch.setattr(cli.compile_cache, "enable_compilation_cache", lambda: seen.append(1))
    assert _train(tmp_path / "run", "--epochs", 1, *flag) == 0
    assert len(seen) == calls


@pytest.mark.slow
def test_second_identical_fbp_train_reads_the_cache(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    env.pop("FBP_COMPILATION_CACHE", None)
    env["FBP_EXPERIMENTS"] = str(ROOT / "tests" / "experiments")
    for i in range(2):
        cmd = [
            sys.executable,
            "-m",
            "fbp.run.cli",
            "train",
            "tiny",
            "--out",
            str(tmp_path / f"r{i}"),
        ]
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    entries = list((tmp_path / "cache" / "fbp" / "xla").iterdir())
    assert entries, "the first run wrote no cache entries"
    s0, s1 = (_summary(tmp_path / f"r{i}") for i in range(2))
    assert s0["params_sha256"] == s1["params_sha256"]  # cached programs: same results
