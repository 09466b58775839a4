"""A run remembers its data, refuses what no longer fits it, and fails in one line.

Each test reproduces one row of docs/runner.md's "Runner: what is guaranteed" table
(data fingerprints, output width, resume changes, memory).
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_runs import EXPERIMENTS, iris_csv, use_test_experiments
from cli_runs import summary as _summary
from cli_runs import train as _train

from fbp import checkpoint as ckpt
from fbp import data as fbp_data
from fbp import memory as fbp_memory
from fbp.run import cli, experiment, fingerprint, progress, runner


@pytest.fixture(autouse=True)
def _experiments(monkeypatch):
    use_test_experiments(monkeypatch)


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A 1-epoch run of tiny on an iris CSV given by a relative path (cwd = the CSV's folder)."""
    base = tmp_path_factory.mktemp("csv")
    iris_csv(base / "iris.csv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FBP_EXPERIMENTS", EXPERIMENTS)
        mp.chdir(base)
        assert _train(base / "run", "--epochs", 1, "--data", "iris.csv") == 0
    return base


def _fresh(tmp_path: Path) -> tuple[Path, Path]:
    """A new 1-epoch run of tiny on an iris CSV (absolute path): (run dir, CSV)."""
    data = iris_csv(tmp_path / "iris.csv")
    assert _train(tmp_path / "run", "--epochs", 1, "--data", data) == 0
    return tmp_path / "run", data


def test_run_records_its_data_files_absolute_path_size_and_sha256(csv_run):
    d = _summary(csv_run / "run")["data"]
    f = csv_run / "iris.csv"
    assert d["path"] == str(f) and Path(d["path"]).is_absolute()
    assert d["size"] == f.stat().st_size and d["sha256"] == fingerprint.file_sha256(f)
    assert d["classes"] == 3 and d["examples"]["train"] + d["examples"]["test"] < 150
    assert _summary(csv_run / "run")["config"]["data_file"] == str(f)


def test_builtin_data_records_its_hash_and_versions(tmp_path):
    assert _train(tmp_path / "r", "--epochs", 1) == 0
    d = _summary(tmp_path / "r")["data"]
    assert d["kind"] == "experiment" and d["name"] == "iris" and len(d["sha256"]) == 64
    assert d["versions"]["scikit-learn"] and d["versions"]["numpy"] == np.__version__


