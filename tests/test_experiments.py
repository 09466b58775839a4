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
