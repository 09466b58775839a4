"""Faults in real processes: SIGTERM/SIGINT at random moments, kill -9, exact resume.

Each trial starts ``fbp train`` in a subprocess, waits for a seeded random epoch,
sleeps a seeded random fraction of an epoch, sends the signal, then resumes to the end and checks
the final ``params_sha256`` against an uninterrupted run (bitwise, CPU). The default
run does one trial per signal; ``-m slow`` runs more.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fbp import checkpoint as ckpt
from fbp import runner

EXPERIMENTS = str(Path(__file__).parent / "experiments")
ARGS = ["--epochs", "120", "--chunk-steps", "2", "--checkpoint-every", "1", "--keep", "2"]


def _env():
    env = {**os.environ, "FBP_EXPERIMENTS": EXPERIMENTS, "JAX_PLATFORMS": "cpu"}
    env.pop("TINY_POISON", None)
    return env


def _fbp(out, *extra):
    return [sys.executable, "-m", "fbp.cli", "train", "tiny", "--out", str(out), *ARGS, *extra]


def _sha(out):
    return json.loads((Path(out) / "summary.json").read_text())["params_sha256"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "ref"
    subprocess.run(_fbp(out), env=_env(), check=True, capture_output=True, timeout=600)
    return _sha(out)


def _wait_for_epoch(proc, out, epoch, timeout=300.0):
    """Until ``epoch`` epochs are logged and a checkpoint is committed (handlers installed)."""
    metrics = Path(out) / "metrics.jsonl"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (
            metrics.exists()
            and metrics.read_bytes().count(b"\n") >= epoch
            and ckpt.list_checkpoints(Path(out) / "checkpoints")
        ):
            return
        if proc.poll() is not None:
            raise AssertionError(f"fbp exited early with {proc.returncode}")
        time.sleep(0.005)
    raise AssertionError(f"training did not reach epoch {epoch}")


def _trial(tmp_path, sig, seed):
    """Interrupt one run at a seeded random moment; return (exit code, resumed sha)."""
    out = tmp_path / f"{signal.Signals(sig).name}-{seed}"
    proc = subprocess.Popen(
        _fbp(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    rng = random.Random(seed)
    _wait_for_epoch(proc, out, rng.randint(1, 60))  # a random epoch of 120 ...
    time.sleep(rng.uniform(0.0, 0.02))  # ... and a random moment within it
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    rc = proc.returncode
    # every committed checkpoint verifies (a kill never leaves a half-written one)
    ckpts = ckpt.list_checkpoints(out / "checkpoints")
    assert ckpts, "no checkpoint committed"
    for p in ckpts:
        ckpt.read_arrays(p)
    runner.read_metrics(out / "metrics.jsonl")  # a torn last line is tolerated
    resumed = subprocess.run(
        _fbp(out, "--resume"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    return rc, err.decode(), _sha(out)


def _check(rc, err, sha, sig, reference):
    expected = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGKILL: -signal.SIGKILL}[sig]
    assert rc in (expected, 0), err  # 0 only if the run had already finished
    if rc == expected and sig != signal.SIGKILL:
        assert f"stopped by {signal.Signals(sig).name}" in err
    assert sha == reference


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"]
)
def test_signal_then_resume_is_bitwise(tmp_path, reference, sig):
    rc, err, sha = _trial(tmp_path, sig, seed=int(sig))
    _check(rc, err, sha, sig, reference)
    assert rc != 0, "the signal arrived after training ended; the trial tested nothing"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_many_random_interruptions(tmp_path, reference, sig, seed):
    rc, err, sha = _trial(tmp_path, sig, seed=100 + seed)
    _check(rc, err, sha, sig, reference)