def test_eval_from_another_directory_finds_the_data_file(csv_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", str(csv_run / "run")]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_changed_data_file_is_refused_in_one_line_then_accepted_and_recorded(tmp_path, capsys):
    run, data = _fresh(tmp_path)
    iris_csv(data, rows=140)  # ten rows fewer: the split would move test rows into training
    for argv in (["eval", str(run)], ["export", str(run)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "the data changed since this run was trained" in err
        assert "size" in err and "sha256" in err and str(data) in err
        assert "--accept-changed-data" in err
    assert not (run / "export").exists()  # a refused export leaves no folder
    assert _train(run, "--epochs", 2, "--resume") == 2
    assert "--accept-changed-data" in capsys.readouterr().err
    assert _train(run, "--epochs", 2, "--resume", "--accept-changed-data") == 0
    s = _summary(run)
    (change,) = [c for c in s["changes"] if c["option"] == "data"]
    assert change["epoch"] == 2 and "size" in change["what"] and change["to"]["size"] < 1e6
    assert s["data"]["sha256"] != change["to"]["sha256"]  # the original is kept as it was
    assert cli.main(["eval", str(run)]) == 0  # the accepted data is what eval now checks


def test_moved_data_file_is_named_and_found_with_data(tmp_path, capsys):
    run, data = _fresh(tmp_path)
    moved = data.rename(tmp_path / "elsewhere.csv")
    assert cli.main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"data file {data} is missing" in err and "--data FILE" in err
    assert cli.main(["eval", str(run), "--data", str(moved)]) == 0
    assert _train(run, "--epochs", 2, "--resume", "--data", moved) == 0
    (change,) = [c for c in _summary(run)["changes"] if c["option"] == "data_file"]
    assert change["from"] == str(data) and change["to"] == str(moved)


@pytest.mark.parametrize("classes", [2, 4])  # tiny has 3 outputs
def test_output_width_must_equal_the_datas_classes(tmp_path, capsys, classes):
    f = iris_csv(tmp_path / "d.csv", rows=100 if classes == 2 else 150)
    if classes == 4:  # every 10th row becomes a fourth class
        lines = f.read_text().splitlines()
        lines[1::10] = [line.rsplit(",", 1)[0] + ",3" for line in lines[1::10]]
        f.write_text("\n".join(lines) + "\n")
    assert _train(tmp_path / "r", "--epochs", 1, "--data", f) == 2
    err = capsys.readouterr().err
    assert f"the model has 3 outputs but {f} has {classes} classes" in err
    assert not (tmp_path / "r").exists()


def test_zero_epochs_is_refused_and_writes_nothing(tmp_path, capsys):
    assert _train(tmp_path / "r", "--epochs", 0) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fbp: error: run: epochs must be >= 1, got 0."
    assert not (tmp_path / "r").exists()


def test_resume_refuses_an_option_that_cannot_change(tmp_path, capsys):
    assert _train(tmp_path / "r", "--epochs", 1) == 0
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    for flag, value, old in (("--seed", 5, 0), ("--batch-size", 8, 16), ("--schedule", "cosine", "constant")):  # fmt: skip
        assert _train(tmp_path / "r", "--epochs", 2, "--resume", flag, value) == 2
        err = capsys.readouterr().err
        assert f"{flag} cannot change on resume (the run has {old!r}, given {value!r})" in err
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before


def test_resume_records_a_changed_option_at_its_epoch_not_over_the_config(tmp_path):
    out = tmp_path / "r"
    assert _train(out, "--epochs", 2) == 0
    assert _train(out, "--epochs", 3, "--resume", "--lr", 0.5) == 0
    assert _train(out, "--epochs", 4, "--resume") == 0  # the changed lr stays in force
    s = _summary(out)
    assert s["config"]["lr"] == 0.01 and s["config"]["epochs"] == 2
    lr = [c for c in s["changes"] if c["option"] == "lr"]
    assert lr == [{"epoch": 3, "step": 12, "option": "lr", "from": 0.01, "to": 0.5}]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [0.01, 0.01, 0.5, 0.5]
    assert "changes" not in rows[1] and {c["option"] for c in rows[2]["changes"]} == {
        "lr",
        "epochs",
    }
    meta = ckpt.read_manifest(ckpt.list_checkpoints(out / "checkpoints")[-1])["meta"]
    assert meta["config"]["lr"] == 0.01 and meta["config"]["changes"] == s["changes"]


def test_run_that_cannot_fit_is_refused_before_compiling(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fbp_memory, "available_bytes", lambda device=None: 1000)
    assert _train(tmp_path / "r", "--epochs", 1) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is free" in err and "--batch-size" in err
    assert 'memory="linear"' in err and not (tmp_path / "r").exists()


def _exhausting_chunk(monkeypatch, after: int) -> None:
    """Make the training chunk raise XLA's allocation failure from its ``after``-th call on."""
    real = runner.make_train_chunk
    calls = [0]

    def make(*args, **kwargs):
        chunk = real(*args, **kwargs)

        def run(*a):
            calls[0] += 1
            if calls[0] > after:
                raise jax.errors.JaxRuntimeError(
                    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 "
                    "bytes.\nBufferAssignment OOM Debugging.\n" + "detail\n" * 40
                )
            return chunk(*a)

        return run

    monkeypatch.setattr(runner, "make_train_chunk", make)


def test_out_of_memory_during_the_run_ends_in_one_line_and_keeps_the_checkpoint(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "r"
    assert _train(out, "--epochs", 2) == 0
    good = ckpt.list_checkpoints(out / "checkpoints")
    _exhausting_chunk(monkeypatch, after=0)
    assert _train(out, "--epochs", 4, "--resume") == 5
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fbp: error: out of memory during training")
    assert "RESOURCE_EXHAUSTED" in err and "--batch-size than 16" in err
    assert 'memory="linear"' in err and f"checkpoint {good[-1]} is kept" in err
    assert ckpt.list_checkpoints(out / "checkpoints") == good
    monkeypatch.undo()
    use_test_experiments(monkeypatch)
    assert _train(out, "--epochs", 4, "--resume") == 0


def test_host_memory_error_is_reported_the_same_way(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(runner, "make_train_chunk", lambda *a, **k: boom)
    assert _train(tmp_path / "r", "--epochs", 1) == 5
    err = capsys.readouterr().err.strip()
    assert "out of memory during training (MemoryError)" in err
    assert "no checkpoint was written yet" in err and not (tmp_path / "r").exists()


def test_data_description_is_used_in_messages():
    ds = fbp_data.load("iris")
    d = fingerprint.describe(ds, None)
    assert fingerprint.difference(d, dict(d)) is None
    assert fingerprint.difference(d, dict(d, versions={"numpy": "0"})) is None  # same arrays
    other = dict(d, versions={"numpy": "0"}, sha256="1" * 64)
    assert "versions" in fingerprint.difference(d, other) and "sha256" in fingerprint.difference(
        d, other
    )
    with pytest.raises(fingerprint.DataChanged, match=r"run: the data changed .*\(sha256 .*iris\)"):
        fingerprint.check(dict(d, sha256="0" * 64), d, where="run", accept=False)


def test_two_experiment_files_of_one_name_are_refused_naming_both(tmp_path, monkeypatch, capsys):
    for stem in ("dup_name", "dup-name"):  # both are experiment "dup-name"
        (tmp_path / f"{stem}.py").write_text((Path(EXPERIMENTS) / "tiny.py").read_text())
    monkeypatch.setenv("FBP_EXPERIMENTS", str(tmp_path))
    assert cli.main(["train", "dup-name", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"defined by two files, {tmp_path / 'dup-name.py'} and {tmp_path / 'dup_name.py'}" in err


def test_local_experiment_shadowing_another_is_warned_naming_both(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.py").write_text((Path(EXPERIMENTS) / "tiny.py").read_text())
    monkeypatch.setenv("FBP_EXPERIMENTS", f"{tmp_path}:{EXPERIMENTS}")
    assert experiment.get("tiny").name == "tiny"
    err = capsys.readouterr().err
    assert f"experiment 'tiny' is {tmp_path / 'tiny.py'}, which shadows" in err
    assert str(Path(EXPERIMENTS) / "tiny.py") in err
    assert cli.main(["list"]) == 0
    assert "shadows" in capsys.readouterr().err


def test_sweep_resume_names_a_missing_run_directory(tiny_sweep, tmp_path, capsys):
    out = tmp_path / "sw"
    shutil.copytree(tiny_sweep, out)
    shutil.rmtree(out / "seed-1")
    assert _train(out, "--epochs", 2, "--seeds", "0,1", "--resume") == 2
    err = capsys.readouterr().err
    assert f"the run directory {out / 'seed-1'} of this sweep is missing" in err
    assert not (out / "seed-1").exists()


def test_sweep_records_and_checks_each_runs_data(tiny_sweep, tmp_path, capsys):
    s = _summary(tiny_sweep / "seed-1")
    assert s["data"]["name"] == "iris" and len(s["data"]["sha256"]) == 64
    out = tmp_path / "sw"
    shutil.copytree(tiny_sweep, out)
    for run in ("seed-0", "seed-1"):  # as if the experiment's data had changed since
        for m in (out / run / "checkpoints").glob("ckpt-*/manifest.json"):
            m.write_text(m.read_text().replace(s["data"]["sha256"][:20], "0" * 20))
    assert _train(out, "--epochs", 2, "--seeds", "0,1", "--resume") == 2
    assert "the data changed since this run was trained" in capsys.readouterr().err


def test_eval_on_a_sweeps_directory_names_its_runs(tiny_sweep, capsys):
    assert cli.main(["eval", str(tiny_sweep)]) == 2
    err = capsys.readouterr().err
    assert "a sweep's directory" in err
    assert f"{tiny_sweep / 'seed-0'}, {tiny_sweep / 'seed-1'}" in err


def test_failed_export_leaves_no_export_folder(tmp_path, monkeypatch, capsys):
    assert _train(tmp_path / "r", "--epochs", 1) == 0

    def fail(*a, **k):
        raise ValueError("fbp export: cannot serialize (test)")

    monkeypatch.setattr(jax.export, "export", fail)
    assert cli.main(["export", str(tmp_path / "r")]) == 2
    assert "cannot serialize" in capsys.readouterr().err
    assert not (tmp_path / "r" / "export").exists()


def test_non_terminal_output_gets_periodic_step_lines_with_eta(monkeypatch):
    lines: list[str] = []
    printer = progress.Printer(lines.append, 2, 1, steps_per_epoch=6, line_every_s=0.0)
    printer.step(0, 2)
    printer.step(0, 4)
    assert len(lines) == 2 and lines[0].startswith("epoch      1/2  step 2/6")
    assert "elapsed  ETA" in lines[1]
    quiet: list[str] = []
    printer = progress.Printer(quiet.append, 2, 1, steps_per_epoch=6)  # 10 s apart by default
    printer.step(0, 2)
    assert quiet == []
