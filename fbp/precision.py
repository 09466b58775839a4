"""Precision policies (float32, bfloat16 mixed, bfloat16) and the matmuls they need.

A ``Policy(param_dtype, compute_dtype, output_dtype)`` says in which dtype
parameters are kept, in which the model runs, and in which its output is handed to
the loss (as in jmp). It acts where the model is called (``fbp.value_and_grad``,
``fbp.loss_fn``, ``fbp.train``): parameters and inputs are cast to the compute
dtype, the loss and its derivative run in float32, and gradients are cast back to
the parameter dtype. Layers stay dtype-generic; with bfloat16 operands their
products go through ``matmul``, ``matmul_tn`` and ``matmul_nt`` below, which
accumulate in float32 and lay the operands out as XLA:CPU's fast bfloat16 kernel
wants (see DESIGN.md, "Mixed precision").

Names: ``"f32"`` (the default: nothing is cast, so float64 stays float64),
``"bf16-mixed"`` (float32 master parameters and optimizer state, bfloat16
activations and matmul operands, float32 accumulation and loss), ``"bf16"``
(parameters too in bfloat16, for memory) and ``"f16-mixed"`` (float16 compute with
a dynamic loss scale, ``DynamicLossScale``; refused on CPU, whose float16 matmuls
are emulated).

Examples:
  >>> import jax.numpy as jnp
  >>> from fbp.precision import get_policy
  >>> policy = get_policy("bf16-mixed")
  >>> policy.cast_to_compute({"w": jnp.ones(2)})["w"].dtype
  dtype(bfloat16)
  >>> policy.cast_to_param({"w": jnp.ones(2, jnp.bfloat16)})["w"].dtype
  dtype('float32')
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _cast(tree: Any, dtype: Any) -> Any:
    """Cast every floating leaf of ``tree`` to ``dtype`` (None: leave it); ints stay."""
    if dtype is None:
        return tree

    def cast(v):
        v = jnp.asarray(v)
        return v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v

    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Where each kind of value lives; ``None`` means "leave the dtype as it is".

    Args:
      param_dtype: dtype of parameters, their gradients and the optimizer state.
      compute_dtype: dtype of the model's inputs, activations and matmul operands.
      output_dtype: dtype the model's output is cast to before the loss.
      name: the policy's name (``"f32"``, ``"bf16-mixed"``, ...).
      loss_scale: the loss derivative is multiplied by this before the backward and
        the gradients divided by it after: a number (static loss scaling), or
        ``"dynamic"``, a ``DynamicLossScale`` kept in the train state (``fbp.train``)
        and handed to the gradient each step through ``with_scale``.
    """

    param_dtype: Any = None
    compute_dtype: Any = None
    output_dtype: Any = None
    name: str = "f32"
    loss_scale: Any = 1.0

    def cast_to_param(self, tree: Any) -> Any:
        """Floating leaves of ``tree`` in ``param_dtype``."""
        return _cast(tree, self.param_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        """Floating leaves of ``tree`` in ``compute_dtype``."""
        return _cast(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """Floating leaves of ``tree`` in ``output_dtype``."""
        return _cast(tree, self.output_dtype)

    def scale_dpred(self, dpred: Array) -> Array:
        """dL/dpred times ``loss_scale``, in the compute dtype (what the backward starts from).

        Args:
          dpred: the loss gradient, shape (batch, ...) like the prediction.
        """
        if self.is_dynamic:
            raise ValueError(
                f"precision={self.name!r} scales the loss dynamically: its scale lives in "
                "the train state, so use fbp.train.step_fn/make_epoch (or pass "
                "policy.with_scale(scale) for one gradient)."
            )
        if not _is_one(self.loss_scale):
            dpred = dpred.astype(jnp.float32) * self.loss_scale
        return _cast(dpred, self.compute_dtype)

    def grads_like(self, grads: Any, params: Any) -> Any:
        """Gradients divided by ``loss_scale`` and cast to each parameter's own dtype."""
        if self.is_identity:
            return grads
        scaled = not _is_one(self.loss_scale)

        def cast(g, p):
            g = g.astype(jnp.float32) / self.loss_scale if scaled else g
            return g.astype(p.dtype)

        return jax.tree.map(cast, grads, params)

    def with_scale(self, scale: Any) -> Policy:
        """This policy with the loss scale ``scale`` (a float32 scalar array or a number)."""
        return dataclasses.replace(self, loss_scale=scale)

    @property
    def is_dynamic(self) -> bool:
        """True when the loss scale is ``"dynamic"`` (kept in the train state)."""
        return isinstance(self.loss_scale, str) and self.loss_scale == "dynamic"

    @property
    def is_identity(self) -> bool:
        """True when the policy casts nothing (``"f32"``)."""
        dtypes = (self.param_dtype, self.compute_dtype, self.output_dtype)
        return all(d is None for d in dtypes) and _is_one(self.loss_scale)


def _is_one(scale: Any) -> bool:
    """Whether a loss scale is the number 1 (an array scale is never taken for 1)."""
    return isinstance(scale, int | float) and scale == 1.0


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["scale", "counter"],
    meta_fields=["period", "factor", "min_scale"],
)
@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """A loss scale that halves on a non-finite gradient and grows after a run of finite
    ones (jmp's ``DynamicLossScale``, PyTorch's ``GradScaler``). A pytree: it lives in
    ``fbp.train.TrainState.loss_scale``.

    Args:
      scale: float32 scalar array, the current scale.
      counter: int32 scalar array, finite steps since the scale last changed.
      period: finite steps after which the scale is multiplied by ``factor``.
      factor: growth and (inverse) backoff factor.
      min_scale: the scale never drops below this.

    Examples:
      >>> import jax.numpy as jnp
      >>> s = DynamicLossScale.create(2.0**15, period=2)
      >>> float(s.adjust(jnp.array(False)).scale), float(s.adjust(True).adjust(True).scale)
      (16384.0, 65536.0)
    """

    scale: Array
    counter: Array
    period: int = 2000
    factor: float = 2.0
    min_scale: float = 1.0

    @classmethod
    def create(
        cls, scale: float = 2.0**15, *, period: int = 2000, factor: float = 2.0, min_scale=1.0
    ) -> DynamicLossScale:
        """A fresh scale (``counter`` 0)."""
        if not (scale > 0 and period > 0 and factor > 1 and min_scale > 0):
            raise ValueError(
                "DynamicLossScale: needs scale > 0, period > 0, factor > 1, min_scale > 0; "
                f"got scale={scale}, period={period}, factor={factor}, min_scale={min_scale}."
            )
        f32, i32 = jnp.float32, jnp.int32
        return cls(jnp.asarray(scale, f32), jnp.zeros((), i32), period, factor, min_scale)

    def adjust(self, finite: Any) -> DynamicLossScale:
        """The scale after a step whose gradient was ``finite`` (a scalar bool)."""
        grown = self.counter + 1 >= self.period
        up = jnp.where(grown, self.scale * self.factor, self.scale)
        down = jnp.maximum(self.scale / self.factor, self.min_scale)
        scale = jnp.where(finite, up, down).astype(jnp.float32)
        counter = jnp.where(finite & ~grown, self.counter + 1, 0).astype(jnp.int32)
        return dataclasses.replace(self, scale=scale, counter=counter)


def init_loss_scale(policy: Policy) -> DynamicLossScale | None:
    """The train state's loss scale for ``policy``: a fresh one when it is dynamic, else None."""
    return DynamicLossScale.create() if policy.is_dynamic else None


POLICIES = {
    "f32": Policy(),
    "bf16-mixed": Policy(jnp.float32, jnp.bfloat16, jnp.float32, "bf16-mixed"),
    "bf16": Policy(jnp.bfloat16, jnp.bfloat16, jnp.float32, "bf16"),
    "f16-mixed": Policy(jnp.float32, jnp.float16, jnp.float32, "f16-mixed", "dynamic"),
}


def get_policy(precision: str | Policy | None, *, backend: str | None = None) -> Policy:
    """The ``Policy`` named ``precision`` (a ``Policy`` passes through; None is ``"f32"``).

    Raises:
      ValueError: an unknown name, or float16 compute on the CPU backend.
    """
    if precision is None:
        return POLICIES["f32"]
    if isinstance(precision, Policy):
        policy = precision
    elif isinstance(precision, str) and precision in POLICIES:
        policy = POLICIES[precision]
    else:
        raise ValueError(f"precision={precision!r} is not known; use one of {', '.join(POLICIES)}.")
    backend = backend or jax.default_backend()
    if policy.compute_dtype is not None and jnp.dtype(policy.compute_dtype) == jnp.float16:
        if backend == "cpu":
            raise ValueError(
                f"precision={policy.name!r}: float16 matmuls are not supported on the CPU "
                "backend; use precision='bf16-mixed'."
            )
    return policy


def is_low(x: Any) -> bool:
    """Whether ``x`` (an array of any shape, or a dtype) is bfloat16 or float16."""
    return jnp.dtype(getattr(x, "dtype", x)) in LOW_PRECISION


def accum_dtype(x: Any) -> Any:
    """float32 for a low-precision ``x`` (any shape, or a dtype), else its own dtype (for sums)."""
    return jnp.float32 if is_low(x) else jnp.dtype(getattr(x, "dtype", x))


def accumulate(*arrays: Any) -> dict[str, Any]:
    """``{"preferred_element_type": float32}`` when any array is low precision, else ``{}``.

    For ``lax.conv_general_dilated`` / ``lax.dot_general``: float32 accumulation and
    result for bfloat16 operands, the operands' own dtype otherwise.
    """
    return {"preferred_element_type": jnp.float32} if any(map(is_low, arrays)) else {}


def matmul(a: Array, b: Array) -> Array:
    """``a @ b``; a low-precision product accumulates and returns in float32.

    a: shape (..., k); b: shape (k, n) -> shape (..., n).
    """
    if not (is_low(a) or is_low(b)):
        return a @ b
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _split_dot(a: Array, b: Array, contract_a: int, contract_b: int, batch: int = 0) -> Array:
    """A product contracting a's axis ``contract_a`` with b's ``contract_b`` (the first
    ``batch`` axes of both batched), as a contraction over two axes (the contracted
    size split into (size/2, 2)).

    XLA:CPU folds a transpose into a dot's dimension numbers, and a bfloat16 dot whose
    operand is transposed that way is upcast to float32. A two-axis contraction is
    instead canonicalised by XLA's dot decomposition with a real transpose-and-copy of
    the operand, after which the dot is the canonical (m,k)·(k,n) bfloat16 kernel.
    """
    ka = a.shape[contract_a]
    a3 = a.reshape(a.shape[:contract_a] + (ka // 2, 2) + a.shape[contract_a + 1 :])
    b3 = b.reshape(b.shape[:contract_b] + (ka // 2, 2) + b.shape[contract_b + 1 :])
    axes = tuple(range(batch))
    dims = (((contract_a, contract_a + 1), (contract_b, contract_b + 1)), (axes, axes))
    return lax.dot_general(a3, b3, dims, preferred_element_type=jnp.float32)


def bmatmul(a: Array, b: Array, layout: str = "nn") -> Array:
    """A product batched over all leading axes, as attention's score and value products.

    ``layout`` says which operand is transposed: ``"nn"``: a (..., m, k), b (..., k, n);
    ``"nt"``: a (..., m, k), b (..., n, k), the product a bᵀ; ``"tn"``: a (..., k, m),
    b (..., k, n), the product aᵀ b. Returns shape (..., m, n). Low precision: float32
    result. XLA:CPU runs batched bfloat16 ``"nn"`` and ``"nt"`` products on its fast
    kernel as they are; ``"tn"`` is split as in ``matmul_tn``.
    """
    batch = a.ndim - 2
    if not (is_low(a) or is_low(b)):
        a = jnp.swapaxes(a, -1, -2) if layout == "tn" else a
        return a @ (jnp.swapaxes(b, -1, -2) if layout == "nt" else b)
    contract = {"nn": (batch + 1, batch), "nt": (batch + 1, batch + 1), "tn": (batch, batch)}
    ca, cb = contract[layout]
    if layout == "tn" and a.shape[ca] % 2 == 0:
        return _split_dot(a, b, ca, cb, batch)
    axes = tuple(range(batch))
    dims = (((ca,), (cb,)), (axes, axes))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def matmul_tn(a: Array, b: Array) -> Array:
    """``aᵀ b`` over all leading axes: the weight gradient ``dw = xᵀ dy``.

    a: shape (..., k); b: shape (..., n) with the same leading axes -> shape (k, n).
    Low precision: float32 result, laid out for the fast bfloat16 kernel.
    """
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    if not (is_low(a) or is_low(b)):
        return a2.T @ b2
    if a2.shape[0] % 2:
        return jnp.matmul(a2.T, b2, preferred_element_type=jnp.float32)
    return _split_dot(a2, b2, 0, 0)


def matmul_nt(a: Array, b: Array) -> Array:
    """``a bᵀ``: the input gradient ``dx = dy wᵀ``.

    a: shape (..., n); b: shape (k, n) -> shape (..., k).
    Low precision: float32 result, laid out for the fast bfloat16 kernel.
    """
    if not (is_low(a) or is_low(b)):
        return a @ b.T
    a2 = a.reshape(-1, a.shape[-1])
    if a.shape[-1] % 2:
        out = jnp.matmul(a2, b.T, preferred_element_type=jnp.float32)
    else:
        out = _split_dot(a2, b, 1, 1)
    return out.reshape(a.shape[:-1] + (b.shape[0],))


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Floating leaves of ``tree`` cast to ``dtype`` (None: unchanged); ints stay."""
    return _cast(tree, dtype)


def upcast(x: Array) -> Array:
    """``x`` (any shape) in float32 when bfloat16/float16 (for sums and statistics), else ``x``."""
    return x.astype(jnp.float32) if is_low(x) else x


def like(y: Array, x: Array) -> Array:
    """``y`` (any shape) in ``x``'s dtype (a float32 product handed back as a bf16 activation)."""
    return y if y.dtype == x.dtype else y.astype(x.dtype)
