"""Misuse that must neither lose results nor go wrong silently (the runner's guarantees).

Each test reproduces one row of README's "Runner: what is guaranteed" table.
"""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import EXPERIMENTS, use_test_experiments
from cli_runs import train as _train

from fbp import checkpoint as ckpt
from fbp.run import cli, experiment, rundir, runner


@pytest.fixture(autouse=True)
def _experiments(monkeypatch):
    use_test_experiments(monkeypatch)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """One finished 2-epoch run of tiny (two checkpoints), copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("two") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FBP_EXPERIMENTS", EXPERIMENTS)
        assert _train(out, "--epochs", 2) == 0
    return out


def _copy(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "run"))


def _env():
    return {**os.environ, "FBP_EXPERIMENTS": EXPERIMENTS, "JAX_PLATFORMS": "cpu"}


# ----------------------------------------------------------------------------- 1. one process per run directory


# Another process holding DIR as fbp.run.metrics.RunLock does (flock on the directory, its
# id in DIR/.lock), without importing JAX so that it starts at once.
HOLD = """
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
open(os.path.join(sys.argv[1], ".lock"), "w").write(f"{os.getpid()}\\n")
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_process_on_a_run_directory_is_refused_and_a_killed_ones_lock_is_not(
    tmp_path, capsys
):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout.readline() == b"locked\n", holder.stderr.read().decode()
        for extra in ((), ("--resume",), ("--overwrite",)):
            t0 = time.monotonic()
            assert _train(out, "--epochs", 1, *extra) == 2
            err = capsys.readouterr().err
            assert time.monotonic() - t0 < 10
            assert f"{out} is in use by process {holder.pid}" in err and err.count("\n") == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    assert (out / rundir.LOCK).exists()  # left behind by the killed process ...
    assert _train(out, "--epochs", 1) == 0  # ... and it does not block
    assert not (out / rundir.LOCK).exists()


def test_fbp_train_holds_its_run_directory_while_it_trains(tmp_path, monkeypatch):
    out, seen = tmp_path / "run", []
    real = runner.make_train_chunk

    def chunk_that_tries_the_lock(*args, **kwargs):
        fn = real(*args, **kwargs)

        def chunk(*a):
            if not seen:
                with pytest.raises(rundir.RunDirInUse, match=f"in use by process {os.getpid()}"):
                    runner.RunLock(out)
                seen.append(True)
            return fn(*a)

        return chunk

    monkeypatch.setattr(runner, "make_train_chunk", chunk_that_tries_the_lock)
    assert _train(out, "--epochs", 1) == 0 and seen == [True]


def test_a_filesystem_without_locks_trains_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    from fbp.run import rundir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    assert _train(tmp_path / "run", "--epochs", 1) == 0
    assert "cannot be locked (No locks available)" in capsys.readouterr().out


def test_default_out_names_made_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20250101-000000")
    made = [cli._new_run_dir("tiny") for _ in range(3)]
    assert [p.name for p in made] == [
        "tiny-20250101-000000",
        "tiny-20250101-000000-2",
        "tiny-20250101-000000-3",
    ]
    assert all(p.is_dir() for p in made)


def test_a_default_run_directory_that_failed_is_not_left_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "tiny", "--patience", "0"]) == 2
    assert "patience must be >= 1" in capsys.readouterr().err
    assert list((tmp_path / "runs").iterdir()) == []


# ----------------------------------------------------------------------------- 3. --resume with nothing to resume from


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}


def _damage(path, how):
    if how == "manifest":
        (path / ckpt.MANIFEST).write_text("{not json")
    elif how == "arrays":
        blob = bytearray((path / ckpt.TENSORS).read_bytes())
        blob[-1] ^= 0xFF
        (path / ckpt.TENSORS).write_bytes(bytes(blob))
    else:
        (path / ckpt.TENSORS).write_bytes(pickle.dumps({"w": [1.0]}))


