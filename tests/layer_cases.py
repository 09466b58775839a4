"""THE registry of layer cases: every generic layer test is driven by ``CASES``.

A case names a layer, the input it is checked on, and how it is called (key,
state, train, lengths). ``test_layers.py::test_every_public_layer_is_registered`` fails
when a public layer of ``fbp.nn`` has no case here. Keep one section per layer family.
A case with ``slow=True`` runs only under ``-m slow`` (``PARAMS`` marks it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest

from fbp import nn


@dataclasses.dataclass(frozen=True)
class LayerCase:
    id: str
    make: Callable[[], nn.Layer]
    input_shape: tuple[int, ...]
    input: str = "normal"  # "normal", "positive", or "int:<high>" for token ids
    train: bool = False  # the mode forward/apply run in
    needs_key: bool = False  # pass a PRNG key (dropout)
    with_state: bool = False  # pass model.init_state(x) (batch norm)
    rtol: float = 1e-10  # float64 parity tolerance
    lengths: tuple[int, ...] | None = None  # valid steps per example of a padded batch
    frozen: bool = False  # params held fixed (nn.Frozen): dparams must be zeros
    slow: bool = False  # run under -m slow only (more of a family the default run covers)

    def __str__(self) -> str:
        return self.id

    def make_input(self, seed: int = 0, dtype=jnp.float64, shape=None) -> jax.Array:
        shape = self.input_shape if shape is None else shape
        key = jax.random.key(seed)
        if self.input.startswith("int:"):
            return jax.random.randint(key, shape, 0, int(self.input[4:]))
        x = jax.random.normal(key, shape, dtype)
        return jnp.abs(x) + 0.1 if self.input == "positive" else x

    def setup(self, seed: int = 0) -> tuple[nn.Layer, jax.Array, dict, dict]:
        """(layer, input, params, call keywords): what the generic tests check a case on."""
        layer = self.make()
        x = self.make_input(seed)
        params = layer.init(jax.random.key(seed + 1), x)
        return layer, x, params, self.call_kwargs(layer, x)

    def call_kwargs(self, layer: nn.Layer, x: jax.Array) -> dict:
        """The key/state/train(/lengths) keywords forward, apply and the parity harness get."""
        kw = dict(
            key=jax.random.key(42) if self.needs_key else None,
            state=layer.init_state(x) if self.with_state else None,
            train=self.train,
        )
        if self.lengths is not None:
            kw["lengths"] = jnp.array(self.lengths)
        return kw


@dataclasses.dataclass(frozen=True)
class CrossPair(nn.Layer):
    """Test adapter: cross-attention of x[:, :t] over x[:, t:] as a one-array layer.

    The generic tests take one input array; the pair's cotangents (dx, dcontext) come
    back concatenated on the time axis, so they are checked like any dx.
    """

    layer: nn.Layer
    t: int

    def _pair(self, x):
        return x[:, : self.t], x[:, self.t :]

    def init(self, key, x):
        return self.layer.init(key, self._pair(x))

    def forward(self, params, x, *, key=None, state=None, train=False):
        return self.layer.forward(params, self._pair(x), key=key, train=train)

    def backward(self, params, res, dy):
        dparams, (dx, dcontext) = self.layer.backward(params, res, dy)
        return dparams, jnp.concatenate([dx, dcontext], axis=1)


CASES: list[LayerCase] = [
    # --- dense (fbp/nn/dense.py)
    LayerCase("dense", lambda: nn.Dense(5), (4, 3)),
    LayerCase("dense-nobias", lambda: nn.Dense(5, use_bias=False), (4, 3)),
    LayerCase("dense-3d-per-step", lambda: nn.Dense(6), (2, 5, 3)),
    # --- activations (fbp/nn/activations.py)
    LayerCase("identity", lambda: nn.Identity(), (4, 3)),
    LayerCase("sigmoid", lambda: nn.Sigmoid(), (4, 3)),
    LayerCase("tanh", lambda: nn.Tanh(), (4, 3)),
    LayerCase("relu", lambda: nn.ReLU(), (4, 3)),
    LayerCase("leaky-relu", lambda: nn.LeakyReLU(0.1), (4, 3)),
    LayerCase("elu", lambda: nn.ELU(), (4, 3)),
    LayerCase("gelu-tanh", lambda: nn.GELU(), (4, 3)),
    LayerCase("gelu-erf", lambda: nn.GELU(approximate=False), (4, 3)),
    LayerCase("softplus", lambda: nn.Softplus(), (4, 3)),
    LayerCase("softmax", lambda: nn.Softmax(), (4, 3)),
    LayerCase("softmax-axis0", lambda: nn.Softmax(axis=0), (4, 3)),
    # --- recurrent (fbp/nn/recurrent.py, fbp/nn/sequence.py); truncated BPTT is not the
    # true gradient (finite differences disagree), so tests/test_recurrent.py checks it.
    LayerCase("simple-rnn", lambda: nn.SimpleRNN(4), (3, 6, 2)),
    LayerCase("lstm-stateful", lambda: nn.LSTM(3, stateful=True), (2, 5, 2), with_state=True),
    LayerCase("gru", lambda: nn.GRU(4), (3, 6, 2)),
    LayerCase("bidirectional-lstm", lambda: nn.Bidirectional(nn.LSTM(3)), (2, 5, 2)),
    LayerCase("last-step", lambda: nn.LastStep(), (3, 4, 2)),
    LayerCase(
        "sequential-gru-last-dense",
        lambda: nn.Sequential([nn.GRU(4), nn.LastStep(), nn.Dense(2)]),
        (3, 5, 2),
    ),
    # padded batches through the layers built around recurrent ones (lengths pass through)
    LayerCase(
        "bidirectional-frozen-gru-lengths",
        lambda: nn.Bidirectional(nn.Frozen(nn.GRU(3))),
        (3, 6, 2),
        lengths=(6, 2, 4),
        frozen=True,
    ),
    # (tests/test_wrappers.py checks by default that these equal the bare layer exactly)
    LayerCase(
        "residual-gru-lengths",
        lambda: nn.Residual(nn.GRU(3)),
        (3, 6, 3),
        lengths=(4, 6, 1),
        slow=True,
    ),
    LayerCase(
        "recompute-lstm-lengths",
        lambda: nn.Recompute(nn.LSTM(3)),
        (3, 5, 2),
        lengths=(5, 0, 3),
        slow=True,
    ),
    # --- wrappers (fbp/nn/wrappers.py); Frozen's zero dparams are by design not the VJP:
    # its cases say frozen=True (dparams must be zeros, dx is checked as usual).
    LayerCase("frozen-tanh", lambda: nn.Frozen(nn.Tanh()), (4, 3)),
    LayerCase("frozen-dense", lambda: nn.Frozen(nn.Dense(5)), (4, 3), frozen=True),
    LayerCase("recompute-dense", lambda: nn.Recompute(nn.Dense(5)), (4, 3)),
    LayerCase(
        "recompute-block",
        lambda: nn.Recompute(nn.Sequential([nn.Dense(6), nn.Tanh(), nn.Dense(4), nn.ReLU()])),
        (5, 3),
    ),
    # --- zoo (fbp/nn/conv.py, pooling.py, norm.py, dropout.py, embedding.py, combinators.py)
    LayerCase("conv2d-same", lambda: nn.Conv2D(4, 3), (2, 7, 6, 3)),
    LayerCase(
        "conv2d-valid-stride2",
        lambda: nn.Conv2D(4, (3, 2), strides=2, padding="VALID"),
        (2, 9, 8, 3),
    ),
    LayerCase("conv2d-dilation2", lambda: nn.Conv2D(3, 3, dilation=2), (2, 8, 8, 2)),
    LayerCase(
        "conv2d-int-padding-stride",
        lambda: nn.Conv2D(3, (2, 3), strides=(2, 3), padding=1),
        (2, 7, 9, 2),
    ),
    LayerCase(
        "conv2d-pairs-padding-stride-dilation",
        lambda: nn.Conv2D(2, 3, strides=2, dilation=(1, 2), padding=((2, 0), (1, 3))),
        (2, 9, 8, 2),
    ),
    LayerCase("conv1d-same", lambda: nn.Conv1D(4, 3), (2, 9, 3)),
    LayerCase(
        "conv1d-valid-stride-dilation",
        lambda: nn.Conv1D(3, 3, strides=2, padding="VALID", dilation=2),
        (2, 13, 2),
    ),
    LayerCase("maxpool2d-odd-valid", lambda: nn.MaxPool2D((2, 3)), (2, 7, 8, 2)),
    LayerCase(
        "maxpool2d-overlap-same", lambda: nn.MaxPool2D(3, strides=2, padding="SAME"), (2, 7, 6, 2)
    ),
    LayerCase(
        "maxpool2d-int-padding", lambda: nn.MaxPool2D(3, strides=(1, 2), padding=1), (2, 5, 6, 2)
    ),
    LayerCase(
        "avgpool2d-overlap-same", lambda: nn.AvgPool2D(3, strides=2, padding="SAME"), (2, 7, 6, 2)
    ),
    LayerCase(
        "avgpool2d-exclude-pad",
        lambda: nn.AvgPool2D(3, strides=(2, 1), padding=1, count_include_pad=False),
        (2, 7, 5, 2),
    ),
    LayerCase("global-avg-pool", lambda: nn.GlobalAvgPool(), (2, 4, 5, 3)),
    LayerCase("flatten", lambda: nn.Flatten(), (2, 4, 3, 2)),
    LayerCase("reshape", lambda: nn.Reshape((4, 4, 1)), (3, 16)),
    LayerCase(
        "batchnorm-train-nhwc", lambda: nn.BatchNorm(), (2, 3, 4, 3), train=True, with_state=True
    ),
    LayerCase("batchnorm-train-no-state", lambda: nn.BatchNorm(), (6, 3), train=True),
    LayerCase("batchnorm-eval", lambda: nn.BatchNorm(), (2, 3, 4, 3), with_state=True),
    LayerCase("layernorm", lambda: nn.LayerNorm(), (4, 5)),
    LayerCase("dropout-train", lambda: nn.Dropout(0.3), (4, 5), train=True, needs_key=True),
    # float64 table: token ids carry no dtype, so the default table would be float32
    LayerCase("embedding", lambda: nn.Embedding(11, 4, dtype=jnp.float64), (3, 5), input="int:11"),
    # more of the zoo, under -m slow (the default run covers the same layers above)
    LayerCase("conv2d-nobias", lambda: nn.Conv2D(2, 3, use_bias=False), (2, 5, 5, 2), slow=True),
    LayerCase(
        "conv2d-same-stride2-even", lambda: nn.Conv2D(3, 4, strides=2), (2, 8, 7, 2), slow=True
    ),
    LayerCase(
        "conv1d-causal-pairs", lambda: nn.Conv1D(2, 4, padding=((3, 0),)), (2, 7, 3), slow=True
    ),
    LayerCase("maxpool2d", lambda: nn.MaxPool2D(2), (2, 6, 6, 3), slow=True),
    LayerCase("avgpool2d", lambda: nn.AvgPool2D(2), (2, 6, 6, 3), slow=True),
    LayerCase("global-avg-pool-1d", lambda: nn.GlobalAvgPool(), (2, 6, 3), slow=True),
    LayerCase(
        "batchnorm-train",
        lambda: nn.BatchNorm(),
        (6, 3),
        train=True,
        with_state=True,
        slow=True,
    ),
    LayerCase("layernorm-3d", lambda: nn.LayerNorm(eps=1e-3), (2, 3, 5), slow=True),
    LayerCase("dropout-eval", lambda: nn.Dropout(0.3), (4, 5), needs_key=True, slow=True),
    LayerCase(
        "residual-dense",
        lambda: nn.Residual(nn.Sequential([nn.Dense(3), nn.Tanh()])),
        (4, 3),
        slow=True,
    ),
    LayerCase(
        "residual-conv-bn",
        lambda: nn.Residual(
            nn.Sequential([nn.Conv2D(2, 3, use_bias=False), nn.BatchNorm(), nn.ReLU()])
        ),
        (2, 5, 5, 2),
        train=True,
        with_state=True,
    ),
    LayerCase(
        "sequential-cnn",
        lambda: nn.Sequential(
            [
                nn.Conv2D(3, 3, use_bias=False),
                nn.BatchNorm(),
                nn.ReLU(),
                nn.MaxPool2D(2),
                nn.Dropout(0.25),
                nn.Conv2D(4, 2, padding="VALID"),
                nn.GlobalAvgPool(),
                nn.Dense(2),
            ]
        ),
        (3, 6, 6, 2),
        train=True,
        with_state=True,
        needs_key=True,
    ),
    # --- attention (fbp/nn/mha.py, transformer.py, positional.py); without rope the key
    # bias gets an exactly-zero gradient (softmax ignores a per-row shift), which autodiff
    # and the hand-written rule both give as roundoff: cases with b_k use rope.
    LayerCase(
        "mha-linear-causal-rope-bs2",
        lambda: nn.MultiHeadAttention(2, causal=True, rope=True, memory="linear", block_size=2),
        (2, 5, 8),
    ),
    LayerCase(
        "mha-dropout-train",
        lambda: nn.MultiHeadAttention(2, causal=True, rope=True, dropout=0.3),
        (2, 5, 8),
        train=True,
        needs_key=True,
    ),
    LayerCase(
        "mha-cross-nobias-head3",
        lambda: CrossPair(nn.MultiHeadAttention(2, head_dim=3, use_bias=False), 3),
        (2, 7, 8),
    ),
    # (linear memory with dropout in a block: tests/test_transformer.py, -m slow)
    LayerCase(
        "transformer-block",
        lambda: nn.TransformerBlock(2, mlp_dim=12, causal=True, rope=True),
        (2, 5, 8),
    ),
    LayerCase("sinusoidal-positions", lambda: nn.SinusoidalPositions(), (2, 5, 6)),
    LayerCase("learned-positions", lambda: nn.LearnedPositions(7), (2, 5, 6)),
    # --- containers (fbp/core.py)
    LayerCase(
        "sequential-mlp",
        lambda: nn.Sequential([nn.Dense(6), nn.Tanh(), nn.Dense(4), nn.ReLU(), nn.Dense(2)]),
        (5, 3),
    ),
    LayerCase("sequential-empty-params", lambda: nn.Sequential([nn.Tanh(), nn.Sigmoid()]), (5, 3)),
]

# CASES as pytest parameters: ids are the case ids; slow cases carry the slow mark.
PARAMS = [
    pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else []) for case in CASES
]
