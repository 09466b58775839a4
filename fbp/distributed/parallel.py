"""Data-parallel and multi-process training on JAX's own engine.

The batch is sharded over the ``"data"`` axis of a ``jax.sharding.Mesh``;
parameters and optimizer state are replicated, or with ``shard_params=True``
(``fbp train --shard-params``) split over the same axis (``fbp.distributed.layout``). The
train step is ``fbp.train.step_fn`` unchanged: a sharding constraint on each
minibatch tells XLA to split the hand-written forward and backward over the
devices, and XLA inserts the all-reduce that sums the gradient (or, with sharded
parameters, the all-gathers of the weights and the reduce-scatters of their
gradients) inside the one jitted step. So the step computes the same
global-batch mean as on one device (up to the order of floating-point sums), and
running statistics and dropout masks are the same too.

Several processes (hosts) join with ``initialize`` (or ``initialize_from_env``,
``fbp.distributed.cluster``) before any other JAX call; ``make_mesh()`` then spans every
device of every process and the same program runs in each process. Every process
must make the same JAX calls; the step functions here return process-local views
of their results (``fbp.distributed.layout.StateLayout.view``), which each process may read
and use on its own. Only ``is_main_process()`` writes files (``save_checkpoint``
does this for checkpoints). Launching the same script in every process:

    # SLURM: one task per process (per GPU on GPU nodes)
    srun --nodes=2 --ntasks-per-node=4 python train.py
    # anything else: the same three variables in every process, its own id in each
    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python train.py
    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python train.py

where ``train.py`` calls ``fbp.distributed.parallel.initialize_from_env()`` first.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from fbp import checkpoint
from fbp import train as fbp_train
from fbp.core import Layer, LossFunction, PenaltyFunction, value_and_grad
from fbp.distributed.cluster import (  # noqa: F401  (part of fbp.distributed.parallel's API)
    first_slurm_host,
    initialize,
    initialize_from_env,
    is_main_process,
)
from fbp.distributed.layout import (  # noqa: F401  (part of fbp.distributed.parallel's API)
    AXIS,
    MIN_SHARD_SIZE,
    StateLayout,
    batch_sharding,
    bytes_per_device,
    check_batch,
    data_size,
    describe_memory,
    leaf_spec,
    local_leaf,
    make_mesh,
    place,
    replicate,
    replicated,
    request_cpu_devices,
    shard_batch,
    shard_state,
    state_sharding,
    to_host,
)


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
      tree: a pytree of arrays (replicated, sharded or local), e.g. a ``TrainState``;
        arrays split over processes are gathered from all of them.

    Returns:
      The checkpoint's path in process 0, None in the others.
    """
    local = jax.tree.map(local_leaf, tree)
    path = checkpoint.save(directory, local, meta=meta, keep=keep) if is_main_process() else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("fbp.distributed.parallel.save_checkpoint")
    return path