@pytest.mark.parametrize("how", ["manifest", "arrays", "pickle"])
def test_resume_with_no_usable_checkpoint_exits_2_one_line_each_and_changes_nothing(
    two_epochs, tmp_path, capsys, how
):
    out = _copy(two_epochs, tmp_path)
    ckpts = ckpt.list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 2
    for p in ckpts:
        _damage(p, how)
    before = _files(out)
    capsys.readouterr()
    assert _train(out, "--epochs", 4, "--resume") == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0].startswith("fbp: error: ") and "no usable checkpoint" in lines[0], lines
    reason = {"manifest": "unreadable manifest.json", "arrays": "fails its SHA-256 check",
              "pickle": "looks like a Python pickle"}[how]  # fmt: skip
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["ckpt-000002", "ckpt-000001"]
    assert all(reason in line for line in lines[1:]), lines
    assert "starting from scratch" not in captured.out
    assert _files(out) == before


def test_resume_without_any_checkpoint_exits_2_instead_of_starting_over(tmp_path, capsys):
    assert _train(tmp_path / "none", "--resume") == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- 5. disk full


def _full_disk(monkeypatch, victim):
    """Make writing ``victim`` (a file name) fail with ENOSPC after writing part of it."""
    real = ckpt._write_synced

    def write(path, data):
        if Path(path).name == victim or Path(path).name.startswith(f".{victim}.tmp"):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_synced", write)


@pytest.mark.parametrize("victim", [ckpt.TENSORS, ckpt.MANIFEST, "summary.json", "metrics"])
def test_disk_full_exits_4_in_one_line_leaving_no_temporaries_and_the_last_checkpoint(
    two_epochs, tmp_path, monkeypatch, capsys, victim
):
    out = _copy(two_epochs, tmp_path)
    good = ckpt.list_checkpoints(out / "checkpoints")
    if victim == "metrics":

        def full(self, row):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

        monkeypatch.setattr(runner.MetricsLog, "write", full)
    else:
        _full_disk(monkeypatch, victim)
    capsys.readouterr()
    assert _train(out, "--epochs", 3, "--resume", "--checkpoint-every", 1) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err, err
    assert not [p for p in out.rglob(".*")], "temporaries left behind"
    kept = ckpt.list_checkpoints(out / "checkpoints")
    assert kept[: len(good)] == good and all(ckpt.read_arrays(p) for p in kept)
    assert f"last checkpoint {kept[-1].name} is intact" in err
    if victim == ckpt.TENSORS:  # once space is back, the run continues
        monkeypatch.undo()
        monkeypatch.setenv("FBP_EXPERIMENTS", EXPERIMENTS)
        assert _train(out, "--epochs", 3, "--resume") == 0


# ----------------------------------------------------------------------------- 8. failing before the first epoch


