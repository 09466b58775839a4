"""Training: a train state, one jitted step for any optax transformation, scanned epochs.

The step is ``fbp.value_and_grad`` (hand-written backprop) followed by an optax
update; an epoch is one ``lax.scan`` over minibatches drawn by an explicit
shuffling key, so a whole epoch is one XLA call and the step traces once.

The shuffle-and-scan core is three functions that every training loop of fbp
shares (``make_epoch`` here, the runner's chunks, ``fbp.distributed.parallel``), so that they
take bitwise the same steps: ``epoch_keys`` splits the train key at the start of
an epoch, ``fbp.data.batch_order`` turns the order key into example indices, shape
(steps, batch), and ``scan_steps`` runs the step over any slice of those rows.

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> from fbp import nn, losses, train
  >>> x = jax.random.normal(jax.random.key(0), (64, 3)); y = x @ jnp.ones((3, 1))
  >>> model = nn.Sequential([nn.Dense(1)])
  >>> ts = train.init(model, optax.sgd(0.1), jax.random.key(1), x)
  >>> epoch = train.make_epoch(model, losses.mse, optax.sgd(0.1), batch_size=16)
  >>> for _ in range(50):
  ...     ts, m = epoch(ts, x, y)
  >>> bool(m['loss'].mean() < 1e-3)
  True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fbp.core import (
    Array,
    Layer,
    LossFunction,
    Params,
    PenaltyFunction,
    State,
    renamed_keyword,
    value_and_grad,
)
from fbp.data import batch_order
from fbp.losses import SoftmaxCrossEntropy, accuracy
from fbp.precision import Policy, get_policy, init_loss_scale


class TrainState(NamedTuple):
    """Everything a run needs to continue: a pytree, so it can be jitted and saved."""

    params: Params
    opt_state: Any
    model_state: State  # running statistics (batch norm); {} when none
    step: Array  # int32 scalar: optimizer steps taken
    key: Array  # PRNG key for shuffling and dropout, advanced every step/epoch
    loss_scale: Any = None  # fbp.precision.DynamicLossScale under a "dynamic" policy, else None


def init(
    model: Layer,
    optimizer: optax.GradientTransformation,
    key: Array,
    x: Any,
    *,
    precision: str | Policy | None = None,
) -> TrainState:
    """Fresh parameters, optimizer state and running state for inputs shaped like ``x``.

    Args:
      model: the fbp model.
      optimizer: any optax ``GradientTransformation``.
      key: PRNG key; split into the init key and the training key.
      x: example input (only its shape and dtype are read), shape (batch, ...).
      precision: ``fbp.precision`` policy name; parameters and optimizer state are
        made in its parameter dtype (float32 master copies for "bf16-mixed"); a policy
        with a dynamic loss scale ("f16-mixed") starts one in ``loss_scale``.
    """
    k_init, k_train = jax.random.split(key)
    policy = get_policy(precision)
    params = policy.cast_to_param(model.init(k_init, x))
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        model_state=model.init_state(x),
        step=jnp.zeros((), jnp.int32),
        key=k_train,
        loss_scale=init_loss_scale(policy),
    )


def all_finite(tree: Any) -> Array:
    """Whether every entry of every leaf of ``tree`` is finite (a scalar bool array)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves]))


def _finite_grads(grads: Any, norm: Array) -> Array:
    """Whether every gradient entry is finite, given the gradients' global norm.

    A NaN/Inf entry makes the norm non-finite, so a finite norm settles it with no
    further pass over the gradients; only a non-finite norm (bad entries, or finite
    ones whose squares overflow) runs the entry-by-entry check.
    """
    return jax.lax.cond(jnp.isfinite(norm), lambda g: jnp.array(True), all_finite, grads)


