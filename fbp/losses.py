"""Losses and weight penalties, each with a hand-written gradient.

A loss is called as ``loss(pred, target, where=None) -> scalar`` and differentiated
by ``loss.backward(pred, target, where=None) -> dpred`` (shape of ``pred``). The
scalar is a mean: over all elements for ``mse``, ``huber`` and
``sigmoid_binary_cross_entropy``; over the batch (every axis but the class axis)
for ``softmax_cross_entropy``. ``where`` (optional, 0/1 or non-negative weights)
masks entries out of that mean, e.g. the padded steps of variable-length
sequences; it has the shape of the per-entry loss or a prefix of it.

Examples:
  >>> import jax.numpy as jnp
  >>> from fbp import losses
  >>> logits, labels = jnp.array([[2.0, 0.0], [0.0, 2.0]]), jnp.array([0, 1])
  >>> round(float(losses.softmax_cross_entropy(logits, labels)), 4)
  0.1269
  >>> losses.softmax_cross_entropy.backward(logits, labels).shape
  (2, 2)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import Array, ShapeError


def _expand_to(w: Array, ndim: int) -> Array:
    """Append unit axes so that a prefix-shaped mask broadcasts on the right."""
    return w.reshape(w.shape + (1,) * (ndim - w.ndim))


class Loss:
    """Base class: a per-entry loss ``l`` and its derivative ``dl/dpred``, averaged."""

    name = "loss"

    def _per_entry(self, pred: Array, target: Array) -> Array:
        raise NotImplementedError

    def _per_entry_grad(self, pred: Array, target: Array) -> Array:
        """d l / d pred, entry by entry (the shape of pred)."""
        raise NotImplementedError

    def _check(self, pred: Array, target: Array) -> None:
        if tuple(pred.shape) != tuple(target.shape):
            raise ShapeError(
                f"{self.name}: target has shape {tuple(target.shape)} but pred has shape "
                f"{tuple(pred.shape)}; they must match."
            )

    def _weights(self, shape: tuple[int, ...], where: Array | None, dtype) -> tuple[Array, Array]:
        """Per-entry weights broadcast to ``shape``, and their sum (the mean's denominator)."""
        if where is None:
            return jnp.ones((), dtype), jnp.asarray(float(np.prod(shape)), dtype)
        where = jnp.asarray(where)
        if where.ndim > len(shape) or tuple(where.shape) != tuple(shape[: where.ndim]):
            raise ShapeError(
                f"{self.name}: where has shape {tuple(where.shape)} but the per-entry loss has "
                f"shape {tuple(shape)}; where must be that shape or a prefix of it."
            )
        w = jnp.broadcast_to(_expand_to(where.astype(dtype), len(shape)), shape)
        total = jnp.sum(w)
        return w, jnp.where(total > 0, total, jnp.ones_like(total))

    def __call__(self, pred: Array, target: Array, where: Array | None = None) -> Array:
        self._check(pred, target)
        per_entry = self._per_entry(pred, target)
        w, total = self._weights(per_entry.shape, where, per_entry.dtype)
        return jnp.sum(per_entry * w) / total

    def backward(self, pred: Array, target: Array, where: Array | None = None) -> Array:
        """dpred = w · dl/dpred / Σw: the gradient of the (masked) mean, the shape of pred."""
        self._check(pred, target)
        shape = pred.shape if self._per_entry_ndim(pred) == pred.ndim else pred.shape[:-1]
        w, total = self._weights(tuple(shape), where, pred.dtype)
        return self._per_entry_grad(pred, target) * _expand_to(w, pred.ndim) / total

    def _per_entry_ndim(self, pred: Array) -> int:
        return pred.ndim


@dataclasses.dataclass(frozen=True)
class MSE(Loss):
    """Mean squared error, mean over all elements: l = (p - t)², dl/dp = 2(p - t)."""

    name = "mse"

    def _per_entry(self, pred, target):
        return jnp.square(pred - target)

    def _per_entry_grad(self, pred, target):
        return 2 * (pred - target)


@dataclasses.dataclass(frozen=True)
class Huber(Loss):
    """Huber loss, mean over all elements (as ``optax.huber_loss``).

    l = ½e² if |e| <= δ else δ(|e| - ½δ), e = p - t;  dl/dp = clip(e, -δ, δ).

    Args:
      delta: where the quadratic part turns linear (> 0).
    """

    delta: float = 1.0
    name = "huber"

    def __post_init__(self):
        if not self.delta > 0:
            raise ValueError(f"huber: delta must be > 0, got {self.delta!r}.")

    def _per_entry(self, pred, target):
        e = jnp.abs(pred - target)
        quad = jnp.minimum(e, self.delta)
        return 0.5 * quad * quad + self.delta * (e - quad)

    def _per_entry_grad(self, pred, target):
        return jnp.clip(pred - target, -self.delta, self.delta)


@dataclasses.dataclass(frozen=True)
class SigmoidBinaryCrossEntropy(Loss):
    """Binary cross-entropy on logits, mean over all elements; stable for any |z|.

    l = max(z, 0) - z t + log(1 + e^-|z|);  dl/dz = σ(z) - t.
    Targets are probabilities in [0, 1] with the shape of the logits.
    """

    name = "sigmoid_binary_cross_entropy"

    def _per_entry(self, pred, target):
        target = target.astype(pred.dtype)
        return jnp.maximum(pred, 0) - pred * target + jnp.log1p(jnp.exp(-jnp.abs(pred)))

    def _per_entry_grad(self, pred, target):
        return jax.nn.sigmoid(pred) - target.astype(pred.dtype)


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(Loss):
    """Cross-entropy of softmax(logits), mean over the batch; stable for any |z|.

    Targets are integer labels of shape ``pred.shape[:-1]`` in [0, classes), or
    probabilities (one-hot or soft) of the shape of ``pred``.

    l = logsumexp(z) - Σ t z;  dl/dz = softmax(z) Σt - t.

    A label outside [0, classes) raises ValueError when the labels are concrete;
    under jit the example's loss and gradient are NaN, so it is never silently
    wrapped (the runner checks labels on the host before compiling).
    """

    name = "softmax_cross_entropy"

    def _per_entry_ndim(self, pred):
        return pred.ndim - 1

    def _check(self, pred, target):
        if pred.ndim < 1:
            raise ShapeError(f"{self.name}: pred (logits) must have a class axis, got shape ().")
        if jnp.issubdtype(target.dtype, jnp.integer):
            if tuple(target.shape) != tuple(pred.shape[:-1]):
                raise ShapeError(
                    f"{self.name}: integer labels have shape {tuple(target.shape)} but logits "
                    f"of shape {tuple(pred.shape)} need labels of shape {tuple(pred.shape[:-1])}."
                )
            if not isinstance(target, jax.core.Tracer):
                labels = np.asarray(target)
                bad = (labels < 0) | (labels >= pred.shape[-1])
                if bad.any():
                    i = int(np.argmax(bad.reshape(-1)))
                    raise ValueError(
                        f"{self.name}: label {int(labels.reshape(-1)[i])} at flat index {i} is "
                        f"outside [0, {pred.shape[-1]}) for logits of shape {tuple(pred.shape)}."
                    )
        elif tuple(target.shape) != tuple(pred.shape):
            raise ShapeError(
                f"{self.name}: probability targets have shape {tuple(target.shape)} but logits "
                f"have shape {tuple(pred.shape)}; pass integer labels of shape "
                f"{tuple(pred.shape[:-1])} or probabilities of shape {tuple(pred.shape)}."
            )

    def _probs_target(self, pred, target) -> tuple[Array, Array]:
        """Target as probabilities, and a validity mask per example (False: bad label)."""
        if jnp.issubdtype(target.dtype, jnp.integer):
            classes = pred.shape[-1]
            valid = (target >= 0) & (target < classes)
            return jax.nn.one_hot(target, classes, dtype=pred.dtype), valid
        return target.astype(pred.dtype), jnp.ones(pred.shape[:-1], bool)

    def _per_entry(self, pred, target):
        t, valid = self._probs_target(pred, target)
        lse = jax.nn.logsumexp(pred, axis=-1)
        per_example = lse * jnp.sum(t, axis=-1) - jnp.sum(t * pred, axis=-1)
        return jnp.where(valid, per_example, jnp.nan)

    def _per_entry_grad(self, pred, target):
        t, valid = self._probs_target(pred, target)
        g = jax.nn.softmax(pred, axis=-1) * jnp.sum(t, axis=-1, keepdims=True) - t
        return jnp.where(valid[..., None], g, jnp.nan)


@dataclasses.dataclass(frozen=True)
class CausalLMLoss(Loss):
    """Next-token cross-entropy of (batch, time, vocab) logits; ignored targets are masked.

    Targets are token ids (batch, time): ``target[b, t]`` is the token that follows
    position t (the input shifted left by one; ``lm_targets`` builds them). Entries
    equal to ``ignore_index`` (padding, or a prompt that is not to be predicted) leave
    the mean through ``softmax_cross_entropy``'s ``where=``: the loss is the mean over
    the remaining tokens, and their logits get zero gradient. An optional ``where``
    multiplies that mask.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.zeros((1, 3, 4))
      >>> round(float(causal_lm_loss(logits, jnp.array([[2, 1, -1]]))), 4)  # log 4
      1.3863
      >>> float(jnp.abs(causal_lm_loss.backward(logits, jnp.array([[2, 1, -1]]))[0, 2]).max())
      0.0
    """

    ignore_index: int = -1
    name = "causal_lm_loss"

    def _masked(self, target: Array, where: Array | None) -> tuple[Array, Array]:
        """(target with ignored entries set to 0, the where= of the cross-entropy)."""
        target = jnp.asarray(target)
        if not jnp.issubdtype(target.dtype, jnp.integer):
            raise ShapeError(
                f"{self.name}: target has dtype {target.dtype} but expected integer token ids."
            )
        valid = target != self.ignore_index
        if where is not None:
            valid = valid * _expand_to(jnp.asarray(where), valid.ndim)
        return jnp.where(target == self.ignore_index, 0, target), valid

    def __call__(self, pred: Array, target: Array, where: Array | None = None) -> Array:
        target, w = self._masked(target, where)
        return softmax_cross_entropy(pred, target, w)

    def backward(self, pred: Array, target: Array, where: Array | None = None) -> Array:
        """dpred = w · (softmax(pred) − onehot(target)) / Σw, shape (batch, time, vocab)."""
        target, w = self._masked(target, where)
        return softmax_cross_entropy.backward(pred, target, w)


def lm_targets(ids: Any, lengths: Any = None, ignore_index: int = -1):
    """Inputs and next-token targets of a causal language model, on the host (NumPy).

    Args:
      ids: token ids, shape (batch, time + 1).
      lengths: valid tokens per row, shape (batch,), or None (all valid).
      ignore_index: the target of positions with no next token.

    Returns:
      ``(x, y)``, each (batch, time): x = ids[:, :-1]; y = ids[:, 1:], with
      y[b, t] = ignore_index where t + 1 >= lengths[b].

    Examples:
      >>> import numpy as np
      >>> x, y = lm_targets(np.array([[5, 6, 7, 0]]), lengths=np.array([3]))
      >>> x.tolist(), y.tolist()
      ([[5, 6, 7]], [[6, 7, -1]])
    """
    ids = np.asarray(ids)
    x, y = ids[:, :-1], ids[:, 1:].copy()
    if lengths is not None:
        pos = np.arange(1, ids.shape[1])[None, :]
        y[pos >= np.asarray(lengths)[:, None]] = ignore_index
    return x, y


mse = MSE()
huber = Huber()
sigmoid_binary_cross_entropy = SigmoidBinaryCrossEntropy()
softmax_cross_entropy = SoftmaxCrossEntropy()
causal_lm_loss = CausalLMLoss()


def accuracy(logits: Array, labels: Array, where: Array | None = None) -> Array:
    """Fraction of argmax(logits) == labels; logits (..., classes), labels (...)."""
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    if where is None:
        return jnp.mean(hits)
    w = jnp.asarray(where, jnp.float32)
    return jnp.sum(hits * w) / jnp.maximum(jnp.sum(w), 1.0)


# ----------------------------------------------------------------------------- penalties


def is_weight(path: tuple[Any, ...]) -> bool:
    """Penalised leaves: those whose dict key starts with ``w`` (``w``, ``w_ih``, ``w_hh``).

    Biases, norm scales and running statistics are not penalised.
    """
    last = path[-1] if path else None
    return str(getattr(last, "key", "")).startswith("w")


@dataclasses.dataclass(frozen=True)
class Penalty:
    """A weight penalty ``coef · Σ_w r(w)`` over the weight leaves, with its gradient.

    Use ``l1(coef)`` or ``l2(coef)``.
    """

    kind: str
    coef: float

    def __post_init__(self):
        if self.kind not in ("l1", "l2"):
            raise ValueError(f"Penalty: kind must be 'l1' or 'l2', got {self.kind!r}.")
        if not self.coef >= 0:
            raise ValueError(f"{self.kind}: coef must be >= 0, got {self.coef!r}.")

    def _r(self, w):
        return jnp.sum(jnp.abs(w)) if self.kind == "l1" else 0.5 * jnp.sum(w * w)

    def _dr(self, w):
        return jnp.sign(w) if self.kind == "l1" else w

    def __call__(self, params: Any) -> Array:
        leaves = [
            self._r(w) for path, w in jax.tree_util.tree_leaves_with_path(params) if is_weight(path)
        ]
        return self.coef * sum(leaves) if leaves else jnp.zeros(())

    def backward(self, params: Any) -> Any:
        """d/dw: coef·sign(w) (l1) or coef·w (l2) on weight leaves; zeros elsewhere."""
        return jax.tree_util.tree_map_with_path(
            lambda p, w: self.coef * self._dr(w) if is_weight(p) else jnp.zeros_like(w), params
        )


def l1(coef: float) -> Penalty:
    """L1 penalty coef·Σ|w| (gradient coef·sign(w), 0 at w = 0)."""
    return Penalty("l1", coef)


def l2(coef: float) -> Penalty:
    """L2 penalty ½·coef·Σw² (gradient coef·w): classic weight decay."""
    return Penalty("l2", coef)
