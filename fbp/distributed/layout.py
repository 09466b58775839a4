"""Where arrays live on a mesh: meshes, placement, and the layout of a train state.

A one-axis ``("data",)`` mesh spans the devices of a run (every process's, after
``fbp.distributed.cluster.initialize``). Batches are split over its axis (``shard_batch``).
A train state is either replicated on every device, or, with sharded parameters,
each large leaf of the parameters and optimizer state is split along one axis
over ``"data"`` (``state_sharding``): the largest axis that the device count
divides, while leaves smaller than ``min_size`` elements, or with no such axis,
stay replicated. XLA then gathers each weight where the step needs it whole and
reduce-scatters its gradient, so the step itself is unchanged; at rest every
device holds about 1/n of the state.

``StateLayout`` moves a train state onto the mesh in its layout and back to a
process-local view for the host-side parts of a training loop (validation,
checkpoints), reusing what it handed out so that only changed leaves move.

Examples:
  >>> import numpy as np
  >>> from jax.sharding import AbstractMesh
  >>> mesh = AbstractMesh((8,), ("data",))
  >>> tree = {"w": np.zeros((64, 256)), "b": np.zeros(256), "odd": np.zeros((3, 5001))}
  >>> {k: str(s.spec) for k, s in state_sharding(tree, mesh).items()}
  {'b': 'P()', 'odd': 'P()', 'w': "P(None, 'data')"}
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"
MIN_SHARD_SIZE = 1024  # elements; a smaller leaf is replicated (gathering it costs more)


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
    if jax.config.values["jax_num_cpu_devices"] >= n:
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
            f"mesh has axes {tuple(mesh.shape)} but fbp.distributed.parallel needs a {AXIS!r} axis."
        )
    return mesh.shape[AXIS]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch(batch_size: int, mesh: Mesh, where: str = "fbp.distributed.parallel") -> None:
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
        if not x.is_fully_replicated:  # split over processes: every process gathers it
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def to_host(tree: Any) -> Any:
    """NumPy copy of a pytree of arrays, for saving or comparing.

    With several processes, an array split over processes is gathered from all of
    them (a collective: every process calls ``to_host`` at the same point).
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


def local_leaf(x: Any) -> Any:
    """A leaf this process can use alone: itself when local, else a local copy (or gather).

    x: an array of any shape, or another leaf (returned as it is); the result has x's shape.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if _is_key(x):
        data = local_leaf(jax.random.key_data(x))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if x.is_fully_replicated:
        return x.addressable_data(0)  # this process's first device's copy; no transfer
    return _host_leaf(x)


# ----------------------------------------------------------------------------- sharded state


def leaf_spec(shape: Sequence[int], n: int, min_size: int = MIN_SHARD_SIZE) -> PartitionSpec:
    """How one leaf is split over ``n`` devices: its largest axis that ``n`` divides.

    Args:
      shape: the leaf's shape.
      n: devices on the data axis.
      min_size: leaves with fewer elements stay whole (replicated).

    Returns:
      ``PartitionSpec()`` (replicated) or one with ``"data"`` at the chosen axis
      (the first of equally large ones).

    Examples:
      >>> leaf_spec((64, 256), 8), leaf_spec((256, 10), 8), leaf_spec((10, 3), 8)
      (P(None, 'data'), P('data',), P())
    """
    if n <= 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    axes = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
    if not axes:
        return PartitionSpec()
    best = max(axes, key=lambda i: (shape[i], -i))
    return PartitionSpec(*([None] * best), AXIS)


def state_sharding(
    tree: Any, mesh: Mesh, *, shard_params: bool = True, min_size: int = MIN_SHARD_SIZE
) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (e.g. a ``TrainState``).

    Args:
      tree: a pytree of arrays (or anything with ``.shape``, tracers included).
      mesh: a mesh with a ``"data"`` axis.
      shard_params: False replicates every leaf.
      min_size: as in ``leaf_spec``.

    PRNG keys and scalars are always replicated.
    """
    n = data_size(mesh)

    def one(x):
        if not shard_params or _is_key(x):
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, leaf_spec(np.shape(x), n, min_size))

    return jax.tree.map(one, tree)


def shard_state(tree: Any, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE, like: Any = None) -> Any:
    """Put ``tree`` on ``mesh`` with its large leaves split over ``"data"`` (``state_sharding``).

    The Python form of ``fbp train --shard-params``: pass the result to
    ``make_step``/``make_epoch``/``make_train_chunk`` built with ``shard_params=True``.
    A tree from ``to_host`` needs ``like`` (as in ``place``) to turn key data back into keys.
    """
    shardings = state_sharding(tree if like is None else like, mesh, min_size=min_size)
    if like is None:
        return jax.tree.map(_put_leaf, tree, shardings)
    return jax.tree.map(_put_leaf, tree, shardings, like)