def step_fn(
    model: Layer,
    loss: LossFunction,
    optimizer: optax.GradientTransformation,
    *,
    penalty: PenaltyFunction | None = None,
    skip_nonfinite: bool = True,
    grad_fn: Callable | None = None,
    precision: str | Policy | None = None,
) -> Callable:
    """The pure (unjitted) train step ``(ts, x, y) -> (ts, metrics)``.

    Args:
      model, loss, optimizer: what to train, on what, with what.
      penalty: optional weight penalty (``losses.l2(1e-4)``).
      skip_nonfinite: drop an update whose loss or gradient is NaN/Inf, so it never
        reaches the parameters (``metrics['skipped']`` is 1 for such a step).
      grad_fn: replaces ``fbp.value_and_grad(model, loss, penalty=penalty, has_aux=True)``
        (same signature), e.g. an alternative learning rule.
      precision: ``fbp.precision`` policy of the gradient ("f32", "bf16-mixed", "bf16");
        the optimizer updates the parameters in their own dtype. With a dynamic loss
        scale ("f16-mixed") the step scales the loss by ``ts.loss_scale``, skips a step
        whose gradient is not finite (whatever ``skip_nonfinite`` says) and adjusts
        the scale; metrics then include ``loss_scale``.

    Returns:
      ``step(ts, x, y, lengths=None)``; metrics are ``loss``, ``grad_norm`` and
      ``skipped`` scalars. ``lengths`` (batch,), for padded sequences, goes to the
      gradient (``fbp.value_and_grad``'s ``lengths=``).
    """
    policy = get_policy(precision)
    if policy.is_dynamic and grad_fn is not None:
        raise ValueError(
            f"train.step_fn: precision={policy.name!r} scales the loss dynamically, which a "
            "custom grad_fn cannot take; pass a policy with a fixed loss_scale instead."
        )

    def grad(ts: TrainState):
        if grad_fn is not None:
            return grad_fn
        if policy.is_dynamic and ts.loss_scale is None:
            raise ValueError(
                f"train.step_fn: precision={policy.name!r} needs the train state's loss scale, "
                f"but ts.loss_scale is None; make it with train.init(..., precision=...)."
            )
        scaled = policy.with_scale(ts.loss_scale.scale) if policy.is_dynamic else policy
        return value_and_grad(model, loss, penalty=penalty, has_aux=True, precision=scaled)

    def step(
        ts: TrainState, x: Array, y: Array, lengths: Array | None = None
    ) -> tuple[TrainState, dict[str, Array]]:
        key, sub = jax.random.split(ts.key)
        state = ts.model_state if ts.model_state else None
        kw = {} if lengths is None else {"lengths": lengths}
        (value, aux), grads = grad(ts)(ts.params, x, y, key=sub, state=state, train=True, **kw)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.array(True)
        if skip_nonfinite or policy.is_dynamic:
            ok = jnp.isfinite(value) & _finite_grads(grads, grad_norm)
        scale = ts.loss_scale.adjust(ok) if policy.is_dynamic else ts.loss_scale
        new = TrainState(params, opt_state, aux.state or ts.model_state, ts.step + 1, key, scale)
        # A skipped step keeps everything but the advanced key (and the lowered scale).
        keep = ts._replace(key=key, loss_scale=scale)
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, keep)
        metrics = {
            "loss": value,
            "grad_norm": grad_norm,
            "skipped": (~ok).astype(jnp.int32),
        }
        if policy.is_dynamic:
            metrics["loss_scale"] = scale.scale
        return new, metrics

    return step


def make_step(model, loss, optimizer, **kwargs) -> Callable:
    """``jax.jit(step_fn(...))``: one jitted train step ``(ts, x, y) -> (ts, metrics)``."""
    return jax.jit(step_fn(model, loss, optimizer, **kwargs))


def epoch_keys(key: Array) -> tuple[Array, Array]:
    """Split the train key (shape ()) at an epoch's start: (train key from now on, order key).

    The order key draws the epoch's example order (``fbp.data.batch_order``); a
    checkpoint taken inside an epoch stores it, so a resumed run finishes the same epoch.
    """
    key, order_key = jax.random.split(key)
    return key, order_key


def scan_steps(
    step: Callable, ts: TrainState, x: Array, y: Array, order: Array, lengths: Array | None = None
) -> tuple[TrainState, dict[str, Array]]:
    """Run ``step`` over minibatches ``x[order[i]], y[order[i]]`` in one ``lax.scan``.

    Args:
      step: ``(ts, xb, yb) -> (ts, metrics)`` (``step_fn``).
      ts: the train state before the first row.
      x: the training inputs, shape (n, ...); y: targets, shape (n, ...).
      order: example indices, shape (steps, batch): an epoch's ``batch_order`` or a
        slice of its rows.
      lengths: valid steps of padded sequences, shape (n,), drawn with their examples;
        None for data that is not padded.

    Returns:
      (train state after the last row, metrics of each step, shape (steps,)).
    """
    if lengths is None:
        return jax.lax.scan(lambda t, idx: step(t, x[idx], y[idx]), ts, order)
    return jax.lax.scan(lambda t, idx: step(t, x[idx], y[idx], lengths[idx]), ts, order)


