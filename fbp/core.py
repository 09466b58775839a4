"""The layer protocol, `Sequential`, and the composed hand-written gradient.

Every layer is a frozen dataclass of static hyperparameters (never arrays) with
pure, jit-safe methods:

    init(key, x)                          -> params      # nested dict; {} when none
    init_state(x)                         -> state       # running statistics; {} when none
    apply(params, x, *, key, state, train) -> y
    forward(params, x, *, key, state, train) -> (y, res) # res: what backward reads
    backward(params, res, dy)             -> (dparams, dx)
    next_state(state, res)                -> state       # new running statistics

Invariants, checked for every layer by the parity suite:

* ``forward(params, x)[0] == apply(params, x)``.
* ``backward`` is the vector-Jacobian product of ``forward``, written by hand:
  ``dparams`` has exactly the tree structure of ``params`` (zeros, never None) and
  ``dx`` the shape of ``x``.
* ``key`` (a PRNG key or None), ``state`` (a pytree or None) and ``train`` (a Python
  bool) are keyword-only and the same for every layer; a layer that needs none of
  them ignores them. ``train`` is static: it selects code, it is never traced.
* Shapes and hyperparameters are checked in Python, at trace time; nothing
  branches on array values.

Padded sequences: ``lengths``, an int array of shape (batch,), is one more keyword
of ``apply`` and ``forward`` (never of ``backward``: a layer that reads it keeps it
in its residuals). The rule is one and the same everywhere:

* a layer *takes* ``lengths`` when its ``forward`` has that keyword
  (``takes_lengths``): the sequence layers (recurrent layers, ``LastStep``) and every
  layer built around other layers (``Sequential``, ``Residual``, ``Bidirectional``,
  ``Frozen``, ``Recompute``);
* a layer built around others hands ``lengths`` unchanged to each inner layer that
  takes it and to no other (``lengths_kw``), so ``Bidirectional(Frozen(GRU(8)))``
  masks the GRU's padded steps and a ``Dense`` inside a ``Sequential`` never sees it
  (it acts on each step alone);
* ``value_and_grad`` and ``loss_fn`` hand it to the model, which must take it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from fbp.precision import Policy, get_policy

Array = jax.Array
PRNGKey = jax.Array  # a key from jax.random.key (or a legacy uint32 key), as chex.PRNGKey
PyTree = Any  # nested dicts, lists, tuples and NamedTuples of arrays
Params = PyTree  # nested dict of arrays
State = PyTree  # nested dict of arrays (running statistics), {} when none
Residuals = PyTree  # a pytree per layer, usually a NamedTuple
Shaped = Array | jax.ShapeDtypeStruct  # what init/init_state/output_shape read: shape, dtype


class LossFunction(Protocol):
    """What the gradient functions need of a loss: its value and its hand-written gradient.

    Every loss in ``fbp.losses`` is one: ``loss(pred, target) -> scalar`` (the mean over
    the batch) and ``loss.backward(pred, target) -> dpred``, the shape of ``pred``.
    """

    def __call__(self, pred: Array, target: Array) -> Array: ...

    def backward(self, pred: Array, target: Array) -> Array: ...


class PenaltyFunction(Protocol):
    """A weight penalty and its hand-written gradient (``fbp.losses.l1``, ``l2``)."""

    def __call__(self, params: Params) -> Array: ...

    def backward(self, params: Params) -> Params: ...


class ShapeError(ValueError):
    """A layer got an input whose shape or dtype does not fit its parameters."""


def layer_name(layer: Any) -> str:
    """Short name of a layer for messages, e.g. ``Dense(10)``."""
    fields = dataclasses.fields(layer) if dataclasses.is_dataclass(layer) else ()
    if fields and not isinstance(layer, Sequential):
        return f"{type(layer).__name__}({getattr(layer, fields[0].name)!r})"
    return f"{type(layer).__name__}()"


def check_ndim(layer: Any, method: str, name: str, x: Any, ndims: Sequence[int], what: str):
    """Raise ShapeError unless ``x.ndim`` is one of ``ndims``; x: an array of any shape."""
    if x.ndim not in ndims:
        raise ShapeError(
            f"{layer_name(layer)}.{method}: {name} has shape {tuple(x.shape)} but expected "
            f"{what} ({' or '.join(str(n) for n in ndims)} dims)."
        )


def check_last_dim(layer: Any, method: str, name: str, x: Any, size: int, what: str):
    """Raise ShapeError unless ``x`` has shape (..., size)."""
    if x.ndim < 1 or x.shape[-1] != size:
        raise ShapeError(
            f"{layer_name(layer)}.{method}: {name} has shape {tuple(x.shape)} but {what} "
            f"expects (..., {size})."
        )


class Layer:
    """Base class: defaults for layers without parameters, state or randomness.

    Subclasses are frozen dataclasses and implement at least ``forward`` and
    ``backward``.
    """

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """Parameters for inputs shaped like ``x`` (an array or ShapeDtypeStruct)."""
        del key, x
        return {}

    def init_state(self, x: Shaped) -> State:
        """Initial running state for inputs shaped like ``x``; ``{}`` for most layers."""
        del x
        return {}

    def apply(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> Array:
        """Pure forward pass: ``forward(...)[0]``, without keeping residuals."""
        return self.forward(params, x, key=key, state=state, train=train)[0]

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        raise NotImplementedError

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        raise NotImplementedError

    def next_state(self, state: State | None, res: Residuals) -> State | None:
        """Running state after a forward pass with residuals ``res``; unchanged by default."""
        del res
        return state

    def output_shape(self, params: Params, x: Shaped) -> jax.ShapeDtypeStruct:
        """Shape and dtype of ``apply(params, x)`` without computing it."""
        return jax.eval_shape(lambda p, v: self.apply(p, v), params, as_struct(x))


def as_struct(x: Any) -> jax.ShapeDtypeStruct:
    """The shape and dtype of ``x`` (an array or ShapeDtypeStruct of any shape)."""
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def param_dtype(x: Any):
    """Parameters follow a floating input's dtype; float32 otherwise (e.g. token ids).

    x: an input of any shape (an array or ShapeDtypeStruct); only its dtype is read.
    """
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def split_key(key: Array | None, n: int) -> list[Array | None]:
    """``n`` independent keys from ``key`` (a scalar key, shape ()), or ``n`` Nones."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


