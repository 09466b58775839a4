"""DP-SGD in the runner: ``--dp-clip``/``--dp-noise``/``--dp-delta``, epsilon per epoch, refusals."""

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_runs import train as _train
from cli_runs import use_test_experiments

from fbp import nn
from fbp import value_and_grad as fbp_value_and_grad
from fbp.extend import accounting
from fbp.run import experiment, runner

pytest.importorskip("dp_accounting")


@pytest.fixture(autouse=True)
def _experiments(monkeypatch):
    use_test_experiments(monkeypatch)


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_cli_logs_epsilon_per_epoch_and_the_final_budget(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--epochs", 3, "--dp-clip", 1.0, "--dp-noise", 1.1) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    eps = [r["epsilon"] for r in rows]
    assert 0 < eps[0] < eps[1] < eps[2]
    # The same numbers from the accountant directly: 6 steps of 16 from 105 train examples.
    ds = runner.load_data(experiment.get("tiny"), runner.resolve_config(experiment.get("tiny")))
    acc = accounting.PrivacyAccountant.for_batches(
        noise=1.1, batch_size=16, n=len(ds.train.x), delta=1e-5
    )
    np.testing.assert_allclose(eps, [acc.epsilon(r["step"]) for r in rows], rtol=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == eps[-1]
    assert summary["privacy"]["delta"] == 1e-5
    assert summary["privacy"]["steps"] == rows[-1]["step"]
    assert summary["config"]["dp_clip"] == 1.0 and summary["config"]["dp_noise"] == 1.1
    assert re.search(r"epoch +3/3 .*epsilon [0-9.]+", printed), printed
    assert f"DP-SGD: epsilon {eps[-1]:.3g} at delta 1e-05" in printed


def test_no_noise_and_a_huge_clip_is_the_plain_run():
    exp = experiment.get("tiny")
    plain = runner.run(exp, epochs=2, print_fn=lambda line: None)
    dp = runner.run(exp, epochs=2, dp_clip=1e6, dp_noise=0.0, print_fn=lambda line: None)
    assert all(r["epsilon"] is None for r in dp.history)  # no noise: unbounded epsilon
    assert "epsilon" not in plain.history[0]
    for a, b in zip(
        jax.tree.leaves(plain.state.params), jax.tree.leaves(dp.state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # A small clip does change the run (the gradient really is DP-SGD's).
    clipped = runner.run(exp, epochs=2, dp_clip=1e-3, dp_noise=0.0, print_fn=lambda line: None)
    a, b = jax.tree.leaves(plain.state.params)[0], jax.tree.leaves(clipped.state.params)[0]
    assert not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-3)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--dp-clip", 0], r"run: dp_clip must be > 0, got 0\.0"),
        (["--dp-clip", -1], r"run: dp_clip must be > 0, got -1\.0"),
        (["--dp-clip", 1, "--dp-noise", -0.5], r"run: dp_noise must be >= 0, got -0\.5"),
        (["--dp-clip", 1, "--dp-delta", 1], r"run: dp_delta must be in \(0, 1\), got 1\.0"),
        (["--dp-clip", 1, "--dp-delta", 0], r"run: dp_delta must be in \(0, 1\), got 0\.0"),
        (["--dp-noise", 1], r"--dp-noise needs --dp-clip"),
        (["--dp-clip", 1, "--batch-size", 1000], r"batch_size=1000 is larger"),
    ],
)
def test_bad_dp_options_exit_2_and_write_nothing(tmp_path, capsys, args, match):
    out = tmp_path / "run"
    assert _train(out, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fbp: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert not out.exists()


def _refused(tmp_path, exp, match, **overrides):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        runner.run(exp, out=out, print_fn=lambda line: None, **overrides)
    assert not out.exists()


def test_a_layer_without_per_example_rules_is_refused_before_training(tmp_path):
    exp = dataclasses.replace(
        experiment.get("tiny"),
        model=lambda ds: nn.Sequential([nn.Dense(8), nn.BatchNorm(), nn.Dense(3)]),
    )
    _refused(tmp_path, exp, r"--dp-clip needs per-example rules.*BatchNorm", dp_clip=1.0)


def test_an_experiment_grad_fn_and_dp_are_refused_together(tmp_path):
    exp = dataclasses.replace(
        experiment.get("tiny"),
        grad_fn=lambda model, ds: fbp_value_and_grad(model, exp.loss, has_aux=True),
    )
    _refused(tmp_path, exp, r"--dp-clip replaces the gradient .* own grad_fn", dp_clip=1.0)


def test_an_experiment_probe_and_dp_are_refused_together(tmp_path):
    exp = dataclasses.replace(experiment.get("tiny"), probe=lambda model, loss, opt: None)
    _refused(tmp_path, exp, r"--dp-clip cannot run with this experiment's probe", dp_clip=1.0)


def test_noise_without_dp_accounting_is_refused(tmp_path, monkeypatch):
    def missing():
        raise ImportError("no dp_accounting")

    monkeypatch.setattr(accounting, "_dp_accounting", missing)
    exp = experiment.get("tiny")
    _refused(
        tmp_path, exp, r"--dp-noise 1\.0 > 0 needs the dp-accounting", dp_clip=1.0, dp_noise=1.0
    )
    runner.run(exp, epochs=1, dp_clip=1.0, dp_noise=0.0, print_fn=lambda line: None)  # no noise
