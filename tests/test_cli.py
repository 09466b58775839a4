"""The `fbp` command and the runner, in process: outputs, refusals, resume, training features."""

import dataclasses
import json
import math
import os
import pickle
import re
import signal
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from cli_runs import EXPERIMENTS, use_test_experiments
from cli_runs import summary as _summary
from cli_runs import train as _train

from fbp import checkpoint as ckpt
from fbp.run import cli, export, metrics, progress, runner


@pytest.fixture(autouse=True)
def _experiments(monkeypatch):
    use_test_experiments(monkeypatch)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One uninterrupted 3-epoch run of tiny (default chunking), shared by several tests."""
    out = tmp_path_factory.mktemp("ref") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FBP_EXPERIMENTS", EXPERIMENTS)
        assert _train(out, "--epochs", 3) == 0
    return out


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "--help"], ["eval", "--help"], ["export", "--help"], ["list", "--help"]],
)
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    assert "usage: fbp" in capsys.readouterr().out


def test_list_shows_descriptions(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "tiny " in out and "test-only 4-8-3 MLP on iris" in out
    assert "digits-mlp" in out and "xor" in out


def test_train_writes_metrics_summary_plots_and_checkpoints(ref):
    out = ref
    rows = metrics.read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["step"] for r in rows] == [6, 12, 18]
    for key in ("loss", "val_loss", "val_accuracy", "lr", "grad_norm", "seconds", "skipped"):
        assert all(r[key] is not None for r in rows), key
    s = _summary(out)
    assert s["config"]["seed"] == 0 and s["epochs_completed"] == 3 and s["steps"] == 18
    assert {"loss", "accuracy"} <= set(s["test"]) and s["versions"]["jax"]
    last = export.load_run(out, which="last")
    assert s["params_sha256"] == metrics.params_sha256(last["params"])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "metric.png").stat().st_size > 1000
    assert len(ckpt.list_checkpoints(out / "checkpoints")) == 3
    assert not [p for p in out.rglob(".*")]  # no temporaries left


def test_progress_lines_when_not_a_terminal(tmp_path, capsys):
    assert _train(tmp_path / "r", "--epochs", 1, "--chunk-steps", 4) == 0
    text = capsys.readouterr().out
    assert "epoch      1/1  loss" in text and "== tiny" in text and "test accuracy" in text
    assert "\r" not in text


def test_existing_dir_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _train(out, "--epochs", 1) == 2
    assert "already exists and is not empty; pass --resume" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert _train(out, "--epochs", 1, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "summary.json").exists()


@pytest.mark.parametrize(
    "text, match",
    [
        ("a,b,c,d,y\n" + "1,2,3,nan,0\n" * 3, r"line 2, column 4"),
        ("a,b,c,y\n" + "1,2,3,0\n1,2,3,1\n" * 10, "expects 4 features"),
        ("a,b,c,d,y\n" + "1,2,3,4,0\n1,2,3,4,7\n" * 10, r"label 7 at line 3 is not one of 0"),
        ("a,b,c,d,y\n1,2,3,x,0\n", "'x' is not a number"),
    ],
)
def test_bad_data_exits_2_and_writes_nothing(tmp_path, capsys, text, match):
    f = tmp_path / "d.csv"
    f.write_text(text)
    out = tmp_path / "run"
    assert _train(out, "--data", f) == 2
    err = capsys.readouterr().err
    assert err.startswith("fbp: error: ") and err.count("\n") == 1
    assert re.search(match, err), err
    assert not out.exists()


def test_bad_option_exits_2(tmp_path, capsys):
    assert _train(tmp_path / "r", "--patience", 0) == 2
    assert "patience must be >= 1" in capsys.readouterr().err
    assert cli.main(["train", "no-such-experiment", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_resume_continues_to_total_epochs_bitwise(ref, tmp_path, capsys):
    part = tmp_path / "part"
    assert _train(part, "--epochs", 1) == 0
    assert _train(part, "--epochs", 3, "--resume") == 0
    assert "resuming from ckpt-000001: epoch 1, step 6" in capsys.readouterr().out
    assert _summary(part)["params_sha256"] == _summary(ref)["params_sha256"]
    extended = {"epoch": 2, "step": 6, "option": "epochs", "from": 1, "to": 3}
    assert _summary(part)["changes"] == [extended]  # recorded, the original config kept
    assert _summary(part)["config"]["epochs"] == 1
    strip = [
        {k: v for k, v in r.items() if k not in ("seconds", "changes")}
        for r in metrics.read_metrics(part / "metrics.jsonl")
    ]
    assert metrics.read_metrics(part / "metrics.jsonl")[1]["changes"] == [extended]
    assert strip == [
        {k: v for k, v in r.items() if k != "seconds"}
        for r in metrics.read_metrics(ref / "metrics.jsonl")
    ]


def test_sigterm_mid_epoch_saves_and_resume_is_bitwise(ref, tmp_path, monkeypatch, capsys):
    """Also shows that the chunk size (2 here, 6 = one epoch for ref) leaves results bitwise."""
    cut = tmp_path / "cut"
    real = runner.make_train_chunk
    calls = []

    def chunk_that_gets_sigterm(*a, **k):
        fn = real(*a, **k)

        def wrapped(*args):
            calls.append(1)
            if len(calls) == 5:  # epoch 2, during its second chunk
                os.kill(os.getpid(), signal.SIGTERM)
            return fn(*args)

        return wrapped

    monkeypatch.setattr(runner, "make_train_chunk", chunk_that_gets_sigterm)
    assert _train(cut, "--epochs", 3, "--chunk-steps", 2) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    newest = ckpt.list_checkpoints(cut / "checkpoints")[-1]
    prog = ckpt.read_manifest(newest)["meta"]["progress"]
    assert (prog["epoch"], prog["pos"]) == (1, 4)
    assert [r["epoch"] for r in metrics.read_metrics(cut / "metrics.jsonl")] == [1]
    monkeypatch.setattr(runner, "make_train_chunk", real)
    assert _train(cut, "--resume") == 0
    assert _summary(cut)["params_sha256"] == _summary(ref)["params_sha256"]


def test_early_stopping_restores_best_params(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--epochs", 200, "--lr", 0.3, "--patience", 2) == 0
    s = _summary(out)
    assert s["stopped_early"] and s["restored_best"]
    restored = f"(best parameters, epoch {s['best_epoch']}: early stopping restored them)"
    assert restored in capsys.readouterr().out
    assert cli.main(["eval", str(out)]) == 0  # fbp eval evaluates what the report did
    assert "(best parameters of ckpt-" in capsys.readouterr().out
    assert json.loads((out / "eval.json").read_text())["test"] == pytest.approx(s["test"])
    assert s["epochs_completed"] == s["best_epoch"] + 2 < 200
    rows = metrics.read_metrics(out / "metrics.jsonl")
    assert min(r["val_loss"] for r in rows) == pytest.approx(s["best_val_loss"])
    best = export.load_run(out, which="best")
    assert metrics.params_sha256(best["params"]) == s["params_sha256"]
    assert metrics.params_sha256(export.load_run(out, which="last")["params"]) != s["params_sha256"]
    # stopped after 2 epochs and resumed: the same best epoch, the same final parameters
    part = tmp_path / "part"
    assert _train(part, "--epochs", 2, "--lr", 0.3, "--patience", 2) == 0
    assert _train(part, "--epochs", 200, "--resume") == 0
    assert _summary(part)["params_sha256"] == s["params_sha256"]
    assert _summary(part)["best_epoch"] == s["best_epoch"]


def test_schedules_show_in_the_lr_column(tmp_path):
    assert _train(tmp_path / "c", "--epochs", 3, "--schedule", "cosine") == 0
    lrs = [r["lr"] for r in metrics.read_metrics(tmp_path / "c" / "metrics.jsonl")]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 0.01 and lrs[-1] == pytest.approx(0)
    plateau = ("--lr", 0.05, "--schedule", "plateau", "--plateau-patience", 1)
    plateau += ("--plateau-factor", 0.5)
    assert _train(tmp_path / "p", "--epochs", 25, *plateau, "--checkpoint-every", 25) == 0
    lrs = [r["lr"] for r in metrics.read_metrics(tmp_path / "p" / "metrics.jsonl")]
    assert lrs[0] == pytest.approx(0.05) and lrs == sorted(lrs, reverse=True)
    assert any(
        math.isclose(b, a * 0.5, rel_tol=1e-6) for a, b in zip(lrs[:-1], lrs[1:], strict=True)
    )
    # the plateau state lives in the optimizer state, so it is checkpointed: resume is exact
    assert _train(tmp_path / "q", "--epochs", 12, *plateau) == 0
    assert _train(tmp_path / "q", "--epochs", 25, "--resume") == 0
    assert _summary(tmp_path / "q")["params_sha256"] == _summary(tmp_path / "p")["params_sha256"]
    assert [r["lr"] for r in metrics.read_metrics(tmp_path / "q" / "metrics.jsonl")] == lrs


def test_clip_and_weight_decay_build_into_the_optimizer():
    from fbp.run.experiment import get

    exp = dataclasses.replace(
        get(os.path.join(EXPERIMENTS, "tiny.py")), optimizer=lambda lr, steps: optax.sgd(lr)
    )
    params = {"w": np.full(4, 2.0, np.float32)}
    opt, _ = runner.build_optimizer(exp, runner.resolve_config(exp, clip=1.0, lr=1.0), 10)
    upd, _ = opt.update({"w": np.full(4, 100.0, np.float32)}, opt.init(params), params)
    assert float(optax.tree.norm(upd)) == pytest.approx(1.0, rel=1e-5)
    cfg = runner.resolve_config(exp, weight_decay=0.1, lr=0.5)
    opt, _ = runner.build_optimizer(exp, cfg, 10)
    upd, _ = opt.update({"w": np.zeros(4, np.float32)}, opt.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.5 * 0.1 * 2.0, rtol=1e-6)


def test_nonfinite_skip_counts_and_keeps_params_finite(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINY_POISON", "1")
    out = tmp_path / "run"
    assert _train(out, name="tiny-poison") == 0
    assert "skipped 1 steps with a non-finite loss" in capsys.readouterr().out
    s = _summary(out)
    assert s["skipped_steps"] == 3 and s["steps"] == 9  # 4 batches an epoch, one poisoned
    assert [r["skipped"] for r in metrics.read_metrics(out / "metrics.jsonl")] == [1, 1, 1]
    params = export.load_run(out, which="last")["params"]
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(params))


def test_nonfinite_halt_names_the_step_and_keeps_last_good_checkpoint(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    assert _train(out, "--epochs", 2, name="tiny-poison") == 0
    good = ckpt.list_checkpoints(out / "checkpoints")
    monkeypatch.setenv("TINY_POISON", "1")
    assert _train(out, "--epochs", 3, "--resume", name="tiny-poison") == 2  # the data changed
    assert "the data changed since this run was trained" in capsys.readouterr().err
    poisoned = ("--resume", "--nonfinite", "halt", "--accept-changed-data")
    assert _train(out, "--epochs", 3, *poisoned, name="tiny-poison") == 3
    err = capsys.readouterr().err
    assert re.search(r"non-finite loss or gradient at step (9|1[0-2]) \(epoch 3", err)
    assert "last good checkpoint ckpt-000002 is kept" in err
    assert ckpt.list_checkpoints(out / "checkpoints") == good
    monkeypatch.delenv("TINY_POISON")
    assert export.load_run(out, which="last")["checkpoint"] == good[-1]


def test_eval_reports_test_metrics(ref, tmp_path, capsys):
    assert cli.main(["eval", str(ref), "--which", "last"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    ev = json.loads((ref / "eval.json").read_text())
    assert ev["test"] == pytest.approx(_summary(ref)["test"], rel=1e-6)
    assert ev["params_sha256"] == _summary(ref)["params_sha256"]
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_default_out_dir_and_readme_experiments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "xor", "--epochs", "30"]) == 0
    text = capsys.readouterr().out
    assert "solved:" in text and "predictions" in text
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("xor-") and (run / "summary.json").exists()
    assert cli.main(["train", "digits-mlp", "--epochs", "1", "--out", "d"]) == 0
    assert _summary(tmp_path / "d")["test"]["accuracy"] > 0.5


def test_metrics_reader_tolerates_a_truncated_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert metrics.read_metrics(p) == [{"epoch": 1}, {"epoch": 2}]
    p.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        metrics.read_metrics(p)


def test_resume_with_another_architecture_names_the_file_then_a_few_mismatches(
    ref, tmp_path, capsys
):
    wide = tmp_path / "tiny_wide.py"
    wide.write_text(Path(EXPERIMENTS, "tiny.py").read_text().replace("nn.Dense(8)", "nn.Dense(16)"))
    before = sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert cli.main(["train", str(wide), "--out", str(ref), "--resume", "--epochs", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"fbp: error: run: {ref} holds a run of experiment 'tiny' from ")
    assert "tiny.py; its checkpoint does not fit this model (" in err
    for path in (
        "state/params/0/w: checkpoint has (4, 8) float32, model has (4, 16) float32",
        "state/params/2/w",
        "state/params/0/b",
    ):
        assert path in err
    assert "state/opt_state/0/mu/0/b" not in err and re.search(r"; and \d+ more$", err.strip())
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == before


class _Evil:
    def __reduce__(self):
        return (open, (self.marker, "w"))

    def __init__(self, marker):
        self.marker = marker


def test_resume_refuses_a_planted_pickle_without_running_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--epochs", 1) == 0
    marker = tmp_path / "pwned"
    evil = out / "checkpoints" / "ckpt-000002"
    evil.mkdir()
    (evil / ckpt.MANIFEST).write_text(
        (out / "checkpoints" / "ckpt-000001" / ckpt.MANIFEST).read_text()
    )
    (evil / ckpt.TENSORS).write_bytes(pickle.dumps(_Evil(str(marker))))
    assert _train(out, "--epochs", 2, "--resume") == 2
    assert "looks like a Python pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_progress_bar_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    printer = progress.Printer(print, total=4, log_every=1)
    assert printer.tty
    for e in (1, 4):
        printer.epoch({"epoch": e, "loss": 0.5, "val_loss": 0.25, "lr": 0.1})
    printer.line("done")
    out = capsys.readouterr().out
    assert out.startswith("\r[") and f"[{'#' * 30}] 4/4  loss 0.5  val_loss 0.25" in out
    assert out.endswith("\ndone\n")
