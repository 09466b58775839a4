"""Several processes (hosts, SLURM tasks) as one run: joining, and agreeing between processes.

A multi-process run is the same program in every process (JAX's multi-controller
model): each process joins with ``initialize`` (or ``initialize_from_env``) before
any other JAX call, after which ``jax.devices()`` lists the devices of every
process and a ``jax.sharding.Mesh`` over them spans the run. Every process must
then make the same JAX calls in the same order: a process that stops early, or
skips a collective, leaves the others waiting in theirs. So whatever can end a run
is agreed between processes here:

* ``checked_inputs`` / ``inputs_ok``: input checks (bad options, a run directory
  in use, an unreadable checkpoint) pass in every process or stop every process,
  and every process starts from the same step;
* ``first_signal``: SIGTERM/SIGINT seen by any process stops all of them at the
  same chunk boundary.

In a single process each of these is a no-op with no communication.

Launching (``fbp train`` does ``launch``; a script calls ``initialize_from_env()``):

    # SLURM: one task per process (per GPU on GPU nodes)
    srun --nodes=2 --ntasks-per-node=4 fbp train digits-mlp --out runs/dp
    # anything else: the same three variables in every process, its own id in each
    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 fbp train ...
    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 fbp train ...
    # or flags: fbp train ... --coordinator host0:12345 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from fbp.distributed.layout import request_cpu_devices
from fbp.run import options


def is_main_process() -> bool:
    """True in process 0 (the only one that should write files); True without ``initialize``."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- joining


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"initialize: coordinator_address must be HOST:PORT with a port in 1..65535, "
            f"got {address!r}."
        )
    return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, timeout: float, who: str) -> None:
    """Poll until something accepts TCP connections at ``address``; raise after ``timeout``."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout)):
                return
        except OSError as e:  # refused, unreachable, unresolvable: retry until the deadline
            last = e
            time.sleep(0.25)
    raise TimeoutError(
        f"initialize: {who} found no coordinator at {address} within {timeout:g} s "
        f"(last error: {last}). Start process 0 first, or check the address and port "
        f"(JAX_COORDINATOR_ADDRESS / --coordinator)."
    )


def _watchdog(timeout: float, message: str, exit_code: int) -> threading.Event:
    """Exit the process with ``message`` unless the returned event is set within ``timeout``."""
    done = threading.Event()

    def watch():
        if not done.wait(timeout):
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            os._exit(exit_code)

    threading.Thread(target=watch, name="fbp-initialize-watchdog", daemon=True).start()
    return done


def check_processes(num_processes: Any, process_id: Any, where: str = "initialize") -> None:
    """Raise ValueError unless both are ints and ``0 <= process_id < num_processes``."""
    for name, v in (("num_processes", num_processes), ("process_id", process_id)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where}: {name} must be an int, got {v!r}.")
    if num_processes < 1:
        raise ValueError(f"{where}: num_processes must be >= 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"{where}: process_id must be in 0..{num_processes - 1} (num_processes="
            f"{num_processes}), got {process_id}."
        )


def initialize(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    timeout: float = 60.0,
    local_device_ids: Sequence[int] | None = None,
    exit_code: int = 1,
) -> None:
    """Join a multi-process run (``jax.distributed.initialize``) with a bounded wait.

    Call it first, before any other JAX call, in every process.
    Afterwards ``jax.devices()`` (and ``fbp.distributed.parallel.make_mesh()``) list the devices
    of all processes. On CPU, cross-process collectives use gloo (JAX's default).

    Args:
      coordinator_address: ``HOST:PORT`` of process 0, where it listens; the same in
        every process.
      num_processes: how many processes take part.
      process_id: this process's index, 0..num_processes-1.
      timeout: seconds to wait for the coordinator and the other processes.
      local_device_ids: restrict this process to these local devices (GPU hosts).
      exit_code: the status the process exits with when the processes do not all
        join in time (see below).

    Raises:
      ValueError: malformed address or ids.
      TimeoutError: (processes other than 0) nothing answers at the address in time.

    If the processes still do not all join within ``timeout`` seconds (e.g. a
    process never started), the process prints what it waited for to stderr, one
    line, and exits with ``exit_code`` instead of hanging.
    """
    _split_address(coordinator_address)
    check_processes(num_processes, process_id)
    if not timeout > 0:
        raise ValueError(f"initialize: timeout must be positive seconds, got {timeout!r}.")
    who = f"process {process_id} of {num_processes}"
    start = time.monotonic()
    if process_id != 0:
        _wait_for_coordinator(coordinator_address, timeout, who)
    left = max(1.0, timeout - (time.monotonic() - start))
    done = _watchdog(
        left,
        f"fbp.distributed.parallel.initialize: {who} could not join the run coordinated at "
        f"{coordinator_address} within {timeout:g} s: not every process connected. "
        f"Check that all {num_processes} processes were started with the same address "
        f"and distinct process ids (under SLURM, launch them with srun); exiting.",
        exit_code,
    )
    try:
        # JAX's own deadline is set later than the watchdog so that the message above,
        # not an abort inside the runtime, is what a failed start shows.
        jax.distributed.initialize(
            coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=int(left) + 30,
        )
    finally:
        done.set()


def _env_int(names: Sequence[str]) -> int | None:
    for name in names:
        if os.environ.get(name):
            try:
                return int(os.environ[name])
            except ValueError:
                raise ValueError(
                    f"initialize_from_env: {name}={os.environ[name]!r} is not an int."
                ) from None
    return None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"n[003-005,9],gpu1"`` -> ``"n003"``.

    Examples:
      >>> first_slurm_host("node[003-005,009],login1"), first_slurm_host("a1,a2")
      ('node003', 'a1')
    """
    head = nodelist.split(",", 1)[0]
    if "[" not in head:
        return head
    prefix, rest = nodelist.split("[", 1)
    return prefix + re.split(r"[,\-\]]", rest, maxsplit=1)[0]


def _from_slurm() -> tuple[str, int, int]:
    """Coordinator address, process count and id of an ``srun`` step (one process per task)."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    pid = _env_int(["SLURM_PROCID"])
    count = _env_int(["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"])
    if not nodes or pid is None or count is None:
        raise ValueError(
            "initialize_from_env: SLURM_NTASKS > 1 but SLURM_STEP_NODELIST/SLURM_PROCID are "
            "missing; launch the tasks with srun, or set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID."
        )
    job = _env_int(["SLURM_JOB_ID"]) or 0
    # The same port choice as jax.distributed's own SLURM detection.
    port = _env_int(["JAX_COORDINATOR_PORT"]) or job % 2**12 + (65535 - 2**12 + 1)
    return f"{first_slurm_host(nodes)}:{port}", count, pid


class Placement(NamedTuple):
    """Where this process stands in a run: the coordinator, the process count and its id."""

    coordinator: str | None  # HOST:PORT of process 0; None for a single process
    num_processes: int
    process_id: int


def find_placement(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    where: str = "initialize_from_env",
) -> Placement:
    """This process's place from explicit values, else the environment; nothing is joined.

    Each of the three comes from its argument when given, else from
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, else,
    under ``srun`` (``SLURM_NTASKS`` > 1), from SLURM's variables (process 0 is the
    first node of the step, port ``JAX_COORDINATOR_PORT`` or one derived from the
    job id).

    Raises:
      ValueError: only some of the three are known, one is not an int, or the
        process id is out of range.
    """
    address = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else _env_int(["JAX_NUM_PROCESSES"])
    pid = process_id if process_id is not None else _env_int(["JAX_PROCESS_ID"])
    known = (address, count, pid)
    slurm_tasks = _env_int(["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"]) or 1
    if slurm_tasks > 1 and None in known:
        s_address, s_count, s_pid = _from_slurm()
        address = address if address is not None else s_address
        count = count if count is not None else s_count
        pid = pid if pid is not None else s_pid
    if count is not None and pid is not None:
        check_processes(count, pid, where)
    if count == 1 or (address, count, pid) == (None, None, None):
        return Placement(None, 1, 0)
    if address is None or count is None or pid is None:
        raise ValueError(
            f"{where}: set all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID (or --coordinator, --num-processes, --process-id), or none; got "
            f"address={address!r}, num_processes={count!r}, process_id={pid!r}."
        )
    _split_address(address)
    return Placement(address, count, pid)


def initialize_from_env(
    *,
    timeout: float = 60.0,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    exit_code: int = 1,
) -> bool:
    """Join a multi-process run described by the environment; do nothing for one process.

    Args:
      timeout, exit_code: as in ``initialize``.
      coordinator, num_processes, process_id: explicit values that take precedence
        over the environment (see ``find_placement``).

    Returns:
      True when this process joined a multi-process run, False for a single process.

    Raises:
      ValueError: as in ``find_placement``.
      TimeoutError: as in ``initialize``.
    """
    where = find_placement(coordinator, num_processes, process_id)
    if where.num_processes == 1 or where.coordinator is None:  # no coordinator: one process
        return False
    initialize(
        where.coordinator,
        where.num_processes,
        where.process_id,
        timeout=timeout,
        exit_code=exit_code,
    )
    return True


def launch(opts: Mapping[str, Any], *, out: str | None) -> Placement:
    """Join the run ``fbp train``'s options describe, before any JAX computation.

    Reads the run options ``coordinator``, ``num_processes``, ``process_id``,
    ``coordinator_timeout`` and ``devices`` (None: not given). On a CPU-only host
    ``devices`` (the run's total) is split evenly between the processes.

    Raises:
      ValueError: an option out of range (process id, device count that does not
        split over the processes), several processes without ``out``; the same
        errors as ``find_placement``.
      TimeoutError: no coordinator answered in time (processes other than 0).
    """
    defaults = {f.name: f.default for f in options.fields()}
    for name in ("coordinator", "num_processes", "process_id", "coordinator_timeout", "devices"):
        if opts.get(name) is not None:
            options.check(name, opts[name])
    where = find_placement(
        opts.get("coordinator"), opts.get("num_processes"), opts.get("process_id"), where="run"
    )
    devices = opts.get("devices")
    if where.num_processes > 1:
        if out is None:
            raise ValueError(
                f"run: out must be given for a run of {where.num_processes} processes "
                "(every process names the same directory, on a file system all of them see)."
            )
        if devices is not None and devices % where.num_processes:
            raise ValueError(
                f"run: devices={devices} does not split evenly over {where.num_processes} "
                "processes; give a multiple of the process count."
            )
    if devices:
        request_cpu_devices(devices // where.num_processes)
    if where.num_processes > 1 and where.coordinator is not None:
        timeout = opts.get("coordinator_timeout") or defaults["coordinator_timeout"]
        initialize(
            where.coordinator, where.num_processes, where.process_id, timeout=timeout, exit_code=2
        )
    return where


# ----------------------------------------------------------------------------- agreeing


def _gather(values: Sequence[int]) -> np.ndarray:
    """Every process's ``values``, shape (processes, len(values)): a collective."""
    row = np.asarray(values, np.int32).reshape(1, -1)
    return np.asarray(multihost_utils.process_allgather(row, tiled=True))


_pending: list[bool] = []  # one entry per open ``checked_inputs``: True until ``inputs_ok``


@contextlib.contextmanager
def checked_inputs() -> Iterator[None]:
    """Input checks in this block pass in every process, or every process stops.

    Inside the block each process calls ``inputs_ok`` once its checks have passed.
    A process whose block raises before that tells the processes waiting in
    ``inputs_ok`` (which then raise ``ValueError``) and re-raises its own error. In
    one process, nothing is communicated.
    """
    if jax.process_count() == 1:
        yield
        return
    _pending.append(True)
    try:
        yield
    except BaseException:
        if _pending[-1]:  # failed before inputs_ok: answer the processes waiting there
            _pending[-1] = False
            _gather([1, 0, 0, 0])
        raise
    finally:
        _pending.pop()


def inputs_ok(epoch: int, pos: int, step: int) -> None:
    """Every process passed its checks and starts at the same point, else raise ValueError.

    Call it in every process (inside ``checked_inputs``) with the point training
    starts from: epochs done, steps done in the next epoch, optimizer steps.

    Raises:
      ValueError: another process failed its checks, or the processes would start
        from different points (a resumed run whose directory some process cannot see).
    """
    if jax.process_count() == 1:
        return
    if _pending:
        _pending[-1] = False
    rows = _gather([0, epoch, pos, step])
    if rows[:, 0].any():
        first = int(np.argmax(rows[:, 0]))
        raise ValueError(
            f"run: process {first} of {len(rows)} stopped on an error before training (its own "
            "output says which); every process stops, nothing written."
        )
    if (rows[:, 1:] != rows[0, 1:]).any():
        raise ValueError(
            "run: the processes would start from different points (per process: epoch, step "
            f"in epoch, step: {rows[:, 1:].tolist()}); the run directory must be on a file "
            "system that every process sees."
        )


def first_signal(signum: int | None) -> int | None:
    """The signal any process has received (the lowest-numbered process's), else None.

    Call it in every process at the same point; one process alone returns its own.
    """
    if jax.process_count() == 1:
        return signum
    seen = _gather([signum or 0])[:, 0]
    return int(seen[seen > 0][0]) if (seen > 0).any() else None