def make_chunk(
    model: Layer, loss: LossFunction, optimizer: optax.GradientTransformation, **kwargs
) -> Callable:
    """Jitted ``(ts, x, y, order, lengths=None) -> (ts, metrics)``: ``scan_steps`` over rows.

    A run split into chunks of an epoch's ``batch_order`` takes the same steps as
    ``make_epoch`` (the runner uses this; ``fbp.distributed.parallel.make_train_chunk`` is the
    data-parallel form with the same signature).

    Args:
      **kwargs: passed to ``step_fn`` (penalty, skip_nonfinite, grad_fn, precision).
    """
    step = step_fn(model, loss, optimizer, **kwargs)
    return jax.jit(functools.partial(scan_steps, step))


def make_epoch(
    model: Layer,
    loss: LossFunction,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    **kwargs,
) -> Callable:
    """One jitted epoch ``(ts, x, y) -> (ts, metrics)``: a ``lax.scan`` over shuffled batches.

    The order is a permutation drawn from ``ts.key`` (``epoch_keys``,
    ``fbp.data.batch_order``); the last ``n % batch_size`` examples of that
    permutation are left out of this epoch (a fresh permutation next epoch gives
    them their turn). Metrics are per step, shape (steps,).

    Args:
      batch_size: examples per step (1 <= batch_size <= n).
      **kwargs: passed to ``step_fn`` (penalty, skip_nonfinite, grad_fn, precision).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_epoch: batch_size must be a positive int, got {batch_size!r}.")
    step = step_fn(model, loss, optimizer, **kwargs)

    @jax.jit
    def epoch(ts: TrainState, x: Array, y: Array):
        n = x.shape[0]
        if n < batch_size:
            raise ValueError(f"make_epoch: {n} examples is fewer than batch_size={batch_size}.")
        key, order_key = epoch_keys(ts.key)
        order = batch_order(order_key, n, batch_size)
        return scan_steps(step, ts._replace(key=key), x, y, order)

    return epoch


def evaluate(
    model: Layer,
    loss: LossFunction,
    params: Params,
    x: Array,
    y: Array,
    *,
    state: State | None = None,
    batch_size: int = 4096,
    lengths: Array | None = None,
    model_state: State | None = None,
) -> dict[str, float]:
    """Loss (and accuracy for classification) over a whole split, in eval mode.

    Args:
      x: inputs, shape (n, ...); y: targets, shape (n, ...).
      state: running statistics for layers that have them (``ts.model_state``);
        required when the model has such layers.
      batch_size: examples per jitted call (bounds memory).
      lengths: valid steps of padded sequences, shape (n,), or None.
      model_state: the old name of ``state``, deprecated (a DeprecationWarning).

    Raises:
      ValueError: the model has running statistics and ``state`` is None.

    Returns:
      ``{'loss': ..., 'accuracy': ...}`` (accuracy for ``softmax_cross_entropy`` only).
    """
    state = renamed_keyword("evaluate", "model_state", model_state, "state", state)
    if not state and jax.tree.leaves(jax.eval_shape(model.init_state, x[:1])):
        raise ValueError(
            f"evaluate: {type(model).__name__} has running statistics (e.g. BatchNorm) but "
            "state is None; pass state=ts.model_state (the trained running state)."
        )
    sums = jax.jit(eval_sums(model, loss, y.dtype))
    n = x.shape[0]
    total: dict[str, float] = {}
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        part = sums(params, state or {}, x[sl], y[sl], None if lengths is None else lengths[sl])
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + float(v)
    return {k: v / n for k, v in total.items()}


def eval_sums(model: Layer, loss: LossFunction, y_dtype: Any) -> Callable:
    """``(params, state, xb, yb, lb=None) -> {'loss', ['accuracy']}``: batch sums, eval mode.

    ``evaluate`` adds these over batches and divides by the example count; the
    accuracy sum (correct predictions) is there for ``softmax_cross_entropy`` with
    integer labels (``y_dtype``); ``lb`` are the batch's sequence lengths, if any. The
    function is pure, so ``fbp.run.sweep`` vmaps it.
    """
    classify = isinstance(loss, SoftmaxCrossEntropy) and jnp.issubdtype(y_dtype, jnp.integer)

    def sums(params, state, xb, yb, lb=None):
        kw = {} if lb is None else {"lengths": lb}
        pred = model.apply(params, xb, state=state or None, train=False, **kw)
        n = yb.shape[0]
        out = {"loss": loss(pred, yb) * n}
        if classify:
            out["accuracy"] = accuracy(pred, yb) * n
        return out

    return sums
