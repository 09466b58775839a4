"""The gradient-parity harness: check hand-written backward rules against JAX autodiff.

This is the one module of fbp that uses JAX autodiff (``jax.vjp``, ``jax.grad``):
as the reference. Point it at your own layer, loss or model:

    from fbp import testing
    testing.assert_layer_parity(MyLayer(8), x)          # raises AssertionError with a table
    report = testing.check_layer(MyLayer(8), x)         # or inspect the per-leaf errors
    print(report)

Comparisons are leaf by leaf. The error of a leaf is
``max|fbp - ref| / max(max|ref|, floor)``, a relative error that does not blow up
on entries that are zero. Run in float64 for the ~1e-10 tolerances (inputs and
params in float64 inside ``with jax.enable_x64(True):``, which leaves the rest of the
process in float32); in float32 expect ~1e-5.

Besides autodiff, each check also compares with central finite differences in a
random direction ``v``: ``(f(θ+εv) - f(θ-εv)) / 2ε`` against ``<grad, v>``, which
catches a reference that is itself wrong (e.g. a layer whose forward misuses
``stop_gradient``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import Layer, Sequential, layer_name, loss_fn, value_and_grad
from fbp.losses import Loss


@dataclasses.dataclass
class ParityReport:
    """Per-leaf relative errors of the hand-written gradient against the references."""

    name: str
    errors: dict[str, float]  # leaf path -> relative error against autodiff
    fd_error: float  # relative error of <grad, v> against finite differences
    rtol: float
    fd_rtol: float

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.rtol and self.fd_error <= self.fd_rtol

    def __str__(self) -> str:
        width = max([len(k) for k in self.errors] + [4])
        lines = [f"parity of {self.name} (rtol {self.rtol:g}, fd_rtol {self.fd_rtol:g})"]
        for k, e in self.errors.items():
            flag = "" if e <= self.rtol else "   <-- FAIL"
            lines.append(f"  {k:<{width}}  {e:.3e}{flag}")
        flag = "" if self.fd_error <= self.fd_rtol else "   <-- FAIL"
        lines.append(f"  {'finite differences':<{width}}  {self.fd_error:.3e}{flag}")
        return "\n".join(lines)


def rel_error(a: Any, b: Any, floor: float = 1e-30) -> float:
    """max|a - b| / max(max|b|, floor), in float64 on the host."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs reference {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(b))), floor)
    return float(np.max(np.abs(a - b))) / scale


def _leaf_errors(prefix: str, got: Any, ref: Any) -> dict[str, float]:
    got_s, ref_s = jax.tree.structure(got), jax.tree.structure(ref)
    if got_s != ref_s:  # type: ignore[operator]  # jaxlib stub: PyTreeDef unresolved
        raise AssertionError(f"{prefix}: tree structure {got_s} differs from reference {ref_s}")
    out = {}
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref), strict=True
    ):
        out[prefix + jax.tree_util.keystr(path)] = rel_error(g, r)
    return out


def _random_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, v.shape, v.dtype)
            if jnp.issubdtype(v.dtype, jnp.floating)
            else jnp.zeros(v.shape, v.dtype)
            for k, v in zip(keys, leaves, strict=True)
        ],
    )


def _vdot(a, b) -> float:
    return float(
        sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    )


def _axpy(t, a, b):
    return jax.tree.map(
        lambda u, v: u + t * v if jnp.issubdtype(u.dtype, jnp.floating) else u, a, b
    )


def _fd_error(f: Callable, theta: Any, grad: Any, key, eps: float) -> float:
    """Relative error of <grad, v> vs central differences of scalar f along random v."""
    v = _random_like(key, theta)
    fd = (float(f(_axpy(eps, theta, v))) - float(f(_axpy(-eps, theta, v)))) / (2 * eps)
    an = _vdot(grad, v)
    return abs(fd - an) / max(abs(fd), abs(an), 1e-12)


