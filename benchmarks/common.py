"""Shared timing helpers for the benchmark scripts in this folder.

Kept small and stable: other benchmark scripts import it. Method: warm up (compile),
then time many repeats, each ending in ``block_until_ready``; report medians. To
compare variants, run them in interleaved rounds (A B C A B C ...) in one process so
that drift on a shared machine hits all of them alike.

Examples:
  >>> import jax.numpy as jnp
  >>> from benchmarks import common
  >>> t = common.interleaved({"add": lambda: jnp.ones(4) + 1}, rounds=3, warmup=1)
  >>> sorted(t), len(t["add"])
  (['add'], 3)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"


def block(x: Any) -> Any:
    """Wait for every array in ``x`` (a pytree; non-JAX leaves pass through)."""
    return jax.block_until_ready(x)


def time_once(fn: Callable[[], Any], cpu: list[float] | None = None) -> float:
    """Seconds for one call of ``fn()``, waiting for its result.

    Args:
      cpu: if given, the process CPU seconds (all threads) of the call are appended.
    """
    c0 = time.process_time()
    t0 = time.perf_counter()
    block(fn())
    t = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return t


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    rounds: int = 30,
    warmup: int = 3,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Times of each zero-argument callable, run in interleaved rounds.

    Args:
      fns: name -> callable doing the work once (its result is waited for).
      rounds: timed calls of each callable.
      warmup: untimed calls of each callable first (compilation, caches).
      cpu: if given, filled with name -> process CPU seconds per call (all threads;
        steadier than wall time on a loaded machine, but counts spin-waiting).

    Returns:
      name -> list of ``rounds`` times in seconds.
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    if cpu is not None:
        cpu.update({name: [] for name in fns})
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_once(fn, None if cpu is None else cpu[name]))
    return times


def median(ts: Sequence[float]) -> float:
    return statistics.median(ts)


def spread(ts: Sequence[float]) -> str:
    """Interquartile range relative to the median, e.g. ``'±4%'``."""
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return f"±{50 * (q[2] - q[0]) / q[1]:.0f}%"


def matmul_rate(
    shapes: Sequence[tuple[int, int, int]],
    *,
    dtype: Any = jnp.float32,
    rounds: int = 30,
    warmup: int = 3,
) -> tuple[float, float]:
    """This machine's rate for a set of plain 2-D matmuls, all in one jitted call.

    Args:
      shapes: (m, k, n) for each product ``(m, k) @ (k, n)``.
      dtype: element type.

    Returns:
      (median seconds per call, GFLOP/s), counting 2·m·k·n FLOPs per product.
    """
    key = jax.random.key(0)
    pairs = []
    for m, k, n in shapes:
        key, ka, kb = jax.random.split(key, 3)
        pairs.append((jax.random.normal(ka, (m, k), dtype), jax.random.normal(kb, (k, n), dtype)))
    f = jax.jit(lambda ps: [jnp.dot(a, b) for a, b in ps])
    t = median(interleaved({"mm": lambda: f(pairs)}, rounds=rounds, warmup=warmup)["mm"])
    flops = sum(2 * m * k * n for m, k, n in shapes)
    return t, flops / t / 1e9


def load() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` shows them."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def machine() -> str:
    """One line naming the machine, the software and the allocator setting."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    tun = "glibc tunables ON" if os.environ.get("GLIBC_TUNABLES") else "glibc tunables off"
    flags = f", XLA_FLAGS='{xla_flags()}'" if xla_flags() else ""
    if jax.default_backend() == "gpu":
        cpu = f"{cpu} + {jax.devices()[0].device_kind}"
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}), "
        f"{tun}{flags}, load {load()}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def xla_flags() -> str:
    """This process's ``XLA_FLAGS`` (what XLA read when JAX started), '' when none."""
    return os.environ.get("XLA_FLAGS", "")


def summary(times: Sequence[float], cpu: Sequence[float] | None = None, per: int = 1) -> dict:
    """Median wall (and CPU) milliseconds per unit of work, with the spread and samples.

    Args:
      times: seconds per sample; cpu: process CPU seconds per sample (all threads).
      per: units of work in one sample (steps), to report per unit.
    """
    out = {
        "ms": 1e3 * median(times) / per,
        "spread": spread(times),
        "samples_ms": [round(1e3 * t / per, 4) for t in times],
    }
    if cpu:
        out["cpu_ms"] = 1e3 * median(cpu) / per
    return out


def hlo_fingerprint(compiled_text: str) -> str:
    """A short hash of a compiled program, without its metadata (source lines, names).

    Two XLA settings that give the same fingerprint compile to the same program.
    """
    text = re.sub(r",? metadata=\{[^}]*\}", "", compiled_text)
    text = re.sub(r"^HloModule \S+", "HloModule", text, flags=re.M)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def library_fusions(compiled_text: str) -> dict[str, int]:
    """How many library fusions of each kind (``__ynn_fusion``, ...) a compiled program has."""
    counts: dict[str, int] = {}
    for kind in re.findall(r'"kind":"(__\w+_fusion)"', compiled_text):
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def torch_device() -> str:
    """``"cuda"`` when JAX runs on a GPU and PyTorch sees one, else ``"cpu"``."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by waiting for the GPU when ``device`` is ``"cuda"`` (timings end there)."""
    if device != "cuda":
        return fn
    import torch

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def record(bench: str, **fields: Any) -> dict:
    """A benchmark's machine-readable result: its fields plus machine, load, flags."""
    return {
        "bench": bench,
        "machine": machine(),
        "load": list(os.getloadavg()),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "xla_flags": xla_flags(),
        "glibc_tunables": bool(os.environ.get("GLIBC_TUNABLES")),
        **fields,
    }


def write_json(path: str | None, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


def save_leaves(path: str | None, tree: Any) -> None:
    """Save the leaves of a pytree (e.g. gradients) as float32 arrays in an ``.npz``."""
    if path:
        import numpy as np

        leaves = jax.tree.leaves(tree)
        np.savez(path, *[np.asarray(v, np.float32) for v in leaves])


def run_both_allocators(script: str, args: Sequence[str]) -> list[dict]:
    """Run ``script --json ARGS`` twice, glibc tunables off then on, each its own process.

    The child prints one JSON object as its last line; the two objects are returned.
    """
    import json
    import subprocess
    import sys

    results = []
    for tunables in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = TUNABLES
        cmd = [sys.executable, os.path.abspath(script), "--json", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results
