"""Misuse that must neither lose results nor go wrong silently (the runner's guarantees).

Each test reproduces one row of README's "Runner: what is guaranteed" table.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fbp import checkpoint as ckpt
from fbp import cli, runner

EXPERIMENTS = str(Path(__file__).parent / "experiments")


@pytest.fixture(autouse=True)
def _experiments(monkeypatch):
    monkeypatch.setenv("FBP_EXPERIMENTS", EXPERIMENTS)
    monkeypatch.delenv("TINY_POISON", raising=False)


def _train(out, *args, name="tiny"):
    return cli.main(["train", name, "--out", str(out), *map(str, args)])


def _env():
    return {**os.environ, "FBP_EXPERIMENTS": EXPERIMENTS, "JAX_PLATFORMS": "cpu"}


def _start(out, *args):
    cmd = [sys.executable, "-m", "fbp.cli", "train", "tiny", "--out", str(out), *map(str, args)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_checkpoint(proc, out, timeout=120.0):
    t0 = time.monotonic()
    while not ckpt.list_checkpoints(Path(out) / "checkpoints"):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() - t0 < timeout, "no checkpoint in time"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- 1. one process per run directory


def test_a_second_process_on_a_run_directory_is_refused_and_a_killed_ones_lock_is_not(
    tmp_path, capsys
):
    out = tmp_path / "run"
    proc = _start(out, "--epochs", 100000, "--chunk-steps", 2, "--checkpoint-every", 1)
    try:
        _wait_for_checkpoint(proc, out)
        for extra in ((), ("--resume",), ("--overwrite",)):
            t0 = time.monotonic()
            assert _train(out, "--epochs", 1, *extra) == 2
            err = capsys.readouterr().err
            assert time.monotonic() - t0 < 10
            assert f"{out} is in use by process {proc.pid}" in err and err.count("\n") == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert (out / runner.LOCK).exists()  # left behind by the killed process ...
    assert _train(out, "--epochs", 1, "--overwrite") == 0  # ... and it does not block
    assert not (out / runner.LOCK).exists()


def test_default_out_names_made_in_the_same_second_differ(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20250101-000000")
    for _ in range(2):
        assert cli.main(["train", "tiny", "--epochs", "1"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["tiny-20250101-000000", "tiny-20250101-000000-2"]
    assert all((tmp_path / "runs" / r / "summary.json").exists() for r in runs)
