"""Starting test scenarios in fresh processes (fake CPU devices, several processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def env(devices: int | None, **extra: str) -> dict[str, str]:
    """The test's environment without cluster variables, on ``devices`` CPU devices.

    This checkout's ``fbp`` comes first on PYTHONPATH; ``devices=None`` leaves the
    device count unset (one, unless ``--devices`` splits the CPU).
    """
    out = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith(CLUSTER)
    }
    out["JAX_PLATFORMS"] = "cpu"
    out.pop("XLA_FLAGS", None)
    out.pop("JAX_ENABLE_X64", None)
    if devices is not None:
        out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    return {**out, **extra}


def start(argv: list[str], devices: int | None, cwd: str | Path | None = None, **extra: str):
    """``python ARGV...`` in a fresh process; stdout and stderr captured as text."""
    return subprocess.Popen(
        [sys.executable, *argv],
        env=env(devices, **extra),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """(status, stdout, stderr), killing the process after ``timeout`` s (a test failure)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args[1:]} still running after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def result(out: str) -> dict | None:
    """The JSON a worker printed last on a ``RESULT `` line."""
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fbp_lines(text: str) -> list[str]:
    """Lines of a process's output without the gloo library's own connection notes."""
    return [line for line in text.splitlines() if line and not line.startswith("[Gloo]")]
