"""Data-parallel and multi-process training on JAX's own engine.

The batch is sharded over the ``"data"`` axis of a ``jax.sharding.Mesh``;
parameters, optimizer state and the training set are replicated. The train step
is ``fbp.train.step_fn`` unchanged: a sharding constraint on each minibatch tells
XLA to split the hand-written forward and backward over the devices, and XLA
inserts the all-reduce that sums the gradient inside the one jitted step. So the
step computes the same global-batch mean as on one device (up to the order of
floating-point sums), and running statistics and dropout masks are the same too.

Several processes (hosts) join with ``initialize`` (or ``initialize_from_env``)
before any other JAX call; ``make_mesh()`` then spans every device of every
process and the same program runs in each process. Every process must make the
same JAX calls (read results with ``to_host``, never with an array operation in
one process only); only ``is_main_process()`` writes files (``save_checkpoint``
does this for checkpoints). Launching the same script in every process::

    # SLURM: one task per process (per GPU on GPU nodes)
    srun --nodes=2 --ntasks-per-node=4 python train.py
    # anything else: the same three variables in every process, its own id in each
    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python train.py
    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python train.py

where ``train.py`` calls ``fbp.parallel.initialize_from_env()`` first.

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> from fbp import nn, losses, parallel, train
  >>> x = jax.random.normal(jax.random.key(0), (64, 3)); y = x @ jnp.ones((3, 1))
  >>> model = nn.Sequential([nn.Dense(1)])
  >>> mesh = parallel.make_mesh(1)
  >>> ts = parallel.replicate(train.init(model, optax.sgd(0.1), jax.random.key(1), x), mesh)
  >>> epoch = parallel.make_epoch(model, losses.mse, optax.sgd(0.1), batch_size=16, mesh=mesh)
  >>> ts, m = epoch(ts, x, y)
  >>> m['loss'].shape
  (4,)
"""

from __future__ import annotations

import functools
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fbp import checkpoint
from fbp import train as fbp_train
from fbp.core import Layer, value_and_grad

AXIS = "data"


# ----------------------------------------------------------------------------- meshes


def make_mesh(n: int | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A one-axis ``("data",)`` mesh over the first ``n`` devices.

    Args:
      n: number of devices; ``None`` takes all of them (every process's devices
        after ``initialize``).
      devices: the devices to choose from; default ``jax.devices()``.

    Raises:
      ValueError: ``n`` is not a positive int or there are fewer than ``n`` devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if n is None:
        n = len(devices)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"make_mesh: n must be a positive int, got {n!r}.")
    if n > len(devices):
        raise ValueError(
            f"make_mesh: asked for {n} devices but only {len(devices)} are available "
            f"({devices[0].platform}); on CPU, set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts."
        )
    return Mesh(np.array(devices[:n]), (AXIS,))


def request_cpu_devices(n: int) -> bool:
    """Split the host CPU into ``n`` JAX devices, if JAX has not started yet.

    For trying data parallelism on one machine (``fbp train ... --devices 4`` on a
    laptop): it sets ``jax_num_cpu_devices``, which must happen before the first
    JAX operation. Accelerators are unaffected. A count already given by
    ``XLA_FLAGS=--xla_force_host_platform_device_count`` is left alone.

    Returns:
      True when the setting was made, False when it was already set or too late.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    if jax.config.jax_num_cpu_devices >= n:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX's backends are already running
        return False
    return True


def data_size(mesh: Mesh) -> int:
    """Number of devices on the mesh's ``"data"`` axis (the batch is split this many ways)."""
    if AXIS not in mesh.shape:
        raise ValueError(
            f"mesh has axes {tuple(mesh.shape)} but fbp.parallel needs a {AXIS!r} axis."
        )
    return mesh.shape[AXIS]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch(batch_size: int, mesh: Mesh, where: str = "fbp.parallel") -> None:
    """Raise ValueError unless ``batch_size`` splits evenly over the mesh's data axis."""
    n = data_size(mesh)
    if batch_size % n:
        raise ValueError(
            f"{where}: the global batch of {batch_size} examples does not split evenly over "
            f"{n} devices; use a batch size that is a multiple of {n}."
        )