@dataclasses.dataclass(frozen=True)
class Sequential(Layer):
    """Layers applied in order; backward runs their backward rules in reverse.

    Params, state and residuals are keyed by position: ``params['0']`` belongs to
    ``layers[0]`` (``{}`` for a layer without parameters).

    Args:
      layers: the layers, first applied first.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> model = nn.Sequential([nn.Dense(3), nn.Tanh(), nn.Dense(1)])
      >>> params = model.init(jax.random.key(0), jnp.ones((5, 2)))
      >>> sorted(params), params['0']['w'].shape
      (['0', '1', '2'], (2, 3))
      >>> y, res = model.forward(params, jnp.ones((5, 2)))
      >>> dparams, dx = model.backward(params, res, jnp.ones_like(y))
      >>> dx.shape
      (5, 2)
    """

    layers: tuple[Layer, ...]

    def __init__(self, layers: Sequence[Layer]):
        layers = tuple(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: layers[{i}] is {layer!r}, not an fbp layer.")
        object.__setattr__(self, "layers", layers)

    def __len__(self) -> int:
        return len(self.layers)

    def _each(self, params, x, key, state, method):
        """Run ``method`` of each layer in turn, naming the failing layer."""
        keys = split_key(key, len(self.layers))
        outs = []
        for i, layer in enumerate(self.layers):
            k = str(i)
            try:
                x, out = method(layer, _get(params, k), x, keys[i], _get(state, k))
            except ShapeError as e:
                raise ShapeError(f"Sequential layer {i}: {e}") from None
            outs.append(out)
        return x, outs

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        def step(layer, _, v, k, __):
            p = layer.init(k, v)
            return layer.output_shape(p, v), p

        _, ps = self._each(None, as_struct(x), key, None, step)
        return {str(i): p for i, p in enumerate(ps)}

    def init_state(self, x: Shaped) -> State:
        def step(layer, p, v, _, __):
            return layer.output_shape(p, v), layer.init_state(v)

        params = jax.eval_shape(self.init, jax.random.key(0), as_struct(x))
        _, ss = self._each(params, as_struct(x), None, None, step)
        return {str(i): s for i, s in enumerate(ss)}

    def output_shape(self, params: Params, x: Shaped) -> jax.ShapeDtypeStruct:
        """Each layer's ``output_shape`` in turn (a layer that needs state to run, such
        as batch norm in eval mode, still reports its shape)."""

        def step(layer, p, v, _, __):
            return layer.output_shape(p, v), None

        return self._each(params, as_struct(x), None, None, step)[0]

    def apply(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
        lengths: Array | None = None,
    ) -> Array:
        """``lengths`` (batch,), for padded sequences, reaches every layer that takes it."""

        def step(layer, p, v, k, s):
            kw = lengths_kw(layer, lengths)
            return layer.apply(p, v, key=k, state=s, train=train, **kw), None

        return self._each(params, x, key, state, step)[0]

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
        lengths: Array | None = None,
    ) -> tuple[Array, Residuals]:
        """``lengths`` (batch,), for padded sequences, reaches every layer that takes it."""

        def step(layer, p, v, k, s):
            kw = lengths_kw(layer, lengths)
            return layer.forward(p, v, key=k, state=s, train=train, **kw)

        y, res = self._each(params, x, key, state, step)
        return y, tuple(res)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """Chain rule: ``dx_i = backward_i(dy_i)``, ``dy_{i-1} = dx_i``, last layer first.

        dy: the cotangent of the output, its shape; returns dx in the shape of x.
        """
        dparams, dx, _ = self.backward_with_deltas(params, res, dy)
        return dparams, dx

    def backward_with_deltas(
        self, params: Params, res: Residuals, dy: Array
    ) -> tuple[Params, Array, tuple[Array, ...]]:
        """``backward`` that also returns each layer's error signal (delta).

        Returns:
          ``(dparams, dx, deltas)``: ``deltas[i]`` is the cotangent of ``layers[i]``'s
          output (dL/dz at a Dense output), the value the chain rule passes anyway.
        """
        dparams: dict[str, Params] = {}
        deltas: list[Any] = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            deltas[i] = dy
            dparams[str(i)], dy = self.layers[i].backward(params[str(i)], res[i], dy)
        return {str(i): dparams[str(i)] for i in range(len(self.layers))}, dy, tuple(deltas)

    def next_state(self, state: State | None, res: Residuals) -> State | None:
        if state is None:
            return None
        return {
            str(i): layer.next_state(state[str(i)], res[i]) for i, layer in enumerate(self.layers)
        }