def load_checkpoint(
    path: str | os.PathLike, template: Any, mesh: Mesh
) -> tuple[Any, dict[str, Any]]:
    """``fbp.checkpoint.load`` then ``replicate`` on ``mesh`` (any device count).

    A checkpoint holds host arrays only, so one saved on 8 devices resumes on 1 or 4,
    and one of a sharded state loads replicated (``shard_state`` splits it again).

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
    model: Layer,
    loss: LossFunction,
    layout: StateLayout,
    penalty: PenaltyFunction | None,
    grad_fn: Callable | None,
) -> Callable:
    """The gradient with the batch split over ``"data"`` and parameters kept in ``layout``."""
    vg = grad_fn or value_and_grad(model, loss, penalty=penalty, has_aux=True)
    mesh = layout.mesh
    spec = batch_sharding(mesh)

    def f(params, x, target, **kwargs):
        check_batch(x.shape[0], mesh, "fbp.distributed.parallel step")
        x = jax.lax.with_sharding_constraint(x, spec)
        target = jax.lax.with_sharding_constraint(target, spec)
        return vg(layout.constrain(params), x, target, **kwargs)

    return f


class StateFunction:
    """``fn(ts, *args) -> (ts, metrics)`` jitted with ``ts`` in a ``StateLayout``.

    Calling it places ``ts`` (``layout.place``), runs the jitted function with the
    state's shardings in and out, and returns ``layout.view`` of the new state and
    the (replicated) metrics: the arrays themselves in one process, process-local
    copies with several.

    Attributes:
      layout: the ``StateLayout`` (``layout.memory()``: bytes per device).
      mesh: the layout's mesh.
    """

    def __init__(
        self, fn: Callable, layout: StateLayout, prepare: Callable, args: tuple[NamedSharding, ...]
    ):
        self.fn = fn
        self.layout = layout
        self.mesh = layout.mesh
        self.prepare = prepare  # (*args) -> the arguments placed on ``args``' shardings
        self.args = args
        self._jitted: dict[Any, jax.stages.Wrapped] = {}

    def jitted(self, placed: Any) -> jax.stages.Wrapped:
        """The jitted function for states shaped like ``placed`` (built once per shape)."""
        leaves, treedef = jax.tree.flatten(placed)
        key = (treedef, tuple(np.shape(x) for x in leaves))
        if key not in self._jitted:
            state = self.layout.shardings(placed)
            self._jitted[key] = jax.jit(
                self.fn,
                in_shardings=(state, *self.args),
                out_shardings=(state, replicated(self.mesh)),
            )
        return self._jitted[key]

    def __call__(self, ts: Any, *args: Any) -> tuple[Any, Any]:
        placed = self.layout.place(ts)
        new, metrics = self.jitted(placed)(placed, *self.prepare(*args))
        self.layout.placed = new
        return self.layout.view(new), self.layout.view(metrics, remember=False)

    def lower(self, ts: Any, *args: Any) -> Any:
        """The lowered computation (``.compile().as_text()`` shows XLA's collectives)."""
        placed = self.layout.place(ts)
        return self.jitted(placed).lower(placed, *self.prepare(*args))


def _layout(mesh: Mesh, shard_params: bool, min_shard_size: int) -> StateLayout:
    return StateLayout(mesh, shard_params=shard_params, min_size=min_shard_size)


def make_step(
    model: Layer,
    loss: LossFunction,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh,
    penalty: PenaltyFunction | None = None,
    grad_fn: Callable | None = None,
    shard_params: bool = False,
    min_shard_size: int = MIN_SHARD_SIZE,
    **kwargs,
) -> StateFunction:
    """One jitted data-parallel step ``(ts, x, y) -> (ts, metrics)``.

    ``x`` and ``y`` (shape (batch, ...)) are split over the data axis; ``ts`` is
    replicated, or with ``shard_params`` split as ``state_sharding`` says. Numpy or
    single-device inputs are placed there by the step itself.

    Args:
      model, loss, optimizer, penalty, grad_fn, **kwargs: as in ``fbp.train.step_fn``.
      mesh: a mesh with a ``"data"`` axis (``make_mesh``).
      shard_params: shard parameters and optimizer state over the data axis.
      min_shard_size: leaves with fewer elements stay replicated.

    Raises:
      ValueError: (at trace time) the batch is not a multiple of the device count.
    """
    layout = _layout(mesh, shard_params, min_shard_size)
    vg = _sharded_grad_fn(model, loss, layout, penalty, grad_fn)
    step = fbp_train.step_fn(model, loss, optimizer, grad_fn=vg, **kwargs)
    bat = batch_sharding(mesh)
    return StateFunction(
        step, layout, lambda x, y: (shard_batch(x, mesh), shard_batch(y, mesh)), (bat, bat)
    )


def make_epoch(
    model: Layer,
    loss: LossFunction,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    mesh: Mesh,
    penalty: PenaltyFunction | None = None,
    grad_fn: Callable | None = None,
    shard_params: bool = False,
    min_shard_size: int = MIN_SHARD_SIZE,
    **kwargs,
) -> StateFunction:
    """One jitted data-parallel epoch ``(ts, x, y) -> (ts, metrics)``.

    The same epoch as ``fbp.train.make_epoch`` (same shuffling, same steps): the
    training set is replicated, each minibatch of ``batch_size`` examples is split
    over the devices, and gradients are summed by XLA inside the step. With the
    same global batch, results agree with one device up to the order of
    floating-point sums.

    Args:
      model, loss, optimizer, penalty, grad_fn, **kwargs: as in ``fbp.train.make_epoch``.
      batch_size: the global batch (all devices together); a multiple of the
        mesh's data-axis size.
      mesh: a mesh with a ``"data"`` axis (``make_mesh``).
      shard_params, min_shard_size: as in ``make_step``.

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
        check_batch(batch_size, mesh, "fbp.distributed.parallel.make_epoch")
    # else fbp.train.make_epoch raises its own error for a bad batch_size.
    layout = _layout(mesh, shard_params, min_shard_size)
    vg = _sharded_grad_fn(model, loss, layout, penalty, grad_fn)
    epoch = fbp_train.make_epoch(
        model, loss, optimizer, batch_size=batch_size, grad_fn=vg, **kwargs
    )
    rep = replicated(mesh)
    return StateFunction(epoch, layout, _PlacedData(rep), (rep, rep))


def make_train_chunk(
    model: Layer,
    loss: LossFunction,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | int | None,
    batch_size: int | None = None,
    penalty: PenaltyFunction | None = None,
    grad_fn: Callable | None = None,
    shard_params: bool = False,
    min_shard_size: int = MIN_SHARD_SIZE,
    **kwargs,
) -> StateFunction:
    """Data-parallel ``fbp.train.make_chunk``: jitted ``(ts, x, y, order) -> (ts, metrics)``.

    ``order`` is (steps, batch) example indices into the replicated training set
    ``x``, ``y``; each step's batch ``x[order[i]]`` is split over the mesh's data
    axis. Same signature and results (up to the order of sums) as the runner's
    one-device chunk, so the runner can use either.

    Args:
      model, loss, optimizer, penalty, grad_fn, **kwargs: as in ``fbp.train.step_fn``.
      mesh: a mesh with a ``"data"`` axis, or a device count for ``make_mesh``
        (None: every device).
      batch_size: the global batch, checked against the device count now (rather
        than when the chunk is first traced).
      shard_params, min_shard_size: as in ``make_step``.

    Raises:
      ValueError: too few devices, or a batch that does not split evenly over them.
    """
    mesh = mesh if isinstance(mesh, Mesh | AbstractMesh) else make_mesh(mesh)
    if batch_size is not None:
        check_batch(batch_size, mesh, "fbp.distributed.parallel.make_train_chunk")
    layout = _layout(mesh, shard_params, min_shard_size)
    vg = _sharded_grad_fn(model, loss, layout, penalty, grad_fn)
    step = fbp_train.step_fn(model, loss, optimizer, grad_fn=vg, **kwargs)
    chunk = functools.partial(fbp_train.scan_steps, step)
    rep = replicated(mesh)
    data = _PlacedData(rep)
    return StateFunction(
        chunk, layout, lambda x, y, order: (*data(x, y), place(order, rep)), (rep,) * 3
    )


# ----------------------------------------------------------------------------- runs


def run_mesh(
    *,
    devices: int | None,
    shard_params: bool,
    batch_size: int,
    num_processes: int | None = None,
) -> Mesh | None:
    """The mesh a run's options ask for, checked; None for one device in one process.

    Args:
      devices: the ``devices`` option: how many devices the batch is split over
        (None: one, or every device of a multi-process run).
      shard_params: the ``shard_params`` option; without ``devices`` it uses every
        local device, and it needs two or more.
      batch_size: the global batch.
      num_processes: the ``num_processes`` option, when given: must be the number
        of processes this one has joined.

    Raises:
      ValueError: naming the option: a device count other than every device of a
        multi-process run, sharding over one device, a batch that does not split
        over the devices, or a process count this process has not joined.
    """
    procs = jax.process_count()
    if num_processes is not None and num_processes != procs:
        raise ValueError(
            f"run: num_processes={num_processes} but this process is in a run of {procs}; "
            "join first (fbp.distributed.parallel.initialize or initialize_from_env; "
            "fbp train does it)."
        )
    total = len(jax.devices())
    if procs > 1:
        if devices is not None and devices != total:
            raise ValueError(
                f"run: devices={devices} but the {procs} processes have {total} devices in "
                f"all; a run across processes uses every device (give {total} or leave it out)."
            )
        n = total
    elif devices:
        n = devices
    elif shard_params:
        n = total
    else:
        return None
    if shard_params and n < 2:
        raise ValueError(
            "run: shard_params needs 2 or more devices but this run has 1; give devices=N "
            "(fbp train --devices N, which on a CPU-only host splits the CPU into N devices)."
        )
    mesh = make_mesh(n)
    check_batch(batch_size, mesh, "run: batch_size")
    return mesh
