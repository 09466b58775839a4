"""`fbp export`: a jax.export artifact + safetensors that run without fbp or the experiment."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import cli, data, export

EXPERIMENTS = str(Path(__file__).parent / "experiments")


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
    assert meta["params_sha256"] == export._sha(run["params"])


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
    np.testing.assert_array_equal(got, want)
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
