"""Faults in real processes: SIGTERM/SIGINT at random moments, kill -9, exact resume.

Each trial starts ``fbp train`` in a subprocess, waits for a seeded random epoch,
sleeps a seeded random fraction of an epoch, sends the signal, then resumes to the end and checks
the final ``params_sha256`` against an uninterrupted run (bitwise, CPU). The default
run does one trial per signal; ``-m slow`` runs more.

A kill chain SIGKILLs the same run again and again, each time at a seeded random
moment or the moment a checkpoint write has begun (its temporary directory
exists), resuming in between; after every kill each committed checkpoint must
verify, and the run resumed to the end must match the uninterrupted one bitwise.
Each chain prints its tally (kills, kills inside a checkpoint write, checkpoints
verified, corrupt); README's "Runner: what is guaranteed" quotes them.
"""

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import EXPERIMENTS

from fbp import checkpoint as ckpt
from fbp.run import metrics

ARGS = ["--epochs", "40", "--chunk-steps", "2", "--checkpoint-every", "1", "--keep", "2"]


def _env():
    env = {**os.environ, "FBP_EXPERIMENTS": EXPERIMENTS, "JAX_PLATFORMS": "cpu"}
    env.pop("TINY_POISON", None)
    return env


def _fbp(out, *extra):
    return [sys.executable, "-m", "fbp.run.cli", "train", "tiny", "--out", str(out), *ARGS, *extra]


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
    _wait_for_epoch(proc, out, rng.randint(1, 20))  # a random epoch of 40 ...
    time.sleep(rng.uniform(0.0, 0.02))  # ... and a random moment within it
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    rc = proc.returncode
    # every committed checkpoint verifies (a kill never leaves a half-written one)
    ckpts = ckpt.list_checkpoints(out / "checkpoints")
    assert ckpts, "no checkpoint committed"
    for p in ckpts:
        ckpt.read_arrays(p)
    metrics.read_metrics(out / "metrics.jsonl")  # a torn last line is tolerated
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


@pytest.mark.slow  # a long trial: -m slow
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


# ----------------------------------------------------------------------------- kill chains


def _epochs_logged(out):
    metrics = Path(out) / "metrics.jsonl"
    return metrics.read_bytes().count(b"\n") if metrics.exists() else 0


def _wait_for_write(proc, out, timeout=60.0):
    """Until a checkpoint's temporary directory exists (a write has begun) or the run ends."""
    d = Path(out) / "checkpoints"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        with os.scandir(d) as entries:
            if any(e.name.startswith(".tmp-") for e in entries):
                return


def _kill_chain(tmp_path, seed, kills):
    """SIGKILL one run ``kills`` times, resuming in between; (tally, final sha)."""
    out = tmp_path / f"chain-{seed}"
    rng = random.Random(seed)
    tally = collections.Counter()
    for i in range(kills):
        start = _epochs_logged(out)
        proc = subprocess.Popen(
            _fbp(out, *(["--resume"] if i else [])),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _wait_for_epoch(proc, out, start + rng.randint(1, 3))
        if rng.random() < 0.5:
            _wait_for_write(proc, out)
        else:
            time.sleep(rng.uniform(0.0, 0.02))
        proc.kill()
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:  # it had finished: nothing was killed
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()
        tally["kills"] += 1
        ckpt_dir = out / "checkpoints"
        tally["inside a write"] += any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir())
        for p in ckpt.list_checkpoints(ckpt_dir):
            try:
                ckpt.read_arrays(p)
                tally["verified"] += 1
            except ckpt.CheckpointError:
                tally["corrupt"] += 1
        metrics.read_metrics(out / "metrics.jsonl")  # a torn last line is tolerated
    resumed = subprocess.run(
        _fbp(out, "--resume"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    print(f"kill chain {seed}: {dict(tally)}")
    return tally, _sha(out)


@pytest.mark.slow  # a long trial: -m slow
def test_sigkill_chain_never_corrupts_and_resumes_bitwise(tmp_path, reference):
    tally, sha = _kill_chain(tmp_path, seed=7, kills=2)
    assert tally["kills"] >= 1 and tally["corrupt"] == 0
    assert sha == reference


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_many_sigkill_chains(tmp_path, reference, seed):
    tally, sha = _kill_chain(tmp_path, seed=1000 + seed, kills=8)
    assert tally["kills"] >= 1 and tally["corrupt"] == 0
    assert sha == reference


# ----------------------------------------------------------------------------- data and changes


def _csv(path):
    """iris as a CSV file (4 features, label last)."""
    from sklearn.datasets import load_iris

    b = load_iris()
    rows = [
        ",".join(f"{v:.1f}" for v in x) + f",{int(y)}"
        for x, y in zip(b.data, b.target, strict=True)
    ]
    path.write_text("a,b,c,d,label\n" + "\n".join(rows) + "\n")
    return path


def _killed(out, *extra, at_least):
    """Start ``fbp train`` with ``extra``, SIGKILL it once ``at_least`` epochs are logged."""
    proc = subprocess.Popen(
        _fbp(out, *extra), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _wait_for_epoch(proc, out, at_least)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    for p in ckpt.list_checkpoints(out / "checkpoints"):
        ckpt.read_arrays(p)  # every committed checkpoint verifies


@pytest.mark.slow  # three processes of 40 epochs: about 100 s on 2 cores
@pytest.mark.parametrize("seed", [3, 4])
def test_sigkill_around_a_resume_change_records_it_once_with_the_data(tmp_path, seed):
    """A run on a --data file, killed, resumed with a new --lr, killed again, resumed:
    the data's fingerprint holds throughout and the change is recorded exactly once."""
    rng = random.Random(seed)
    data, out = _csv(tmp_path / "iris.csv"), tmp_path / "run"
    _killed(out, "--data", data, at_least=rng.randint(2, 5))
    changed = ("--resume", "--lr", "0.02")  # --data is not given again: the recorded path
    _killed(out, *changed, at_least=_epochs_logged(out) + rng.randint(1, 3))
    done = subprocess.run(_fbp(out, *changed), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["path"] == str(data) and s["config"]["lr"] == 0.01
    (lr,) = [c for c in s["changes"] if c["option"] == "lr"]
    rows = metrics.read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, 41))
    assert all(r["lr"] == (0.02 if r["epoch"] >= lr["epoch"] else 0.01) for r in rows)
    assert [r["epoch"] for r in rows if "changes" in r] == [lr["epoch"]]
