"""The runner on padded sequences read from an NPZ with ``lengths``: trains, padding inert."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import use_test_experiments
from sklearn.datasets import load_digits

from fbp import nn
from fbp.run import cli, experiment, runner

TIME = 11  # digits rows are 8 steps; the files pad them to 11


@pytest.fixture(autouse=True)
def _experiments(monkeypatch):
    use_test_experiments(monkeypatch)


def _write(path, *, garbage, n=150, seed=0):
    """Digits as row sequences cut to 5..8 rows, padded to TIME with ``garbage``'s values."""
    x, y = load_digits(return_X_y=True)
    x, y = x.reshape(-1, 8, 8)[:n], y[:n]
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 9, size=n)
    pad = np.random.default_rng(garbage).normal(0, 50, size=(n, TIME, 8)) if garbage else None
    out = np.zeros((n, TIME, 8)) if pad is None else pad
    for i, length in enumerate(lengths):
        out[i, :length] = x[i, :length]
    np.savez(path, x=out, y=y, lengths=lengths)
    return path


def test_cli_trains_on_a_padded_sequence_npz(tmp_path, capsys):
    f = _write(tmp_path / "seq.npz", garbage=1)
    out = tmp_path / "run"
    args = ["train", "digits-sequence", "--out", str(out), "--data", str(f)]
    assert cli.main([*args, "--epochs", "2", "--batch-size", "32"]) == 0
    assert "data " + str(f) + ": 105 train / 15 validation / 30 test" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["loss"] < rows[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test"]["accuracy"] <= 1 and np.isfinite(summary["test"]["loss"])
    # fbp eval evaluates with the lengths too: the report's numbers again.
    assert cli.main(["eval", str(out)]) == 0
    evaluated = json.loads((out / "eval.json").read_text())["test"]
    assert evaluated == pytest.approx(summary["test"], rel=1e-5)


def _small(exp):
    return dataclasses.replace(
        exp, model=lambda ds: nn.Sequential([nn.GRU(16), nn.LastStep(), nn.Dense(ds.classes)])
    )


def test_garbage_in_the_padding_changes_nothing(tmp_path):
    exp = _small(experiment.get("digits-sequence"))
    runs = []
    for name, garbage in (("zeros.npz", 0), ("noise.npz", 7)):
        f = str(_write(tmp_path / name, garbage=garbage))
        runs.append(runner.run(exp, data_file=f, epochs=2, print_fn=lambda line: None))
    a, b = runs
    assert [r["loss"] for r in a.history] == pytest.approx([r["loss"] for r in b.history], 1e-6)
    assert a.test == pytest.approx(b.test, rel=1e-6)
    for pa, pb in zip(
        jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(pa), np.asarray(pb), rtol=1e-5, atol=1e-6)
    # The two runs did see different inputs: the padding differs after loading.
    x = np.asarray(a.dataset.train.x)
    noisy = np.asarray(b.dataset.train.x)
    assert not np.allclose(x, noisy)


def test_padded_steps_get_no_gradient():
    model = nn.Sequential([nn.GRU(6), nn.LastStep(), nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (4, TIME, 5))
    lengths = jnp.array([TIME, 1, 5, 8])
    params = model.init(jax.random.key(1), x)
    y, res = model.forward(params, x, lengths=lengths)
    _, dx = model.backward(params, res, jnp.ones_like(y))
    pad = jnp.arange(TIME)[None, :] >= lengths[:, None]
    assert float(jnp.abs(dx[pad]).max()) == 0.0
    assert float(jnp.abs(dx[~pad]).min(initial=1.0)) >= 0.0 and bool(jnp.any(dx[~pad] != 0))


def test_lengths_for_a_model_without_sequence_layers_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    f = tmp_path / "seq.npz"
    np.savez(f, x=rng.normal(size=(60, 5, 4)), y=np.arange(60) % 3, lengths=np.full(60, 5))
    out = tmp_path / "run"
    assert cli.main(["train", "tiny", "--out", str(out), "--data", str(f)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"seq\.npz has sequence lengths but the model \(Sequential\) takes no", err)
    assert not out.exists()


def test_bad_lengths_exit_2_naming_file_and_index(tmp_path, capsys):
    f = tmp_path / "seq.npz"
    x, y = np.zeros((40, 5, 8)), np.arange(40) % 10
    np.savez(f, x=x, y=y, lengths=np.where(np.arange(40) == 13, 6, 5))
    out = tmp_path / "run"
    assert cli.main(["train", "digits-sequence", "--out", str(out), "--data", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{f}: lengths[13] = 6 is outside [1, 5] (x has 5 time steps)." in err
    assert not out.exists()