def bytes_per_device(tree: Any) -> int:
    """The bytes of ``tree``'s arrays held by the fullest device (of this process).

    Counted from each array's addressable shards, so a leaf split over 8 devices
    counts 1/8 of its bytes and a replicated one all of them. Host (NumPy) leaves
    count whole.
    """
    per: collections.Counter = collections.Counter()
    host = 0
    for leaf in jax.tree.leaves(tree):
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        if not isinstance(leaf, jax.Array):
            host += np.asarray(leaf).nbytes
            continue
        for shard in leaf.addressable_shards:
            per[shard.device] += shard.data.nbytes
    return max(per.values(), default=0) + host


def _nbytes(tree: Any) -> int:
    return sum(
        int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
        if not _is_key(x)
    )


class StateLayout:
    """A train state's layout on a mesh, and the moves between it and the host side.

    ``place(ts)`` puts a state on the mesh (replicated, or with sharded parameters
    and optimizer state); ``view(tree)`` gives what one process can use on its own
    (validation, checkpoints, plain ``jnp`` code): the arrays themselves in a single
    process; with several processes, a replicated array's copy on this process's
    first device, and a split one gathered from every process (a collective, so
    every process calls ``view`` at the same point). ``place`` recognises the leaves
    ``view`` handed out and reuses their placed arrays, so between chunks of a run
    only the leaves that the loop changed move.

    Args:
      mesh: a mesh with a ``"data"`` axis.
      shard_params: split large leaves over the data axis (``state_sharding``).
      min_size: as in ``leaf_spec``.
    """

    def __init__(self, mesh: Mesh, *, shard_params: bool = False, min_size: int = MIN_SHARD_SIZE):
        self.mesh = mesh
        self.shard_params = shard_params
        self.min_size = min_size
        self._given: dict[int, tuple[Any, Any]] = {}  # id(view leaf) -> (view leaf, placed)
        self.placed: Any = None  # the state last placed or returned by a step

    def shardings(self, tree: Any) -> Any:
        return state_sharding(
            tree, self.mesh, shard_params=self.shard_params, min_size=self.min_size
        )

    def constrain(self, ts: Any) -> Any:
        """Inside jit: keep a (traced) state in this layout (a no-op when replicated)."""
        if not self.shard_params:
            return ts
        return jax.lax.with_sharding_constraint(ts, self.shardings(ts))

    def place(self, tree: Any) -> Any:
        """``tree`` on the mesh in this layout (leaves already there are kept as they are)."""

        def one(x, sharding):
            hit = self._given.get(id(x))
            if hit is not None and hit[0] is x:
                return hit[1]
            return _put_leaf(x, sharding)

        self.placed = jax.tree.map(one, tree, self.shardings(tree))
        return self.placed

    def view(self, tree: Any, *, remember: bool = True) -> Any:
        """What this process can use of a placed ``tree`` on its own (see the class)."""
        if jax.process_count() == 1:
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        local = [local_leaf(x) for x in leaves]
        if remember:
            self._given = {id(v): (v, x) for v, x in zip(local, leaves, strict=True)}
        return jax.tree.unflatten(treedef, local)

    def memory(self, ts: Any = None) -> dict[str, Any]:
        """Bytes of parameters and optimizer state, per device and in all (a ``TrainState``).

        ``ts`` defaults to the state last placed. Per-device figures come from the
        arrays' addressable shards (``bytes_per_device``).
        """
        ts = self.placed if ts is None else ts
        return {
            "devices": data_size(self.mesh),
            "processes": jax.process_count(),
            "shard_params": self.shard_params,
            "params_bytes_per_device": bytes_per_device(ts.params),
            "opt_state_bytes_per_device": bytes_per_device(ts.opt_state),
            "params_bytes": _nbytes(ts.params),
            "opt_state_bytes": _nbytes(ts.opt_state),
        }


def describe_memory(m: dict[str, Any]) -> str:
    """One line for a run's header from ``StateLayout.memory``."""

    def kib(b: int) -> str:
        return f"{b / 1024:.1f} KiB"

    procs = m["processes"]
    where = f"{m['devices']} devices" + (f" in {procs} processes" if procs > 1 else "")
    how = "sharded" if m["shard_params"] else "replicated"
    return (
        f"data parallel over {where}; parameters and optimizer state {how}: "
        f"{kib(m['params_bytes_per_device'])} + {kib(m['opt_state_bytes_per_device'])} per "
        f"device (whole: {kib(m['params_bytes'])} + {kib(m['opt_state_bytes'])})"
    )