def _default_tols(dtype) -> tuple[float, float, float]:
    """(rtol, fd_rtol, eps) for the dtype of the check."""
    if dtype == jnp.float64:
        return 1e-10, 1e-5, 1e-6
    return 1e-4, 5e-2, 1e-2


def _tols(dtype, rtol: float | None, fd_rtol: float | None) -> tuple[float, float, float]:
    """The given tolerances (0 included: exact agreement), else the dtype's defaults."""
    d_rtol, d_fd, eps = _default_tols(dtype)
    return (d_rtol if rtol is None else rtol), (d_fd if fd_rtol is None else fd_rtol), eps


def check_layer(
    layer: Layer,
    x: Any,
    *,
    params: Any = None,
    key: Any = None,
    state: Any = None,
    train: bool = False,
    lengths: Any = None,
    frozen: bool = False,
    seed: int = 0,
    rtol: float | None = None,
    fd_rtol: float | None = None,
) -> ParityReport:
    """Compare ``layer.backward`` with ``jax.vjp`` of ``layer.apply`` for a random dy.

    Args:
      layer: any fbp layer.
      x: input, shape what the layer takes; integer inputs get no dx check.
      params: parameters (default ``layer.init(PRNGKey(seed), x)``).
      key, state, train: passed to forward/apply (same key => same dropout mask).
      lengths: (batch,) valid steps of padded sequences, passed to forward/apply
        (the layer must take it); None: not passed.
      frozen: the layer holds its parameters fixed (``nn.Frozen``, or a layer built
        around frozen ones only): its dparams must be exactly zero, and dx alone is
        compared with autodiff and with finite differences.
      seed: seeds the parameters, dy and the finite-difference direction.
      rtol, fd_rtol: tolerances (defaults by dtype: 1e-10/1e-5 in float64; 0 asks
        for exact agreement).

    Returns:
      A ParityReport with one error per leaf of dparams and for dx.
    """
    k_init, k_dy, k_fd = jax.random.split(jax.random.key(seed), 3)
    params = layer.init(k_init, x) if params is None else params
    kw = dict(key=key, state=state, train=train)
    if lengths is not None:
        kw["lengths"] = lengths
    ref_params = jax.lax.stop_gradient if frozen else (lambda p: p)
    diff_x = jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    y_shape = jax.eval_shape(lambda p, v: layer.forward(p, v, **kw)[0], params, x)
    dy = _random_like(k_dy, y_shape)

    @jax.jit
    def hand(params, x, dy):
        y, res = layer.forward(params, x, **kw)
        return (y, *layer.backward(params, res, dy))

    @jax.jit
    def reference(params, x, dy):
        if diff_x:
            y, vjp = jax.vjp(lambda p, v: layer.apply(ref_params(p), v, **kw), params, x)
            return (y, *vjp(dy))
        y, vjp = jax.vjp(lambda p: layer.apply(ref_params(p), x, **kw), params)
        return (y, *vjp(dy), None)

    y, dparams, dx = hand(params, x, dy)
    y_ref, ref_dp, ref_dx = reference(params, x, dy)
    errors = {"y (forward vs apply)": rel_error(y, y_ref)}
    errors.update(_leaf_errors("dparams", dparams, ref_dp))
    if diff_x:
        errors["dx"] = rel_error(dx, ref_dx)

    rtol, fd_rtol, eps = _tols(jnp.asarray(y).dtype, rtol, fd_rtol)
    dx_or_zero = dx if diff_x else jnp.zeros_like(x)
    if frozen:  # finite differences along x only: the params are not being differentiated

        @jax.jit
        def f_x(v):
            return jnp.vdot(layer.apply(params, v, **kw), dy)

        fd = _fd_error(f_x, x, dx_or_zero, k_fd, eps) if diff_x else 0.0
    else:

        @jax.jit
        def f(theta):
            p, v = theta
            return jnp.vdot(layer.apply(p, v, **kw), dy)

        fd = _fd_error(f, (params, x), (dparams, dx_or_zero), k_fd, eps)
    return ParityReport(layer_repr(layer), errors, fd, rtol, fd_rtol)