# ----------------------------------------------------------------------------- placement


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host_leaf(x: Any) -> Any:
    if _is_key(x):
        return _host_leaf(jax.random.key_data(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(
                f"to_host: an array of shape {x.shape} is split over processes "
                f"({x.sharding}); only replicated arrays can be read in one process."
            )
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def to_host(tree: Any) -> Any:
    """NumPy copy of a pytree of (replicated or local) arrays, for saving or comparing.

    PRNG key arrays become their raw ``uint32`` key data (``jax.random.key_data``);
    ``place`` and ``replicate`` turn them back into keys when given ``like``.
    """
    return jax.tree.map(_host_leaf, tree)


def _put_leaf(x: Any, sharding: NamedSharding, like: Any = None) -> Any:
    if _is_key(like) and not _is_key(x):
        data = _put_leaf(x, sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(like))
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if _is_key(x):
        data = _put_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    # Several processes: every process holds the same host value and gives each of
    # its own devices the part that device owns.
    host = _host_leaf(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place(tree: Any, sharding: NamedSharding, like: Any = None) -> Any:
    """Put every leaf of ``tree`` on ``sharding`` (a no-op for leaves already there).

    Args:
      tree: pytree of arrays (NumPy or JAX, on any devices); with several processes
        every process must pass the same values.
      sharding: where the leaves go.
      like: optional pytree of the same structure whose PRNG-key leaves mark which
        leaves of ``tree`` are raw key data to turn back into keys (see ``to_host``).
    """
    if like is None:
        return jax.tree.map(lambda x: _put_leaf(x, sharding), tree)
    return jax.tree.map(lambda x, ref: _put_leaf(x, sharding, ref), tree, like)


def replicate(tree: Any, mesh: Mesh, like: Any = None) -> Any:
    """Replicate a pytree (e.g. a ``TrainState``) on every device of ``mesh``.

    Args:
      tree: pytree of arrays; a ``to_host`` copy works too when ``like`` is given.
      mesh: the mesh.
      like: as in ``place``.
    """
    return place(tree, replicated(mesh), like)


def shard_batch(batch: Any, mesh: Mesh, *, process_local: bool = False) -> Any:
    """Split the leading axis of every array in ``batch`` over the mesh's ``"data"`` axis.

    Args:
      batch: an array or pytree of arrays, each of shape (batch, ...), all with the same
        global batch; with several processes every process passes the whole batch,
        unless ``process_local``.
      mesh: the mesh.
      process_local: each process passes only its own rows, shape (batch / processes,
        ...), in process order; the result is the global batch (data loading that
        scales with the number of hosts). The same as the default in one process.

    Raises:
      ValueError: the (global) batch is not a multiple of the number of devices.
    """
    procs = jax.process_count() if process_local else 1
    for x in jax.tree.leaves(batch):
        if np.ndim(x) < 1:
            raise ValueError("shard_batch: got a scalar; expected arrays of shape (batch, ...).")
        check_batch(np.shape(x)[0] * procs, mesh, "shard_batch")
    if procs == 1:
        return place(batch, batch_sharding(mesh))
    spec = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(spec, _host_leaf(x)), batch
    )


def _local_leaf(x: Any) -> Any:
    if _is_key(x):
        return jax.random.wrap_key_data(_host_leaf(x), impl=jax.random.key_impl(x))
    return _host_leaf(x)


def save_checkpoint(
    directory: str | os.PathLike,
    tree: Any,
    *,
    meta: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path | None:
    """``fbp.checkpoint.save`` from process 0 only; every process waits until it is written.

    Call it in every process (reading replicated arrays back is done by all of them).

    Args:
      directory, meta, keep: as in ``fbp.checkpoint.save``.
      tree: a pytree of replicated (or local) arrays, e.g. a ``TrainState``.

    Returns:
      The checkpoint's path in process 0, None in the others.
    """
    local = jax.tree.map(_local_leaf, tree)
    path = checkpoint.save(directory, local, meta=meta, keep=keep) if is_main_process() else None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fbp.parallel.save_checkpoint")
    return path


def load_checkpoint(
    path: str | os.PathLike, template: Any, mesh: Mesh
) -> tuple[Any, dict[str, Any]]:
    """``fbp.checkpoint.load`` then ``replicate`` on ``mesh`` (any device count).

    A checkpoint holds host arrays only, so one saved on 8 devices resumes on 1 or 4.

    Returns:
      (tree replicated on ``mesh``, meta).
    """
    tree, meta = checkpoint.load(path, template)
    return replicate(tree, mesh), meta


# ----------------------------------------------------------------------------- training


class _PlacedData:
    """Replicates the training set once: later calls with the same JAX arrays reuse it.

    Only immutable ``jax.Array`` inputs are remembered; NumPy inputs (which can be
    changed in place) are placed again on every call.
    """

    def __init__(self, sharding: NamedSharding):
        self.sharding = sharding
        self.last: tuple[Any, Any, Any] | None = None  # (x, y, placed (x, y))

    def __call__(self, x: Any, y: Any) -> Any:
        if self.last is not None and self.last[0] is x and self.last[1] is y:
            return self.last[2]
        placed = place((x, y), self.sharding)
        immutable = all(isinstance(v, jax.Array) for v in jax.tree.leaves((x, y)))
        self.last = (x, y, placed) if immutable else None
        return placed


def _sharded_grad_fn(
    model: Layer, loss: Callable, mesh: Mesh, penalty: Callable | None, grad_fn: Callable | None
) -> Callable:
    vg = grad_fn or value_and_grad(model, loss, penalty=penalty, has_aux=True)
    spec = batch_sharding(mesh)

    def f(params, x, target, **kwargs):
        check_batch(x.shape[0], mesh, "fbp.parallel step")
        x = jax.lax.with_sharding_constraint(x, spec)
        target = jax.lax.with_sharding_constraint(target, spec)
        return vg(params, x, target, **kwargs)

    return f


def make_step(
    model: Layer,
    loss: Callable,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh,
    penalty: Callable | None = None,
    grad_fn: Callable | None = None,
    **kwargs,
) -> Callable:
    """One jitted data-parallel step ``(ts, x, y) -> (ts, metrics)``.

    ``ts`` is replicated, ``x`` and ``y`` (shape (batch, ...)) are split over the data
    axis, and the result is replicated. Numpy or single-device inputs are placed
    there by the step itself.

    Args:
      model, loss, optimizer, penalty, grad_fn, **kwargs: as in ``fbp.train.step_fn``.
      mesh: a mesh with a ``"data"`` axis (``make_mesh``).

    Raises:
      ValueError: (at trace time) the batch is not a multiple of the device count.
    """
    vg = _sharded_grad_fn(model, loss, mesh, penalty, grad_fn)
    step = fbp_train.step_fn(model, loss, optimizer, grad_fn=vg, **kwargs)
    rep, bat = replicated(mesh), batch_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(rep, bat, bat), out_shardings=(rep, rep))

    def run(ts, x, y):
        return jitted(place(ts, rep), shard_batch(x, mesh), shard_batch(y, mesh))

    run.lower = lambda ts, x, y: jitted.lower(
        place(ts, rep), shard_batch(x, mesh), shard_batch(y, mesh)
    )
    return run


def make_epoch(
    model: Layer,
    loss: Callable,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    mesh: Mesh,
    penalty: Callable | None = None,
    grad_fn: Callable | None = None,
    **kwargs,
) -> Callable:
    """One jitted data-parallel epoch ``(ts, x, y) -> (ts, metrics)``.

    The same epoch as ``fbp.train.make_epoch`` (same shuffling, same steps): the
    training set and ``ts`` are replicated, each minibatch of ``batch_size``
    examples is split over the devices, and gradients are summed by XLA inside
    the step. With the same global batch, results agree with one device up to
    the order of floating-point sums.

    Args:
      model, loss, optimizer, penalty, grad_fn, **kwargs: as in ``fbp.train.make_epoch``.
      batch_size: the global batch (all devices together); a multiple of the
        mesh's data-axis size.
      mesh: a mesh with a ``"data"`` axis (``make_mesh``).

    Returns:
      ``epoch(ts, x, y)`` with x: inputs, shape (n, ...), y: targets, shape (n, ...);
      JAX arrays are replicated once and reused while the same ones are passed,
      NumPy arrays on every call. A training set too large for every device to
      hold goes through ``make_step`` and ``shard_batch`` a batch at a time.
      ``epoch.lower(ts, x, y)`` gives the lowered computation
      (``.compile().as_text()`` shows the all-reduce XLA inserted).

    Raises:
      ValueError: ``batch_size`` is not a multiple of the device count.
    """
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
        check_batch(batch_size, mesh, "fbp.parallel.make_epoch")
    # else fbp.train.make_epoch raises its own error for a bad batch_size.
    vg = _sharded_grad_fn(model, loss, mesh, penalty, grad_fn)
    epoch = fbp_train.make_epoch(
        model, loss, optimizer, batch_size=batch_size, grad_fn=vg, **kwargs
    )
    rep = replicated(mesh)
    jitted = jax.jit(epoch, in_shardings=(rep, rep, rep), out_shardings=(rep, rep))

    data = _PlacedData(rep)

    def run(ts, x, y):
        return jitted(place(ts, rep), *data(x, y))

    run.lower = lambda ts, x, y: jitted.lower(place(ts, rep), *data(x, y))
    return run


def make_train_chunk(
    model: Layer,
    loss: Callable,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | int,
    batch_size: int | None = None,
    penalty: Callable | None = None,
    grad_fn: Callable | None = None,
    **kwargs,
) -> Callable:
    """Data-parallel ``fbp.train.make_chunk``: jitted ``(ts, x, y, order) -> (ts, metrics)``.

    ``order`` is (steps, batch) example indices into the replicated training set
    ``x``, ``y``; each step's batch ``x[order[i]]`` is split over the mesh's data
    axis. Same signature and results (up to the order of sums) as the runner's
    one-device chunk, so the runner can use either.

    Args:
      model, loss, optimizer, penalty, grad_fn, **kwargs: as in ``fbp.train.step_fn``.
      mesh: a mesh with a ``"data"`` axis, or a device count for ``make_mesh``.
      batch_size: the global batch, checked against the device count now (rather
        than when the chunk is first traced).

    Raises:
      ValueError: too few devices, or a batch that does not split evenly over them.
    """
    mesh = make_mesh(mesh) if isinstance(mesh, int) else mesh
    if batch_size is not None:
        check_batch(batch_size, mesh, "fbp.parallel.make_train_chunk")
    vg = _sharded_grad_fn(model, loss, mesh, penalty, grad_fn)
    step = fbp_train.step_fn(model, loss, optimizer, grad_fn=vg, **kwargs)

    chunk = functools.partial(fbp_train.scan_steps, step)
    rep = replicated(mesh)
    jitted = jax.jit(chunk, in_shardings=(rep,) * 4, out_shardings=(rep, rep))

    data = _PlacedData(rep)

    def run(ts, x, y, order):
        return jitted(place(ts, rep), *data(x, y), place(order, rep))

    run.mesh = mesh
    return run


# ----------------------------------------------------------------------------- processes


def is_main_process() -> bool:
    """True in process 0 (the only one that should write files); True without ``initialize``."""
    return jax.process_index() == 0


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


def _watchdog(timeout: float, message: str) -> threading.Event:
    """Exit the process with ``message`` unless the returned event is set within ``timeout``."""
    done = threading.Event()

    def watch():
        if not done.wait(timeout):
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            os._exit(1)

    threading.Thread(target=watch, name="fbp-initialize-watchdog", daemon=True).start()
    return done


def initialize(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    timeout: float = 60.0,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """Join a multi-process run (``jax.distributed.initialize``) with a bounded wait.

    Call it first, before any other JAX call, in every process.
    Afterwards ``jax.devices()`` (and ``make_mesh()``) list the devices of all
    processes. On CPU, cross-process collectives use gloo (JAX's default).

    Args:
      coordinator_address: ``HOST:PORT`` of process 0, where it listens; the same in
        every process.
      num_processes: how many processes take part.
      process_id: this process's index, 0..num_processes-1.
      timeout: seconds to wait for the coordinator and the other processes.
      local_device_ids: restrict this process to these local devices (GPU hosts).

    Raises:
      ValueError: malformed address or ids.
      TimeoutError: (processes other than 0) nothing answers at the address in time.

    If the processes still do not all join within ``timeout`` seconds (e.g. a
    process never started), the process prints what it waited for to stderr and
    exits with status 1 instead of hanging.
    """
    _split_address(coordinator_address)
    for name, v in (("num_processes", num_processes), ("process_id", process_id)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"initialize: {name} must be an int, got {v!r}.")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"initialize: need 0 <= process_id < num_processes, got process_id={process_id}, "
            f"num_processes={num_processes}."
        )
    if not timeout > 0:
        raise ValueError(f"initialize: timeout must be positive seconds, got {timeout!r}.")
    who = f"process {process_id} of {num_processes}"
    start = time.monotonic()
    if process_id != 0:
        _wait_for_coordinator(coordinator_address, timeout, who)
    left = max(1.0, timeout - (time.monotonic() - start))
    done = _watchdog(
        left,
        f"fbp.parallel.initialize: {who} could not join the run coordinated at "
        f"{coordinator_address} within {timeout:g} s: not every process connected. "
        f"Check that all {num_processes} processes were started with the same address "
        f"and distinct process ids (under SLURM, launch them with srun); exiting.",
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


def initialize_from_env(*, timeout: float = 60.0) -> bool:
    """Join a multi-process run described by the environment; do nothing for one process.

    Reads ``JAX_COORDINATOR_ADDRESS`` (HOST:PORT of process 0), ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``; without them, under SLURM (``srun``, ``SLURM_NTASKS`` > 1)
    the coordinator, count and id come from SLURM's variables (process 0 is the first
    node of the step, port ``JAX_COORDINATOR_PORT`` or one derived from the job id).

    Returns:
      True when this process joined a multi-process run, False for a single process.

    Raises:
      ValueError: only some of the three variables are set, or one is not an int.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = _env_int(["JAX_NUM_PROCESSES"])
    pid = _env_int(["JAX_PROCESS_ID"])
    given = [address is not None, count is not None, pid is not None]
    if any(given) and not all(given):
        raise ValueError(
            "initialize_from_env: set all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
            f"JAX_PROCESS_ID, or none; got address={address!r}, num_processes={count!r}, "
            f"process_id={pid!r}."
        )
    if not all(given) and (_env_int(["SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"]) or 1) > 1:
        address, count, pid = _from_slurm()
    if address is None or count is None or count <= 1:
        return False
    initialize(address, count, pid, timeout=timeout)
    return True
