"""The runner's refusals on resume and on sweeps: zero epochs, fixed options, sweep roots.

Companion to ``tests/test_run_guards.py``: the same guarantees (docs/runner.md,
"Runner: what is guaranteed") where a run is resumed or is one of a sweep's runs.
"""

import functools
import json
import shutil
from pathlib import Path

import jax
import pytest
from cli_runs import iris_csv, summary, use_test_experiments
from cli_runs import train as _train

from fbp import checkpoint as ckpt
from fbp.run import cli, progress
from fbp.run import sweep as fbp_sweep
from fbp.run.sweep import stack


@pytest.fixture(autouse=True)
def _experiments(monkeypatch):
    use_test_experiments(monkeypatch)


def _files(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_zero_epochs_on_resume_and_on_a_sweep_is_refused_and_changes_nothing(
    tiny_sweep, tmp_path, capsys
):
    before = _files(tiny_sweep)
    assert _train(tiny_sweep, "--epochs", 0, "--seeds", "0,1", "--resume") == 2
    assert capsys.readouterr().err.strip() == "fbp: error: run: epochs must be >= 1, got 0."
    assert _files(tiny_sweep) == before
    assert _train(tmp_path / "new", "--epochs", 0, "--seeds", "0,1") == 2
    assert "epochs must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_resumed_sweep_refuses_a_fixed_option_and_records_a_changed_one(
    tiny_sweep, tmp_path, capsys
):
    out = tmp_path / "sw"
    shutil.copytree(tiny_sweep, out)  # a copy, so the module's sweep stays as it was
    before = _files(out)
    assert _train(out, "--epochs", 2, "--seeds", "0,1", "--resume", "--batch-size", 8) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--batch-size cannot change on resume" in err
    assert "(the run has 16, given 8)" in err and _files(out) == before
    assert _train(out, "--epochs", 2, "--seeds", "0,1", "--resume", "--lr", 0.05) == 0
    for run in ("seed-0", "seed-1"):
        s = json.loads((out / run / "summary.json").read_text())
        assert s["config"]["lr"] == 0.01 and s["config"]["epochs"] == 1  # the original
        changes = {c["option"]: (c["epoch"], c["from"], c["to"]) for c in s["changes"]}
        assert changes == {"lr": (2, 0.01, 0.05), "epochs": (2, 1, 2)}
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["lr"] for r in rows] == [0.01, 0.05] and "changes" in rows[1]


def test_resumed_sweep_on_changed_data_is_refused_then_accepted_and_recorded(tmp_path, capsys):
    data = iris_csv(tmp_path / "iris.csv")
    out = tmp_path / "sw"
    assert _train(out, "--epochs", 1, "--seeds", "0,1", "--data", data) == 0
    iris_csv(data, rows=140)  # ten rows fewer
    before = _files(out)
    assert _train(out, "--epochs", 2, "--seeds", "0,1", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the data changed since this run was trained" in err
    assert "--accept-changed-data" in err and _files(out) == before
    assert _train(out, "--epochs", 2, "--seeds", "0,1", "--resume", "--accept-changed-data") == 0
    for run in ("seed-0", "seed-1"):
        s = summary(out / run)
        (change,) = [c for c in s["changes"] if c["option"] == "data"]
        assert change["epoch"] == 2 and change["to"]["size"] == data.stat().st_size
        assert s["data"]["size"] > data.stat().st_size  # the original record is kept
        rows = (out / run / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 2 and "changes" in json.loads(rows[1])  # epoch 2 ran, on the new data


def test_export_on_a_sweeps_directory_names_its_runs_and_writes_nothing(tiny_sweep, capsys):
    before = _files(tiny_sweep)
    assert cli.main(["export", str(tiny_sweep)]) == 2
    err = capsys.readouterr().err
    assert (
        f"a sweep's directory, not one run's; name one of its runs: {tiny_sweep / 'seed-0'}" in err
    )
    assert _files(tiny_sweep) == before and not (tiny_sweep / "export").exists()
    assert ckpt.list_checkpoints(tiny_sweep / "seed-0" / "checkpoints")


def _exhausting_program(monkeypatch) -> None:
    """Make the sweep's training chunk raise XLA's allocation failure."""
    real = stack.build_program

    def build(*args, **kwargs):
        def chunk(*a):
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.\n"
                + "detail\n" * 40
            )

        return real(*args, **kwargs)._replace(chunk=chunk)

    monkeypatch.setattr(stack, "build_program", build)


def test_out_of_memory_in_a_sweep_ends_in_one_line_and_keeps_each_runs_checkpoint(
    tiny_sweep, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "sw"
    shutil.copytree(tiny_sweep, out)
    before = _files(out)
    _exhausting_program(monkeypatch)
    assert _train(out, "--epochs", 2, "--seeds", "0,1", "--resume") == 5
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fbp: error: out of memory during the sweep")
    assert "RESOURCE_EXHAUSTED" in err and "fewer --seeds" in err and "than 16" in err
    assert 'memory="linear"' in err and "each run's last checkpoint is kept" in err
    for run in ("seed-0", "seed-1"):
        cps = ckpt.list_checkpoints(out / run / "checkpoints")
        assert [str(p.relative_to(out)) for p in cps] == [
            str(p.relative_to(tiny_sweep))
            for p in ckpt.list_checkpoints(tiny_sweep / run / "checkpoints")
        ]
        ckpt.read_arrays(cps[-1])  # verifies
    assert {k: v for k, v in _files(out).items() if "checkpoints" in k} == {
        k: v for k, v in before.items() if "checkpoints" in k
    }


def test_a_sweep_off_a_terminal_prints_periodic_step_lines_with_eta(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fbp_sweep, "Printer", functools.partial(progress.Printer, line_every_s=0))
    assert _train(tmp_path / "sw", "--epochs", 1, "--seeds", "0,1", "--chunk-steps", 2) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line]
    assert [line.split("/1  ")[1].split("  ")[0] for line in lines] == ["step 2/6", "step 4/6"]
    assert all(line.startswith("epoch      1/1") and "elapsed  ETA" in line for line in lines)
