"""Per-example gradients, their norms and their moments, from ONE backward pass.

Convention. The batch loss is a mean, ``L = (1/B) Σ_b L_b``; the per-example
gradient of example b is ``g_b = ∇L_b``, the gradient of that example's own loss
term, so ``mean_b g_b`` is the batch gradient (``fbp.value_and_grad``'s). For the
usual losses (a mean over the batch, or over every entry of equally sized
examples) ``L_b = loss(model(x_b), y_b)``. For a masked loss, ``L_b`` is B times
example b's share of the batch loss. Per-example gradients are of the loss alone
(no weight penalty).

How. The model's forward keeps its residuals; the loss's hand-written backward
gives ``dL/dpred``, scaled by B; then ``registry.walk`` runs the layers' backward
rules once, keeping each layer's input and output delta, and every quantity is read
from those (see ``fbp.extend.registry`` for the table, ``layer_rules`` for the maths).
The model is never vmapped; a layer without a rule, or one that mixes examples
(BatchNorm in train mode), is refused before anything is traced.

| name | value | BackPACK equivalent (mean loss) |
| --- | --- | --- |
| ``grad`` | ``mean_b g_b``: the batch gradient | ``.grad`` |
| ``batch_grad`` | ``g_b``, each leaf (batch, *leaf) | ``B ·`` ``BatchGrad`` |
| ``batch_l2`` | ``‖g_b‖²`` per leaf, each (batch,) | ``B² ·`` ``BatchL2Grad`` |
| ``grad_norm`` | ``‖g_b‖`` over all leaves, (batch,) | |
| ``sum_grad_squared`` | ``Σ_b g_b²`` per entry | ``B² ·`` ``SumGradSquared`` |
| ``variance`` | ``mean_b g_b² - (mean_b g_b)²`` per entry | ``B² ·`` ``Variance`` |

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from fbp import extend, losses, nn
  >>> model = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(3)])
  >>> x, labels = jnp.ones((8, 2)), jnp.arange(8) % 3
  >>> params = model.init(jax.random.key(0), x)
  >>> value, g = extend.per_example_grads(model, losses.softmax_cross_entropy)(params, x, labels)
  >>> g['0']['w'].shape
  (8, 2, 4)
  >>> value, norms = extend.per_example_norms(model, losses.softmax_cross_entropy)(
  ...     params, x, labels)
  >>> norms.shape
  (8,)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import Array, Layer, LossFunction, Params, State, sum_arrays
from fbp.extend import (  # noqa: F401  (register the rules)
    attention_rules,
    container_rules,
    layer_rules,
    recurrent_rules,
)
from fbp.extend.registry import Node, check, quantity, walk

NAMES = ("grad", "batch_grad", "batch_l2", "grad_norm", "sum_grad_squared", "variance")


class Walked(NamedTuple):
    """The result of one forward and one walked backward."""

    value: Array  # scalar batch loss (the mean)
    pred: Array  # model output
    state: State | None  # running state after the forward (None when none was given)
    node: Node  # the walk, to read quantities from
    batch: int  # B


def forward_and_walk(
    model: Layer,
    loss: LossFunction,
    params: Params,
    x: Any,
    target: Any,
    *,
    key: Array | None = None,
    state: State | None = None,
    train: bool = True,
    lengths: Array | None = None,
) -> Walked:
    """Forward, loss, and one walked backward seeded with ``B · dL/dpred``.

    Quantities read from the node are then per example in the convention of this
    module (``g_b = ∇L_b``). ``check(model, train=train)`` is the caller's job.
    """
    check_padded_targets(loss, target, lengths)
    kw = {} if lengths is None else {"lengths": lengths}
    pred, res = model.forward(params, x, key=key, state=state, train=train, **kw)
    value = loss(pred, target)
    batch = pred.shape[0]
    dpred = loss.backward(pred, target) * jnp.asarray(batch, pred.dtype)
    _, node = walk(model, params, res, dpred)
    return Walked(value, pred, model.next_state(state, res), node, batch)


def check_padded_targets(loss: LossFunction, target: Any, lengths: Any) -> None:
    """ValueError if a step that ``lengths`` marks as padding has a target the loss counts.

    Only for losses with an ``ignore_index`` (``causal_lm_loss``), targets of shape
    (batch, T, ...) and lengths of shape (batch,), and only when both are concrete
    (under ``jit`` nothing is checked). Padded steps must contribute nothing, so their
    targets must be ``ignore_index``.

    Raises:
      ValueError: naming the loss, the first offending (example, step) and the fix.
    """
    ignore = getattr(loss, "ignore_index", None)
    if lengths is None or ignore is None:
        return
    try:
        t, n = np.asarray(target), np.asarray(lengths)
    except jax.errors.TracerArrayConversionError:
        return
    if t.ndim < 2 or n.ndim != 1 or t.shape[0] != n.shape[0]:
        return
    padded = np.arange(t.shape[1]).reshape(1, -1, *(1,) * (t.ndim - 2)) >= n.reshape(-1, 1)
    bad = np.argwhere(padded & (t != ignore))
    if len(bad):
        b, s = (int(i) for i in bad[0][:2])
        raise ValueError(
            f"fbp.extend: {getattr(loss, 'name', loss)}: target[{b}, {s}] is not ignore_index "
            f"({ignore}) but step {s} is padding (lengths[{b}] = {int(n[b])}), so a padded "
            f"step would contribute to example {b}'s gradient; set the targets of padded "
            "steps to ignore_index (as losses.lm_targets does)."
        )


def total_sq_norms(batch_l2: Params) -> Array:
    """Σ over leaves of per-leaf squared norms: tree of (batch,) -> (batch,)."""
    return sum_arrays(jax.tree.leaves(batch_l2))


def _read(w: Walked, names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    inv_b = jnp.full((w.batch,), 1.0 / w.batch, w.pred.dtype)
    grad = None
    if {"grad", "variance"} & set(names):
        grad = quantity(w.node, "weighted", inv_b)
    l2 = quantity(w.node, "batch_l2") if {"batch_l2", "grad_norm"} & set(names) else None
    sgs = quantity(w.node, "sum_sq") if {"sum_grad_squared", "variance"} & set(names) else None
    for name in names:
        if name == "grad":
            out[name] = grad
        elif name == "batch_grad":
            out[name] = quantity(w.node, "batch_grad")
        elif name == "batch_l2":
            out[name] = l2
        elif name == "grad_norm":
            out[name] = jnp.sqrt(total_sq_norms(l2))
        elif name == "sum_grad_squared":
            out[name] = sgs
        elif name == "variance":
            out[name] = jax.tree.map(lambda s, g: s / w.batch - g * g, sgs, grad)
    return out


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    bad = [n for n in names if n not in NAMES]
    if bad or not names:
        raise ValueError(
            f"fbp.extend.quantities: unknown or no quantities {bad or list(names)}; "
            f"expected some of {list(NAMES)}."
        )
    return names


def quantities(model: Layer, loss: LossFunction, names: Sequence[str]) -> Callable:
    """Several per-example quantities from one forward and one backward pass.

    Args:
      model: an fbp model whose layers all have per-example rules (checked now).
      loss: an fbp loss (a mean over the batch).
      names: some of ``NAMES`` (see the module docstring).

    Returns:
      ``f(params, x, target, *, key=None, state=None, train=True, lengths=None)``
      returning ``(loss, {name: value})``; pure and jit-safe.

    Raises:
      UnsupportedLayerError: a layer has no rule (now), or mixes examples in the
        mode ``f`` is called in (when called, before anything is traced).
      ValueError: an unknown quantity name.
    """
    names = _check_names(names)
    check(model, train=False)

    def f(params, x, target, *, key=None, state=None, train=True, lengths=None):
        check(model, train=train)
        w = forward_and_walk(
            model, loss, params, x, target, key=key, state=state, train=train, lengths=lengths
        )
        return w.value, _read(w, names)

    return f


def per_example_grads(model: Layer, loss: LossFunction) -> Callable:
    """``f(params, x, target, ...) -> (loss, grads)``, each leaf (batch, *leaf): ``∇L_b``.

    The mean over the batch axis is the batch gradient. See ``quantities``.
    """
    f = quantities(model, loss, ("batch_grad",))

    def g(params, x, target, *, key=None, state=None, train=True, lengths=None):
        kw = dict(key=key, state=state, train=train, lengths=lengths)
        value, q = f(params, x, target, **kw)
        return value, q["batch_grad"]

    return g


def per_example_norms(model: Layer, loss: LossFunction, *, per_leaf: bool = False) -> Callable:
    """``f(params, x, target, ...) -> (loss, norms)``: ``‖∇L_b‖`` without forming ``∇L_b``.

    Args:
      per_leaf: return the squared norm of each parameter leaf instead, a tree of
        (batch,) arrays (BackPACK's ``BatchL2Grad`` times B²).

    Returns:
      norms, shape (batch,): the L2 norm over all parameters, per example.
    """
    f = quantities(model, loss, ("batch_l2",) if per_leaf else ("grad_norm",))

    def g(params, x, target, *, key=None, state=None, train=True, lengths=None):
        kw = dict(key=key, state=state, train=train, lengths=lengths)
        value, q = f(params, x, target, **kw)
        return value, q["batch_l2" if per_leaf else "grad_norm"]

    return g