def check_model(
    model: Layer,
    loss: Loss,
    x: Any,
    target: Any,
    *,
    params: Any = None,
    seed: int = 0,
    rtol: float | None = None,
    fd_rtol: float | None = None,
    **kwargs,
) -> ParityReport:
    """Compare ``fbp.value_and_grad(model, loss)`` with ``jax.value_and_grad`` of ``fbp.loss_fn``.

    Args:
      model, loss: what to check; ``x``, ``target``: a batch.
      params: parameters (default ``model.init(PRNGKey(seed), x)``).
      **kwargs: ``key``, ``state``, ``train``, ``lengths``, passed to both.
      rtol, fd_rtol: tolerances (defaults by dtype; 0 asks for exact agreement).
    """
    k_init, k_fd = jax.random.split(jax.random.key(seed))
    params = model.init(k_init, x) if params is None else params
    value, grads = jax.jit(lambda p: value_and_grad(model, loss)(p, x, target, **kwargs))(params)
    f = loss_fn(model, loss)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(lambda p: f(p, x, target, **kwargs)))(params)
    errors = {"loss": rel_error(value, ref_value)}
    errors.update(_leaf_errors("grads", grads, ref_grads))
    rtol, fd_rtol, eps = _tols(jnp.asarray(value).dtype, rtol, fd_rtol)
    fd = _fd_error(jax.jit(lambda p: f(p, x, target, **kwargs)), params, grads, k_fd, eps)
    name = f"{layer_repr(model)} + {getattr(loss, 'name', loss)}"
    return ParityReport(name, errors, fd, rtol, fd_rtol)


def check_loss(
    loss: Loss,
    pred: Any,
    target: Any,
    *,
    where: Any = None,
    seed: int = 0,
    rtol: float | None = None,
    fd_rtol: float | None = None,
) -> ParityReport:
    """Compare ``loss.backward`` with ``jax.grad`` of ``loss`` at ``pred``.

    pred: shape (batch, ...); target: as the loss takes it.
    """
    value = jax.jit(lambda p: loss(p, target, where))
    got = jax.jit(lambda p: loss.backward(p, target, where))(pred)
    ref = jax.jit(jax.grad(value))(pred)
    errors = {"dpred": rel_error(got, ref)}
    rtol, fd_rtol, eps = _tols(jnp.asarray(pred).dtype, rtol, fd_rtol)
    fd = _fd_error(value, pred, got, jax.random.key(seed), eps)
    return ParityReport(getattr(loss, "name", repr(loss)), errors, fd, rtol, fd_rtol)


def assert_parity(report: ParityReport) -> ParityReport:
    """Raise AssertionError with the per-leaf table unless every error is within tolerance."""
    if not report.ok:
        raise AssertionError("gradient parity failed:\n" + str(report))
    return report


def assert_layer_parity(layer: Layer, x: Any, **kwargs) -> ParityReport:
    """``assert_parity(check_layer(layer, x, **kwargs))``: for use in pytest."""
    return assert_parity(check_layer(layer, x, **kwargs))


def assert_model_parity(model: Layer, loss: Loss, x: Any, target: Any, **kwargs):
    """``assert_parity(check_model(model, loss, x, target, **kwargs))``."""
    return assert_parity(check_model(model, loss, x, target, **kwargs))


def assert_loss_parity(loss: Loss, pred: Any, target: Any, **kwargs) -> ParityReport:
    """``assert_parity(check_loss(loss, pred, target, **kwargs))``."""
    return assert_parity(check_loss(loss, pred, target, **kwargs))


def layer_repr(layer: Any) -> str:
    if isinstance(layer, Sequential):
        return "Sequential[" + ", ".join(layer_repr(sub) for sub in layer.layers) + "]"
    return layer_name(layer)