def test_a_run_that_fails_before_its_first_epoch_leaves_nothing_in_the_way(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        def chunk(*a):
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while allocating")

        return chunk

    monkeypatch.setattr(runner, "make_train_chunk", out_of_memory)
    exp = experiment.get("tiny")
    made, given = tmp_path / "made", tmp_path / "given"
    given.mkdir()
    for out in (made, given):
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
            runner.run(exp, out=out, print_fn=lambda s: None)
    assert not made.exists() and list(given.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("FBP_EXPERIMENTS", EXPERIMENTS)
    assert _train(given, "--epochs", 1) == 0


# ----------------------------------------------------------------------------- 6. broken experiment files

BROKEN = {
    "syntax_error.py": ("x = (1,\n", r"syntax_error\.py:1: SyntaxError: '\(' was never closed"),
    "import_error.py": (
        "import fbp\nimport no_such_module_here\n",
        r"import_error\.py:2: ModuleNotFoundError: No module named 'no_such_module_here'",
    ),
    "no_spec.py": ("X = 1\n", r"no_spec\.py: defines no EXPERIMENT = "),
}


@pytest.mark.parametrize("name", [*BROKEN, "missing.py"])
def test_a_broken_experiment_file_is_one_line_naming_it_and_exit_2(tmp_path, capsys, name):
    path = tmp_path / name
    if name in BROKEN:
        path.write_text(BROKEN[name][0])
    match = BROKEN[name][1] if name in BROKEN else r"missing\.py: no such experiment file"
    assert cli.main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fbp: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert not (tmp_path / "run").exists()


def test_list_skips_broken_files_with_a_warning(tmp_path, monkeypatch, capsys):
    for name, (text, _) in BROKEN.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setenv("FBP_EXPERIMENTS", os.pathsep.join([str(tmp_path), EXPERIMENTS]))
    assert cli.main(["list"]) == 0
    out, err = capsys.readouterr()
    assert "tiny " in out and "syntax" not in out
    assert err.count("fbp: warning: skipping ") == 3 and "ModuleNotFoundError" in err, err


def test_list_into_a_pipe_closed_early_is_quiet():
    proc = subprocess.Popen(
        [sys.executable, "-m", "fbp.run.cli", "list"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, err
    assert "BrokenPipeError" not in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------- 7. device count


@pytest.mark.slow  # a subprocess on two CPU devices; test_options checks the rule by default
def test_a_run_saved_on_two_devices_resumes_with_plain_resume_on_one(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fbp.run.cli", "train", "tiny", "--out", str(out)]
    done = subprocess.run([*cmd, "--devices", "2", "--epochs", "1"], env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["config"]["devices"] == 2
    assert _train(out, "--resume", "--epochs", 2) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["config"]["devices"] is None


# ----------------------------------------------------------------------------- 9. messages


def test_resuming_a_run_of_another_experiment_says_so_first_then_a_few_paths(
    two_epochs, tmp_path, capsys
):
    out = _copy(two_epochs, tmp_path)
    before = _files(out)
    capsys.readouterr()
    assert _train(out, "--resume", "--epochs", 2, name="tiny-poison") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        f"fbp: error: run: {out} holds a run of experiment 'tiny', not 'tiny-poison'"
    )
    assert "does not fit this model (" in err and "mismatches" in err
    assert err.count(": checkpoint has") + err.count("in the checkpoint but not") <= 4
    assert _files(out) == before


def test_evaluating_a_batchnorm_model_without_its_state_names_the_keyword():
    import jax.numpy as jnp

    from fbp import losses, nn, train

    model = nn.Sequential([nn.Dense(4), nn.BatchNorm(), nn.Dense(3)])
    x, y = jnp.ones((8, 5)), jnp.zeros((8,), jnp.int32)
    params = model.init(__import__("jax").random.key(0), x)
    with pytest.raises(ValueError, match=r"evaluate: .*running statistics.*pass state="):
        train.evaluate(model, losses.softmax_cross_entropy, params, x, y)
    state = model.init_state(x)
    assert "loss" in train.evaluate(model, losses.softmax_cross_entropy, params, x, y, state=state)


# ----------------------------------------------------------------------------- 10. consistency


def test_report_and_eval_name_the_parameters_and_agree_by_default(two_epochs, tmp_path, capsys):
    """The early-stopping case (best parameters) is in test_cli's early-stopping test."""
    out = _copy(two_epochs, tmp_path)
    assert _train(out, "--resume", "--epochs", 3) == 0
    assert "(last parameters, epoch 3)" in capsys.readouterr().out
    assert cli.main(["eval", str(out)]) == 0
    assert "(last parameters of ckpt-000003)" in capsys.readouterr().out
    ev = json.loads((out / "eval.json").read_text())
    assert ev["test"] == pytest.approx(json.loads((out / "summary.json").read_text())["test"])


def test_resume_with_fewer_epochs_than_done_exits_2(two_epochs, tmp_path, capsys):
    out = _copy(two_epochs, tmp_path)
    before = _files(out)
    assert _train(out, "--epochs", 1, "--resume") == 2
    assert "--epochs 1 is below the 2 epochs this run has done" in capsys.readouterr().err
    assert _files(out) == before


def test_the_header_names_the_data_file_used(tmp_path, capsys):
    rows = [f"{i % 7 * 0.1},{i % 5 * 0.2},{i % 3 * 0.3},{i % 2 * 0.4},{i % 3}" for i in range(60)]
    f = tmp_path / "mine.csv"
    f.write_text("a,b,c,d,y\n" + "\n".join(rows) + "\n")
    assert _train(tmp_path / "run", "--epochs", 1, "--data", f) == 0
    out = capsys.readouterr().out
    assert re.search(rf"data {re.escape(str(f))}: \d+ train / \d+ validation / \d+ test", out)


def test_progress_bar_shows_the_step_elapsed_time_and_eta(monkeypatch, capsys):
    from fbp.run import progress

    clock = iter([100.0, 110.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    printer = progress.Printer(print, total=4, log_every=1, steps_per_epoch=6)
    printer.step(epoch=0, pos=2)  # 2 of 24 steps in 10 s: 22 left, 110 s
    out = capsys.readouterr().out
    assert "1/4" in out and "step 2/6" in out and "0:10 elapsed" in out and "ETA 1:50" in out