def sum_arrays(terms: Iterable[Array]) -> Array:
    """``sum`` of one or more arrays, typed as an array; the shapes broadcast as ``+``'s."""
    return functools.reduce(operator.add, terms)


def _get(tree: Any, k: str) -> Any:
    return None if tree is None else tree[k]


def takes_lengths(layer: Layer) -> bool:
    """Whether ``layer.forward`` has the ``lengths=`` keyword (see the module docstring)."""
    return "lengths" in inspect.signature(layer.forward).parameters


def lengths_kw(layer: Layer, lengths: Any) -> dict:
    """``{'lengths': lengths}`` for a layer that takes it, else ``{}``.

    What a layer built around ``layer`` passes on: ``layer.forward(..., **lengths_kw(layer,
    lengths))``. Nothing when ``lengths`` is None.

    Examples:
      >>> from fbp import nn
      >>> sorted(lengths_kw(nn.GRU(4), [3, 1])), lengths_kw(nn.Dense(4), [3, 1])
      (['lengths'], {})
    """
    if lengths is None or not takes_lengths(layer):
        return {}
    return {"lengths": lengths}


def model_lengths_kw(owner: str, model: Layer, lengths: Any) -> dict:
    """``lengths_kw`` for the model of ``value_and_grad``/``loss_fn``, which must take it.

    lengths: valid steps per sequence, shape (batch,), or None.
    """
    if lengths is not None and not takes_lengths(model):
        raise TypeError(
            f"{owner}: lengths= was given but {layer_name(model)}.forward takes no lengths; "
            "only sequence layers and the layers built around them (Sequential, Residual, "
            "Bidirectional, Frozen, Recompute) do."
        )
    return lengths_kw(model, lengths)


