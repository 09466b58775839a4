"""The sweep's one program: every run's train state on a leading run axis, trained by vmap.

The runs of a sweep share a model, a loss and the shapes of everything; they
differ in their seed (initial parameters, data split and order) and in swept
option values. So their train states stack into one pytree whose leaves have a
leading axis of size ``runs``, and the single-run step (``fbp.train.step_fn``,
scanned by ``fbp.train.scan_steps``) is ``jax.vmap``-ed over that axis. The swept
values (``lr``, ``weight_decay``...) are per-run traced arrays: the optimizer of
``fbp.run.schedules.build_optimizer`` is built inside the vmapped function from them, so
each run steps with its own values. They are weakly typed, as the Python floats
of a single run are, so the arithmetic is the same.

A run that has finished (or stopped early) is masked: the chunk computes it but
keeps its old state, so it no longer changes while the others go on.

Examples:
  >>> import jax.numpy as jnp
  >>> t = stack([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])
  >>> t["w"].shape, take(t, 1)["w"].tolist()
  ((2, 2), [1.0, 1.0])
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp import data as fbp_data
from fbp import train as fbp_train
from fbp.core import Array
from fbp.run import schedules
from fbp.run.experiment import Experiment
from fbp.run.loop import Best, Setup
from fbp.run.options import RunOptions


def stack(trees: Sequence[Any]) -> Any:
    """Trees of one structure as one tree whose leaves have a leading axis, shape (runs, ...).

    Stacked on the host (NumPy) and moved to the device once, so stacking compiles nothing.
    """
    return jax.tree.map(lambda *xs: _on_device(_stack([_host(x) for x in xs])), *trees)


def to_host(tree: Any) -> Any:
    """``tree``'s leaves as NumPy arrays (PRNG keys as ``HostKeys``), in one transfer."""
    return jax.tree.map(_host, jax.device_get(tree))


def take(tree: Any, i: int) -> Any:
    """Run ``i`` of a stacked host tree (``to_host``): NumPy leaves, PRNG keys rewrapped."""
    return jax.tree.map(lambda a: _on_device(a[i]) if isinstance(a, HostKeys) else a[i], tree)


class HostKeys(np.ndarray):
    """The key data of PRNG keys on the host (uint32, shape (..., key words)), with the impl."""

    impl: str = ""

    def __array_finalize__(self, obj: Any) -> None:
        self.impl = getattr(obj, "impl", "")


def _stack(xs: Sequence[np.ndarray]) -> np.ndarray:
    out = np.stack([np.asarray(x) for x in xs])
    if isinstance(xs[0], HostKeys):
        keys = out.view(HostKeys)
        keys.impl = xs[0].impl
        return keys
    return out


