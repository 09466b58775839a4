"""`fbp export`: a jax.export artifact + safetensors that run without fbp or the experiment."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import EXPERIMENTS

from fbp import data
from fbp.run import cli, experiment, export, metrics, runner


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FBP_EXPERIMENTS", EXPERIMENTS)
        assert cli.main(["train", "tiny", "--out", str(out), "--epochs", "3"]) == 0
        assert cli.main(["export", str(out)]) == 0
        run = export.load_run(out, which="best")
    return out, run


def _in_process(run, raw_x):
    ds = run["dataset"]
    x = (jnp.asarray(raw_x) - ds.x_mean) / ds.x_std
    return np.asarray(run["model"].apply(run["params"], x, state=run["model_state"] or None))


def test_export_files_and_manifest(exported):
    out, run = exported
    d = out / "export"
    assert sorted(p.name for p in d.iterdir()) == [
        "README.txt",
        "export.json",
        "model.jaxexport",
        "params.safetensors",
    ]
    meta = json.loads((d / "export.json").read_text())
    assert meta["x_shape"] == ["batch", 4] and meta["classes"] == 3
    assert meta["standardized_inside"] and "input/mean" in meta["inputs"]
    assert meta["params_sha256"] == metrics.params_sha256(run["params"])


def test_exported_predictions_equal_the_in_process_model(exported):
    out, run = exported
    raw = data.load("iris", seed=0, standardize_x=False).test.x  # raw features
    d = out / "export"
    fn = jax.export.deserialize(bytearray((d / "model.jaxexport").read_bytes()))
    from safetensors.numpy import load_file

    arrays = load_file(str(d / "params.safetensors"))
    names = json.loads((d / "export.json").read_text())["inputs"]
    got = np.asarray(fn.call([arrays[k] for k in names], raw))
    want = _in_process(run, raw)
    # Two XLA programs (the export standardises inside): equal up to float32 rounding,
    # bit for bit under XLA's default compiler level, not under the tests' (conftest).
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert fn.call([arrays[k] for k in names], raw[:1]).shape == (1, 3)  # symbolic batch


def test_readme_loader_runs_without_fbp(exported, tmp_path):
    out, run = exported
    raw = data.load("iris", seed=0, standardize_x=False).test.x
    np.save(tmp_path / "x.npy", raw)
    loader = (out / "export" / "README.txt").read_text()
    script = (
        "import sys, numpy as np\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        + loader
        + f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(y))\n"
        "assert not any(m == 'fbp' or m.startswith('fbp.') for m in sys.modules), 'fbp imported'\n"
    )
    subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        cwd=tmp_path,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), _in_process(run, raw), rtol=1e-5, atol=1e-6
    )


def test_export_of_a_non_run_dir_exits_2(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path)]) == 2
    assert "not an fbp run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- every experiment

# Raw features (xor) and standardised, reshaped features (digits-sequence) run by default;
# every other experiment of `fbp list` under -m slow.
DEFAULT_RUN = {"xor", "digits-sequence"}


def _raw_test_x(run) -> np.ndarray:
    """The run's test features before standardisation: its data built with data.load's
    standardize_x=False (same split, same subsets and reshapes)."""
    raw_load = functools.partial(data.load, standardize_x=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load", raw_load)
        return runner.load_data(run["exp"], run["config"]).test.x


def _run_dirs(out: Path) -> list[Path]:
    """The run directory, or each variant's."""
    if (out / "summary.json").exists():
        return [out]
    return sorted(p.parent for p in out.glob("*/summary.json"))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[] if n in DEFAULT_RUN else [pytest.mark.slow])
        for n in sorted(experiment.available())
    ],
)
def test_export_of_every_experiment_predicts_like_the_trained_model_on_raw_features(name, tmp_path):
    out = tmp_path / name
    assert cli.main(["train", name, "--out", str(out), "--epochs", "1"]) == 0
    dirs = _run_dirs(out)
    assert dirs, f"{out}: no run directory"
    for run_dir in dirs:
        assert cli.main(["export", str(run_dir)]) == 0
        run = export.load_run(run_dir)
        ds, raw = run["dataset"], _raw_test_x(run)
        meta = json.loads((run_dir / "export" / "export.json").read_text())
        assert meta["standardized_inside"] == (ds.x_mean is not None), run_dir
        if name.startswith("digits"):  # standardised data: raw input differs from the model's
            assert meta["standardized_inside"] and not np.allclose(raw, ds.test.x)
        np.testing.assert_allclose(data.preprocess(ds, raw), ds.test.x, rtol=1e-6, atol=1e-6)
        fn = jax.export.deserialize(
            bytearray((run_dir / "export" / "model.jaxexport").read_bytes())
        )
        from safetensors.numpy import load_file

        arrays = load_file(str(run_dir / "export" / "params.safetensors"))
        x = raw.astype(np.int32 if np.issubdtype(raw.dtype, np.integer) else np.float32)
        got = np.asarray(fn.call([arrays[k] for k in meta["inputs"]], x))  # token ids: int32
        state = run["model_state"] or None
        want = np.asarray(run["model"].apply(run["params"], jnp.asarray(ds.test.x), state=state))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(run_dir))


def test_export_of_a_variants_parent_dir_names_the_variants(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text("{}")
    (tmp_path / "comparison.json").write_text("{}")
    with pytest.raises(ValueError, match=r"a run of several variants; name one of them: .*/a\."):
        export.run_config(tmp_path)


def test_export_of_a_sequence_model_carries_lengths_and_integer_ids(tmp_path):
    """A model over padded token sequences exports as ``(arrays, x int32, lengths)``."""
    from fbp import nn

    model = nn.Sequential(
        [nn.Embedding(7, 8), nn.TransformerBlock(2, causal=True, rope=True), nn.Dense(7)]
    )
    x = np.random.default_rng(0).integers(0, 7, (3, 5)).astype(np.int32)
    lengths = np.array([5, 2, 4], np.int32)
    params = jax.tree.map(lambda v: v.astype(jnp.float32), model.init(jax.random.key(0), x))
    d = export.export_model(model, params, {}, x, tmp_path / "export", lengths=True)
    meta = json.loads((d / "export.json").read_text())
    assert meta["lengths"] is True and meta["x_dtype"] == "int32"
    assert "np.asarray(x, np.int32), lengths)" in (d / "README.txt").read_text()
    from safetensors.numpy import load_file

    fn = jax.export.deserialize(bytearray((d / "model.jaxexport").read_bytes()))
    arrays = load_file(d / "params.safetensors")
    got = np.asarray(fn.call([arrays[k] for k in meta["inputs"]], x, lengths))
    want = np.asarray(model.apply(params, jnp.asarray(x), lengths=jnp.asarray(lengths)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[1, 2:] == want[1, 2:])  # padded steps as the model gives them
    assert fn.call([arrays[k] for k in meta["inputs"]], x[:1], lengths[:1]).shape == (1, 5, 7)
