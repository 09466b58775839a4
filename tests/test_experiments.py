"""The README's experiments reach the results it reports (through the runner)."""

import numpy as np
import pytest

from fbp import experiment, runner


def _run(name, tmp_path, **kwargs):
    return runner.run(experiment.get(name), out=tmp_path / name, print_fn=lambda s: None, **kwargs)


def test_xor_learns_the_truth_table(tmp_path):
    result = _run("xor", tmp_path)
    pred = np.asarray(result.model.apply(result.state.params, result.dataset.test.x)).ravel()
    assert result.test["loss"] < 0.01
    assert np.round(pred).astype(int).tolist() == [0, 1, 1, 0]


def test_digits_mlp_reaches_97_percent(tmp_path):
    assert _run("digits-mlp", tmp_path).test["accuracy"] >= 0.97


@pytest.mark.slow
def test_digits_cnn_reaches_98_5_percent(tmp_path):
    assert _run("digits-cnn", tmp_path).test["accuracy"] >= 0.985


def test_digits_dp_reports_accuracy_against_epsilon(tmp_path):
    pytest.importorskip("dp_accounting")
    lines = []
    result = runner.run(
        experiment.get("digits-dp"), out=tmp_path / "dp", print_fn=lines.append, epochs=1
    )
    assert set(result.variants) == {"non-private", "dp-eps8", "dp-eps3", "dp-eps1"}
    eps = {n: r.history[-1].get("epsilon") for n, r in result.variants.items()}
    assert eps["non-private"] is None
    # One of 40 epochs: each private run has spent a part of its budget, more noise less.
    assert 0 < eps["dp-eps1"] < eps["dp-eps3"] < eps["dp-eps8"] < 8
    assert any(line.startswith("| dp-eps1 | ") for line in lines)
    assert (tmp_path / "dp" / "accuracy_vs_epsilon.png").stat().st_size > 0


@pytest.mark.slow
def test_digits_dp_reaches_its_targets(tmp_path):
    pytest.importorskip("dp_accounting")
    result = _run("digits-dp", tmp_path)
    runs = result.variants
    for target in (8, 3, 1):
        r = runs[f"dp-eps{target}"]
        assert abs(r.history[-1]["epsilon"] - target) < 0.01 * target
    acc = [runs[n].test["accuracy"] for n in ("non-private", "dp-eps8", "dp-eps3", "dp-eps1")]
    assert acc == sorted(acc, reverse=True)
    assert acc[0] >= 0.97 and acc[-1] >= 0.85