def _host(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        keys = np.asarray(jax.random.key_data(x)).view(HostKeys)
        keys.impl = str(jax.random.key_impl(x))
        return keys
    return np.asarray(x)


def _on_device(a: np.ndarray) -> Any:
    if isinstance(a, HostKeys):
        return jax.random.wrap_key_data(jnp.asarray(a), impl=a.impl)
    return jnp.asarray(a)


def restructure(tree: Any, treedef: Any) -> Any:
    """``tree``'s leaves in the structure ``treedef`` (same leaves, another nesting).

    A run's own optimizer and the sweep's can nest their states differently (a
    weight decay of 0 leaves out a stateless transform that a swept weight decay
    needs); the leaves are the same, so checkpoints keep the run's own layout.
    """
    leaves = jax.tree.leaves(tree)
    if len(leaves) != treedef.num_leaves:
        raise ValueError(
            f"sweep: a run's train state has {len(leaves)} arrays but the sweep's has "
            f"{treedef.num_leaves}; the experiment's optimizer state must not depend on the "
            "swept values."
        )
    return jax.tree.unflatten(treedef, leaves)


def where(mask: Array, new: Any, old: Any) -> Any:
    """Per run: ``new`` where ``mask`` (shape (runs,)) is set, else ``old``."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


def hyperparams(values: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Array]:
    """The swept values of every run, shape (runs,), weakly typed like Python numbers."""
    return {n: jnp.stack([jnp.asarray(v[n]) for v in values]) for n in names}


class Program(NamedTuple):
    """The jitted functions of a sweep (every array argument with a leading run axis)."""

    chunk: Callable  # (state, hp, x, y, order, active) -> (state, metrics of shape (runs, steps))
    start_epoch: Callable  # (key, order_key, active) -> (key, order_key, order): ``epoch_orders``
    evaluate: Callable  # (params, state, x, y) -> {'loss', ['accuracy']}, shape (runs,)
    sums: Callable  # (params, state, xb, yb) -> test sums (fbp.train.eval_sums), (runs,)
    keep_best: Callable  # (best, state, improved) -> best
    plateau: Callable | None  # (opt_state, values, active) -> opt_state
    probe: Callable | None  # (state, hp, xb, yb) -> {name: (runs,)}
    data_axis: int | None  # 0: each run has its own data; None: one copy for all


def build_program(
    exp: Experiment,
    cfg: RunOptions,
    setup: Setup,
    total_steps: int,
    *,
    own_data: bool,
) -> Program:
    """The sweep's functions for runs shaped like ``setup`` (any run's), options as ``cfg``.

    Args:
      exp: the experiment.
      cfg: options every run shares (the swept ones come in as ``hp`` per run).
      setup: one run's ``fbp.run.loop.Setup``: model, batch size, ``grad_fn``'s data set.
      total_steps: steps of a whole run (the schedules' horizon).
      own_data: each run has its own data split (stacked) rather than one shared.
    """
    model, loss = setup.model, exp.loss
    ax = 0 if own_data else None
    grad_fn = exp.grad_fn(model, setup.dataset) if exp.grad_fn is not None else None

    def optimizer(hp):
        return schedules.build_optimizer(exp, dataclasses.replace(cfg, **hp), total_steps)[0]

    def one(ts, hp, x, y, order):
        step = fbp_train.step_fn(
            model,
            loss,
            optimizer(hp),
            penalty=exp.penalty,
            grad_fn=grad_fn,
            precision=cfg.precision,
        )
        return fbp_train.scan_steps(step, ts, x, y, order)

    def chunk(state, hp, x, y, order, active):
        new, metrics = jax.vmap(one, in_axes=(0, 0, ax, ax, 0))(state, hp, x, y, order)
        return where(active, new, state), metrics

    n, bs = int(setup.x.shape[0]), setup.batch_size

    plateau = probe = None
    if cfg.schedule == "plateau":

        def plateau(opt_state, values, active):
            one_run = jax.vmap(lambda s, v: schedules.plateau_update(cfg, (s,), v)[-1])
            return (*opt_state[:-1], where(active, one_run(opt_state[-1], values), opt_state[-1]))

        plateau = jax.jit(plateau)
    if exp.probe is not None:
        make_probe = exp.probe

        def probe_one(ts, hp, xb, yb):
            return make_probe(model, loss, optimizer(hp))(ts, xb, yb)

        probe = jax.jit(jax.vmap(probe_one, in_axes=(0, 0, ax, ax)))
    return Program(
        chunk=jax.jit(chunk),
        start_epoch=functools.partial(epoch_orders, n=n, batch_size=bs),
        evaluate=jax.jit(jax.vmap(setup.evaluate, in_axes=(0, 0, ax, ax))),
        sums=jax.jit(
            jax.vmap(fbp_train.eval_sums(model, loss, setup.y.dtype), in_axes=(0, 0, ax, ax))
        ),
        keep_best=keep_best,
        plateau=plateau,
        probe=probe,
        data_axis=ax,
    )


@jax.jit
def keep_best(best: Best, state: fbp_train.TrainState, improved: Array) -> Best:
    """The best parameters: ``state``'s for the runs whose epoch ``improved``, else ``best``.

    improved: shape (runs,), bool.
    """
    return Best(
        where(improved, state.params, best.params),
        where(improved, state.model_state, best.model_state),
    )


@functools.partial(jax.jit, static_argnames=("n", "batch_size"))
def epoch_orders(
    key: Array, order_key: Array, active: Array, *, n: int, batch_size: int
) -> tuple[Array, Array, Array]:
    """Start an epoch for the ``active`` runs; every run's example order for its epoch.

    Args:
      key: each run's train key, shape (runs,); order_key: its epoch order key.
      active: runs that start an epoch now (their keys split as ``fbp.train.epoch_keys``).
      n, batch_size: training examples and batch size.

    Returns:
      (train keys, order keys, ``fbp.data.batch_order`` of each run's order key, shape
      (runs, steps, batch)). One compiled function per process and shape, as the
      single-run loop's.
    """
    new_key, new_order_key = jax.vmap(fbp_train.epoch_keys)(key)
    key, order_key = where(active, new_key, key), where(active, new_order_key, order_key)
    order = jax.vmap(lambda k: fbp_data.batch_order(k, n, batch_size))(order_key)
    return key, order_key, order


def optimizer_structure(
    exp: Experiment, cfg: RunOptions, total_steps: int, params: Any, hp: dict[str, Any]
) -> Any:
    """The treedef of the sweep's train state (its optimizer built from traced ``hp``)."""

    def init(p, h):
        opt = schedules.build_optimizer(exp, dataclasses.replace(cfg, **h), total_steps)[0]
        return opt.init(p)

    return jax.eval_shape(init, params, hp)


def evaluate_runs(
    program: Program, params: Any, model_state: Any, x: Array, y: Array, batch_size: int = 4096
) -> list[dict[str, float]]:
    """Each run's test metrics, as ``fbp.train.evaluate`` computes them for one run.

    Args:
      params, model_state: stacked, shape (runs, ...).
      x, y: the split; shape (runs, n, ...) when each run has its own, else (n, ...).
    """
    axis = 0 if program.data_axis is None else 1
    n = x.shape[axis]
    totals: list[dict[str, float]] | None = None
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        xb, yb = (x[part], y[part]) if axis == 0 else (x[:, part], y[:, part])
        sums = jax.device_get(program.sums(params, model_state, xb, yb))
        runs = len(next(iter(sums.values())))
        totals = totals or [{} for _ in range(runs)]
        for r, total in enumerate(totals):
            for k, v in sums.items():
                total[k] = total.get(k, 0.0) + float(v[r])
    return [{k: v / n for k, v in total.items()} for total in totals or []]