def renamed_keyword(owner: str, old: str, old_value: Any, new: str, new_value: Any) -> Any:
    """The value of keyword ``new``, taking a value given under its old name ``old``.

    The old name works for one release, with a DeprecationWarning; giving both is a
    TypeError. A value of None counts as not given.
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"{owner}: got both {new}= and its deprecated name {old}=; pass {new}=.")
    warnings.warn(
        f"{owner}: {old}= is deprecated and will be removed in the next release; use {new}=.",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


class Aux(NamedTuple):
    """Extra outputs of ``value_and_grad(..., has_aux=True)``."""

    pred: Array  # model output, shape of the loss's ``pred``
    state: State | None  # running state after this step (None when none was given)
    deltas: tuple | None = None  # per-layer dL/d(output) with ``with_deltas=True``


def value_and_grad(
    model: Layer,
    loss: LossFunction,
    *,
    penalty: PenaltyFunction | None = None,
    has_aux: bool = False,
    with_deltas: bool = False,
    precision: str | Policy | None = None,
) -> Callable:
    """The loss and its gradient with respect to the parameters, by hand-written backprop.

    Runs ``model.forward``, the loss and ``loss.backward``, then ``model.backward``;
    no JAX autodiff is involved. The result is pure and jit-safe.

    Args:
      model: any fbp layer (usually a ``Sequential``).
      loss: an fbp loss: ``loss(pred, target) -> scalar`` with ``loss.backward``.
      penalty: optional weight penalty (``fbp.losses.l2(...)``) added to the loss.
      has_aux: also return ``Aux(pred, state)`` (the prediction and the new running state).
      with_deltas: return ``((loss, aux), grads)`` (as ``has_aux``) with ``aux.deltas``
        set: for a ``Sequential``, ``deltas[i]`` = dL/d(output of layer i), shape of
        that output; for any other layer, ``(dL/dpred,)``. See ``fbp.diagnostics``.
      precision: "f32" (default: no casting), "bf16-mixed" or "bf16" (``fbp.precision``):
        params and floating inputs are cast to the compute dtype on entry, the loss and
        dL/dpred are float32, and the gradients come back in each parameter's own dtype.

    Returns:
      ``f(params, x, target, *, key=None, state=None, train=True, lengths=None)`` returning
      ``(loss, grads)``, or ``((loss, aux), grads)`` with ``has_aux``; ``grads`` has the
      tree structure of ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(3)])
      >>> x, labels = jnp.ones((8, 2)), jnp.arange(8) % 3
      >>> params = model.init(jax.random.key(0), x)
      >>> value, grads = fbp.value_and_grad(model, losses.softmax_cross_entropy)(params, x, labels)
      >>> grads['0']['w'].shape
      (2, 4)
    """

    policy = get_policy(precision)

    def f(params, x, target, *, key=None, state=None, train=True, lengths=None):
        kw = model_lengths_kw("value_and_grad", model, lengths)
        cparams, cx = policy.cast_to_compute(params), policy.cast_to_compute(x)
        pred, res = model.forward(cparams, cx, key=key, state=state, train=train, **kw)
        pred = policy.cast_to_output(pred)
        value = loss(pred, target)
        dpred = policy.scale_dpred(loss.backward(pred, target))
        if with_deltas and isinstance(model, Sequential):
            grads, _, deltas = model.backward_with_deltas(cparams, res, dpred)
        else:
            (grads, _), deltas = model.backward(cparams, res, dpred), (dpred,)
        grads = policy.grads_like(grads, params)
        if penalty is not None:
            value = value + penalty(params)
            grads = jax.tree.map(jnp.add, grads, penalty.backward(params))
        if with_deltas:
            return (value, Aux(pred, model.next_state(state, res), deltas)), grads
        if has_aux:
            return (value, Aux(pred, model.next_state(state, res))), grads
        return value, grads

    return f


def loss_fn(
    model: Layer,
    loss: LossFunction,
    *,
    penalty: PenaltyFunction | None = None,
    precision: str | Policy | None = None,
) -> Callable:
    """The plain loss ``f(params, x, target, *, key, state, train, lengths) -> scalar``.

    This is what ``jax.grad`` differentiates in the parity suite: the same forward,
    with no hand-written backward in it. ``precision`` casts as ``value_and_grad`` does.

    Examples:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.Sequential([nn.Dense(1)])
      >>> params = model.init(jax.random.key(0), jnp.ones((4, 3)))
      >>> float(fbp.loss_fn(model, losses.mse)(params, jnp.zeros((4, 3)), jnp.zeros((4, 1))))
      0.0
    """

    policy = get_policy(precision)

    def f(params, x, target, *, key=None, state=None, train=True, lengths=None):
        kw = model_lengths_kw("loss_fn", model, lengths)
        cparams, cx = policy.cast_to_compute(params), policy.cast_to_compute(x)
        pred = model.apply(cparams, cx, key=key, state=state, train=train, **kw)
        value = loss(policy.cast_to_output(pred), target)
        if penalty is not None:
            value = value + penalty(params)
        return value

    return f
