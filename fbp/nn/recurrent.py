"""Recurrent layers with hand-written backprop through time: SimpleRNN, LSTM, GRU.

Sequences are batch-major: x has shape (batch, time, in) and a layer returns every
hidden state, shape (batch, time, hidden). Parameters follow PyTorch's formulation
(gate orders i, f, g, o and r, z, n), so weights convert by a transpose.

Forward: a ``lax.scan`` over time runs the cell and keeps per-step residuals. The
SimpleRNN and LSTM step is one matmul ``[x_t, h_{t-1}] [w_ih; w_hh]``. Backward
(BPTT): a reverse ``lax.scan`` carries the gradient of the state back through the
steps; per step one matmul ``dz_t [w_ih; w_hh]ᵀ`` gives both ``dx_t`` and the
gradient reaching ``h_{t-1}``, and ``dw += [x_t, h_{t-1}]ᵀ dz_t`` accumulates the
weight gradient in the loop's carry. This keeps no (time, batch, gates·H) buffer
of input projections or of ``dz``: measured on the project machine it needs 0.6×
the temporary memory of ``jax.grad`` through the scan and runs no slower than
projecting all steps at once (benchmarks/RESULTS.md, section LSTM).

Keywords every recurrent layer takes besides the core ones:

* ``state``: the initial carry, ``{'h': (batch, hidden)}`` (LSTM: and ``'c'``);
  ``None`` or ``{}`` means zeros. No gradient flows into it (it is the edge of a
  truncation window). ``next_state(state, res)`` returns the final carry, so a long
  sequence can be processed window by window. With ``stateful=True``,
  ``init_state`` returns zeros and the training loop carries the state from batch
  to batch; by default ``init_state`` returns ``{}`` and every batch starts at zero.
* ``lengths``: int array, shape (batch,): steps ``t >= lengths[b]`` are padding.
  Padded steps leave the state unchanged, output zeros and get no gradient (their
  ``dx`` is zero). The final carry is the state after the last valid step.

``truncate=k`` gives truncated BPTT: the state flows through every step, the
gradient stops at the edges of windows of k steps (t = k, 2k, ...), exactly as
``jax.grad`` of the same scan with ``stop_gradient`` on the carry there.

``backward_with_gate_deltas`` is ``backward`` that also returns, per step, the
cotangents of the gate pre-activations from which the weight gradient is summed
(``dw = Σ_t inputᵀ_t · delta_t``); per-example quantities (``fbp.extend``) are built
from them and the residuals without a second pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fbp.core import (
    Array,
    Layer,
    Params,
    PRNGKey,
    Residuals,
    Shaped,
    ShapeError,
    State,
    check_last_dim,
    check_ndim,
    layer_name,
    param_dtype,
)
from fbp.nn.sequence import check_lengths, time_mask
from fbp.precision import accum_dtype, like, matmul, matmul_tn, upcast

_UNROLL = 2


class RecurrentRes(NamedTuple):
    steps: Any  # the cell's per-step residuals, each (time, batch, ...)
    carry: dict  # final carry {'h': (batch, H)[, 'c': (batch, H)]}, for next_state
    mask: Array | None  # (time, batch, 1) bool, True on valid steps; None without lengths


class RNNStep(NamedTuple):
    xh: Array  # (time, batch, in + H): [x_t, h_{t-1}], for dw = Σ xhᵀ dz
    h: Array  # (time, batch, H): tanh output, for tanh' = 1 - h²


class LSTMStep(NamedTuple):
    xh: Array  # (time, batch, in + H): [x_t, h_{t-1}]
    a: Array  # (time, batch, 4H): tanh(s·z), all four gates in one row
    c_prev: Array  # (time, batch, H): the cell state each step started from
    tc: Array  # (time, batch, H): tanh(c_t)


class GRUStep(NamedTuple):
    x: Array  # (time, batch, in)
    h_prev: Array  # (time, batch, H)
    r: Array  # (time, batch, H): reset gate
    z: Array  # (time, batch, H): update gate
    n: Array  # (time, batch, H): candidate state
    ghn: Array  # (time, batch, H): h w_hn + b_hn, the term r multiplies


class GRUDeltas(NamedTuple):
    dgx: Array  # (time, batch, 3H): cotangent of x_t w_ih + b_ih (r, z, n)
    dgh: Array  # (time, batch, 3H): cotangent of h_prev w_hh + b_hh (r, z, n)


def _orthogonal_blocks(key: Array, hidden: int, blocks: int, dtype) -> Array:
    """(H, blocks·H): one orthogonal (H, H) matrix per gate."""
    init = jax.nn.initializers.orthogonal()
    keys = jax.random.split(key, blocks)
    return jnp.concatenate([init(k, (hidden, hidden), dtype) for k in keys], axis=1)


@dataclasses.dataclass(frozen=True)
class _Recurrent(Layer):
    """Shared scan driver; a cell supplies ``_cell``, ``_cell_backward`` and its biases."""

    hidden: int
    truncate: int | None = None
    stateful: bool = False
    w_hh_gain: float = 1.0

    gates: ClassVar[int] = 1
    carry_names: ClassVar[tuple[str, ...]] = ("h",)

    def __post_init__(self):
        name = type(self).__name__
        if not isinstance(self.hidden, int) or isinstance(self.hidden, bool) or self.hidden <= 0:
            raise ValueError(f"{name}: hidden must be a positive int, got {self.hidden!r}.")
        k = self.truncate
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k <= 0):
            raise ValueError(f"{name}: truncate must be None or a positive int, got {k!r}.")
        if not self.w_hh_gain > 0:
            raise ValueError(f"{name}: w_hh_gain must be > 0, got {self.w_hh_gain!r}.")

    # ------------------------------------------------------------------ params and state
    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """x: example input, shape (batch, time, in).

        w_ih is Glorot-uniform; w_hh is ``w_hh_gain`` times an orthogonal matrix per gate;
        biases are zero (LSTM: ``forget_bias`` on the forget gate).
        """
        if len(x.shape) != 3:
            raise ShapeError(
                f"{layer_name(self)}.init: x has shape {tuple(x.shape)} but expected "
                "(batch, time, in) (3 dims)."
            )
        dtype, (k_ih, k_hh) = param_dtype(x), jax.random.split(key)
        width = self.gates * self.hidden
        params = {
            "w_ih": jax.nn.initializers.glorot_uniform()(k_ih, (x.shape[-1], width), dtype),
            "w_hh": self.w_hh_gain * _orthogonal_blocks(k_hh, self.hidden, self.gates, dtype),
        }
        params.update(self._init_biases(dtype))
        return params

    def _init_biases(self, dtype) -> dict:
        return {"b": jnp.zeros((self.gates * self.hidden,), dtype)}

    def init_state(self, x: Shaped) -> State:
        """Zeros {'h': (batch, H), ...} when ``stateful``; ``{}`` (stateless) otherwise."""
        if not self.stateful:
            return {}
        dtype = param_dtype(x)
        return {k: jnp.zeros((x.shape[0], self.hidden), dtype) for k in self.carry_names}

    def next_state(self, state: State | None, res: Residuals) -> State | None:
        """The final carry of the forward pass when a state was given; ``state`` otherwise."""
        return dict(res.carry) if state else state

    def _carry0(self, state, x: Array, method: str) -> dict:
        shape = (x.shape[0], self.hidden)
        if not state:
            return {k: jnp.zeros(shape, x.dtype) for k in self.carry_names}
        if set(state) != set(self.carry_names):
            raise ShapeError(
                f"{layer_name(self)}.{method}: state has keys {sorted(state)} but expected "
                f"{sorted(self.carry_names)}."
            )
        for k in self.carry_names:
            if tuple(state[k].shape) != shape:
                raise ShapeError(
                    f"{layer_name(self)}.{method}: state['{k}'] has shape "
                    f"{tuple(state[k].shape)} but expected (batch, hidden) = {shape}; "
                    "a stateful layer needs the same batch size in every call."
                )
        return {k: state[k].astype(x.dtype) for k in self.carry_names}

    # ------------------------------------------------------------------ forward
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
        """x: (batch, time, in) -> every hidden state, (batch, time, hidden)."""
        return self.forward(params, x, key=key, state=state, train=train, lengths=lengths)[0]

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
        """x: (batch, time, in) -> y: (batch, time, hidden); lengths: (batch,) or None."""
        check_ndim(self, "forward", "x", x, (3,), "(batch, time, in)")
        check_last_dim(self, "forward", "x", x, params["w_ih"].shape[0], "params['w_ih']")
        carry0 = self._carry0(state, x, "forward")
        if lengths is not None:
            check_lengths(self, "forward", lengths, x.shape[0])
        return _jit_forward(self, params, x, carry0, lengths)

    def _forward(self, params, x, carry0, lengths):
        time = x.shape[1]
        mask = None if lengths is None else time_mask(lengths, time)
        p = self._step_params(params)

        def step(carry, xs):
            x_t, m_t, k_t = xs
            if k_t is not None:  # a no-op forward; makes jax.grad of apply truncate too
                carry = {k: jnp.where(k_t > 0, v, lax.stop_gradient(v)) for k, v in carry.items()}
            new, r = self._cell(p, carry, x_t)
            y = new["h"]
            if m_t is not None:
                new = {k: jnp.where(m_t, new[k], carry[k]) for k in carry}
                y = jnp.where(m_t, y, 0)
            return new, (y, r)

        xs = (jnp.swapaxes(x, 0, 1), mask, self._keep(time, x.dtype))
        carry, (ys, steps) = lax.scan(step, carry0, xs, unroll=_UNROLL)
        return jnp.swapaxes(ys, 0, 1), RecurrentRes(steps, carry, mask)

    # ------------------------------------------------------------------ backward
    def _keep(self, time: int, dtype) -> Array | None:
        """(time,) 0/1: 0 where the carry gradient stops (t = 0, k, 2k, ...)."""
        if self.truncate is None:
            return None
        return jnp.asarray((np.arange(time) % self.truncate != 0).astype(np.float64), dtype)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """BPTT: a reverse scan of the cell's rule, summing dparams over the steps.

        Per step: dh_t = dy_t + dh carried from step t+1 (zero across a truncation edge);
        the cell gives dx_t, the gradient reaching the previous state and dparams_t.
        Padded steps pass the carried gradient through unchanged and get none.
        """
        return _jit_backward(self, params, res, dy)

    def backward_with_gate_deltas(
        self, params: Params, res: Residuals, dy: Array
    ) -> tuple[Params, Array, Any]:
        """``backward`` that also returns the per-step gate deltas (time-major).

        Returns:
          ``(dparams, dx, gate_deltas)``. ``gate_deltas`` is the cotangent of the gate
          pre-activations at every step, time-major like ``res.steps``: SimpleRNN and
          LSTM, ``dz`` (time, batch, gates·H), so ``dw = Σ_t xhᵀ_t dz_t`` with
          ``xh = res.steps.xh``; GRU, ``GRUDeltas(dgx, dgh)``, each (time, batch, 3H),
          so ``dw_ih = Σ_t x_tᵀ dgx_t`` and ``dw_hh = Σ_t h_prevᵀ_t dgh_t``. Padded
          steps have zero deltas. ``dparams`` and ``dx`` are exactly ``backward``'s.
        """
        return _jit_backward_deltas(self, params, res, dy)

    def _backward(self, params, res, dy, keep_deltas=False):
        dy_tm = jnp.swapaxes(dy, 0, 1)
        time, batch = dy_tm.shape[0], dy_tm.shape[1]
        p = self._step_params(params)
        zeros = jnp.zeros((batch, self.hidden), dy.dtype)

        def bstep(carry, xs):
            dcarry, acc = carry
            r, dy_t, k_t, m_t = xs
            if m_t is None:
                dprev, dx_t, dp_t, gd_t = self._cell_backward(
                    p, r, {**dcarry, "h": dcarry["h"] + dy_t}
                )
            else:
                inner = {k: jnp.where(m_t, v, 0) for k, v in dcarry.items()}
                inner["h"] = inner["h"] + jnp.where(m_t, dy_t, 0)
                dprev, dx_t, dp_t, gd_t = self._cell_backward(p, r, inner)
                dprev = {k: v + jnp.where(m_t, 0, dcarry[k]) for k, v in dprev.items()}
            if k_t is not None:
                dprev = {k: v * k_t for k, v in dprev.items()}
            return (dprev, jax.tree.map(jnp.add, acc, dp_t)), (dx_t, gd_t if keep_deltas else None)

        carry0 = ({k: zeros for k in self.carry_names}, self._acc_zeros(params))
        xs = (res.steps, dy_tm, self._keep(time, dy.dtype), res.mask)
        (_, acc), (dx, deltas) = lax.scan(bstep, carry0, xs, reverse=True, unroll=_UNROLL)
        out = self._finish(params, acc), jnp.swapaxes(dx, 0, 1)
        return (*out, deltas) if keep_deltas else out

    # Cells with one fused matmul [x_t, h_{t-1}] @ [w_ih; w_hh] (SimpleRNN, LSTM).
    def _step_params(self, params):
        w = jnp.concatenate([params["w_ih"], params["w_hh"]], axis=0)
        return {"w": w, "w_t": w.T, "b": params["b"]}

    def _acc_zeros(self, params):
        n = params["w_ih"].shape[0] + self.hidden
        return {
            "w": jnp.zeros((n, params["w_hh"].shape[1]), accum_dtype(params["w_hh"])),
            "b": jnp.zeros(params["b"].shape, accum_dtype(params["b"])),
        }

    def _finish(self, params, acc):
        n_in = params["w_ih"].shape[0]
        return {"w_ih": acc["w"][:n_in], "w_hh": acc["w"][n_in:], "b": acc["b"]}

    def _fused_grads(self, p, xh, dz):
        """dx_t, dh_prev from one matmul dz [w_ih; w_hh]ᵀ; dparams_t = (xhᵀ dz, Σ dz); dz."""
        dxh = like(matmul(dz, p["w_t"]), dz)  # w_t carried transposed: a canonical product
        n_in = xh.shape[1] - self.hidden
        dp = {"w": matmul_tn(xh, dz), "b": jnp.sum(upcast(dz), axis=0)}
        return dxh[:, :n_in], dxh[:, n_in:], dp, dz

    def _cell(self, p, carry: dict, x_t: Array) -> tuple[dict, Any]:
        raise NotImplementedError

    def _cell_backward(self, p, r, dcarry: dict) -> tuple[dict, Array, dict, Any]:
        """(gradient reaching the previous carry, dx_t, dparams_t, gate deltas_t)."""
        raise NotImplementedError


# One compiled scan per layer and shapes, reused by eager calls; inlined under an outer jit.
_jit_forward = jax.jit(lambda layer, *args: layer._forward(*args), static_argnums=0)
_jit_backward = jax.jit(lambda layer, *args: layer._backward(*args), static_argnums=0)
_jit_backward_deltas = jax.jit(
    lambda layer, *args: layer._backward(*args, keep_deltas=True), static_argnums=0
)


@dataclasses.dataclass(frozen=True)
class SimpleRNN(_Recurrent):
    """Elman RNN: h_t = tanh(x_t w_ih + h_{t-1} w_hh + b) (``torch.nn.RNN``, tanh).

    Args:
      hidden: size of the hidden state H (> 0).
      truncate: None for full BPTT, or k > 0: the gradient stops every k steps.
      stateful: ``init_state`` returns zeros, so training carries the state across batches.
      w_hh_gain: scale of the orthogonal w_hh init (> 1 explodes, < 1 vanishes faster).

    Parameter tree:
      ``w_ih`` (in, H), ``w_hh`` (H, H), ``b`` (H,) (PyTorch's b_ih + b_hh).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = SimpleRNN(4)
      >>> x = jnp.ones((2, 5, 3))
      >>> params = layer.init(jax.random.key(0), x)
      >>> y, res = layer.forward(params, x)
      >>> y.shape, layer.backward(params, res, jnp.ones_like(y))[1].shape
      ((2, 5, 4), (2, 5, 3))
    """

    def _cell(self, p, carry, x_t):
        xh = jnp.concatenate([x_t, carry["h"]], axis=1)
        h = jnp.tanh(matmul(xh, p["w"]) + upcast(p["b"]))  # float32 in bf16, kept so
        return {"h": like(h, xh)}, RNNStep(xh, h)

    def _cell_backward(self, p, r, dcarry):
        """dz = dh (1 - h²);  (dx_t, dh_prev) = dz [w_ih; w_hh]ᵀ;  dw += [x_t, h_prev]ᵀ dz."""
        dz = like(upcast(dcarry["h"]) * (1 - r.h * r.h), r.xh)
        dx_t, dh_prev, dp, dz = self._fused_grads(p, r.xh, dz)
        return {"h": like(dh_prev, dcarry["h"])}, dx_t, dp, dz


@dataclasses.dataclass(frozen=True)
class LSTM(_Recurrent):
    """LSTM (``torch.nn.LSTM``): gates i, f, g, o of z = x_t w_ih + h_{t-1} w_hh + b;

    i, f, o = σ(z_i, z_f, z_o), g = tanh(z_g); c_t = f c_{t-1} + i g; h_t = o tanh(c_t).
    All four gates come from one tanh over the 4H row: σ(z) = ½ tanh(z/2) + ½.

    Args:
      hidden: size of the hidden and cell state H (> 0).
      truncate: None for full BPTT, or k > 0: the gradient stops every k steps.
      stateful: ``init_state`` returns zeros {'h', 'c'}, carried across batches.
      w_hh_gain: scale of the orthogonal w_hh init.
      forget_bias: initial value of the forget gate's bias (1.0 helps long memories).

    Parameter tree:
      ``w_ih`` (in, 4H), ``w_hh`` (H, 4H), ``b`` (4H,) (PyTorch's b_ih + b_hh).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = LSTM(4)
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 5, 3)))
      >>> params['w_hh'].shape, layer.apply(params, jnp.ones((2, 5, 3))).shape
      ((4, 16), (2, 5, 4))
    """

    forget_bias: float = 1.0

    gates: ClassVar[int] = 4
    carry_names: ClassVar[tuple[str, ...]] = ("h", "c")

    def _init_biases(self, dtype):
        h = self.hidden
        return {"b": jnp.zeros((4 * h,), dtype).at[h : 2 * h].set(self.forget_bias)}

    def _step_params(self, params):
        """Adds s, (4H,): ½ on the sigmoid gates, 1 on g; gate = s tanh(s z) + 1 - s."""
        h, dtype = self.hidden, params["w_hh"].dtype
        s = jnp.concatenate(
            [jnp.full((2 * h,), 0.5, dtype), jnp.ones((h,), dtype), jnp.full((h,), 0.5, dtype)]
        )
        return {**super()._step_params(params), "s": s}

    def _cell(self, p, carry, x_t):
        # In bf16 only the product's operands are bfloat16: the gate math and the kept
        # gates a and tanh(c) are float32 (bf16 elementwise work made the step slower
        # than float32's; benchmarks/RESULTS.md). The carry keeps the input's dtype.
        xh = jnp.concatenate([x_t, carry["h"]], axis=1)
        s = upcast(p["s"])
        a = jnp.tanh((matmul(xh, p["w"]) + upcast(p["b"])) * s)
        i, f, g, o = jnp.split(a * s + (1 - s), 4, axis=-1)
        c = f * upcast(carry["c"]) + i * g
        tc = jnp.tanh(c)
        return {"h": like(o * tc, xh), "c": like(c, xh)}, LSTMStep(xh, a, carry["c"], tc)

    def _cell_backward(self, p, r, dcarry):
        """dc = dc' + dh o (1-tanh²c); d(i,f,g,o) = (dc g, dc c_prev, dc i, dh tanh c);

        dz = d(gates) s² (1 - a²);  (dx_t, dh_prev) = dz [w_ih; w_hh]ᵀ;  dc_prev = dc f.
        In bf16, float32 up to dz, which goes into the products as bfloat16.
        """
        s = upcast(p["s"])
        i, f, g, o = jnp.split(r.a * s + (1 - s), 4, axis=-1)
        dh = upcast(dcarry["h"])
        dc = upcast(dcarry["c"]) + dh * o * (1 - r.tc * r.tc)
        dgate = jnp.concatenate([dc * g, dc * upcast(r.c_prev), dc * i, dh * r.tc], axis=-1)
        dz = like(dgate * (s * s) * (1 - r.a * r.a), r.xh)
        dx_t, dh_prev, dp, dz = self._fused_grads(p, r.xh, dz)
        dprev = {"h": like(dh_prev, dcarry["h"]), "c": like(dc * f, dcarry["c"])}
        return dprev, dx_t, dp, dz


@dataclasses.dataclass(frozen=True)
class GRU(_Recurrent):
    """GRU (``torch.nn.GRU``): gates r, z, n;

    r, z = σ(x w_ir + b_ir + h w_hr + b_hr, same for z);
    n = tanh(x w_in + b_in + r (h w_hn + b_hn));  h_t = (1 - z) n + z h_{t-1}.

    Args:
      hidden: size of the hidden state H (> 0).
      truncate: None for full BPTT, or k > 0: the gradient stops every k steps.
      stateful: ``init_state`` returns zeros, carried across batches.
      w_hh_gain: scale of the orthogonal w_hh init.

    Parameter tree:
      ``w_ih`` (in, 3H), ``w_hh`` (H, 3H), ``b_ih`` (3H,), ``b_hh`` (3H,).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = GRU(4)
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 5, 3)))
      >>> sorted(params), layer.apply(params, jnp.ones((2, 5, 3))).shape
      (['b_hh', 'b_ih', 'w_hh', 'w_ih'], (2, 5, 4))
    """

    gates: ClassVar[int] = 3

    def _init_biases(self, dtype):
        return {
            "b_ih": jnp.zeros((3 * self.hidden,), dtype),
            "b_hh": jnp.zeros((3 * self.hidden,), dtype),
        }

    def _step_params(self, params):
        # the weights also carried transposed, so the backward's products are canonical
        return {**params, "w_ih_t": params["w_ih"].T, "w_hh_t": params["w_hh"].T}

    def _acc_zeros(self, params):
        return jax.tree.map(lambda v: jnp.zeros(v.shape, accum_dtype(v)), params)

    def _finish(self, params, acc):
        return acc

    def _cell(self, p, carry, x_t):
        # In bf16 only the products' operands are bfloat16; the gate math and the kept
        # gates are float32 (as in the LSTM), the carry keeps the input's dtype.
        h_prev, hid = carry["h"], self.hidden
        gx = matmul(x_t, p["w_ih"]) + upcast(p["b_ih"])
        gh = matmul(h_prev, p["w_hh"]) + upcast(p["b_hh"])
        r, z = jnp.split(jax.nn.sigmoid(gx[:, : 2 * hid] + gh[:, : 2 * hid]), 2, axis=-1)
        ghn = gh[:, 2 * hid :]
        n = jnp.tanh(gx[:, 2 * hid :] + r * ghn)
        h = like(n + z * (upcast(h_prev) - n), h_prev)
        return {"h": h}, GRUStep(x_t, h_prev, r, z, n, ghn)

    def _cell_backward(self, p, r, dcarry):
        """dn̂ = dh (1-z)(1-n²); dr̂ = dn̂ ghn r(1-r); dẑ = dh (h_prev-n) z(1-z);

        dgx = (dr̂, dẑ, dn̂), dgh = (dr̂, dẑ, dn̂ r);  dx_t = dgx w_ihᵀ;
        dh_prev = dh z + dgh w_hhᵀ;  dw_ih += x_tᵀ dgx;  dw_hh += h_prevᵀ dgh.
        In bf16, float32 up to dgx and dgh, which go into the products as bfloat16.
        """
        dh = upcast(dcarry["h"])
        dan = dh * (1 - r.z) * (1 - r.n * r.n)
        dar = dan * r.ghn * r.r * (1 - r.r)
        daz = dh * (upcast(r.h_prev) - r.n) * r.z * (1 - r.z)
        dgh32 = jnp.concatenate([dar, daz, dan * r.r], axis=-1)
        dgx32 = jnp.concatenate([dar, daz, dan], axis=-1)
        dgx, dgh = like(dgx32, r.x), like(dgh32, r.h_prev)
        dp = {
            "w_ih": matmul_tn(r.x, dgx),
            "w_hh": matmul_tn(r.h_prev, dgh),
            "b_ih": jnp.sum(dgx32, axis=0),
            "b_hh": jnp.sum(dgh32, axis=0),
        }
        dprev = {"h": like(dh * r.z + matmul(dgh, p["w_hh_t"]), dcarry["h"])}
        return dprev, like(matmul(dgx, p["w_ih_t"]), r.x), dp, GRUDeltas(dgx, dgh)
