"""THE registry of layer cases: every generic layer test is driven by ``CASES``.

A case names a layer, the input it is checked on, and how it is called (key,
state, train). ``test_layers.py::test_every_public_layer_is_registered`` fails when
a public layer of ``fbp.nn`` has no case here. Keep one section per layer family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

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

    def __str__(self) -> str:
        return self.id

    def make_input(self, seed: int = 0, dtype=jnp.float64, shape=None) -> jax.Array:
        shape = self.input_shape if shape is None else shape
        key = jax.random.key(seed)
        if self.input.startswith("int:"):
            return jax.random.randint(key, shape, 0, int(self.input[4:]))
        x = jax.random.normal(key, shape, dtype)
        return jnp.abs(x) + 0.1 if self.input == "positive" else x

    def call_kwargs(self, layer: nn.Layer, x: jax.Array) -> dict:
        """The key/state/train keywords forward, apply and the parity harness get."""
        return dict(
            key=jax.random.key(42) if self.needs_key else None,
            state=layer.init_state(x) if self.with_state else None,
            train=self.train,
        )


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
    # --- wrappers (fbp/nn/wrappers.py); Frozen's zero dparams are by design not the VJP,
    # so its registry case has no params; tests/test_wrappers.py checks Frozen(Dense).
    LayerCase("frozen-tanh", lambda: nn.Frozen(nn.Tanh()), (4, 3)),
    LayerCase("recompute-dense", lambda: nn.Recompute(nn.Dense(5)), (4, 3)),
    LayerCase(
        "recompute-block",
        lambda: nn.Recompute(nn.Sequential([nn.Dense(6), nn.Tanh(), nn.Dense(4), nn.ReLU()])),
        (5, 3),
    ),
    # --- containers (fbp/core.py)
    LayerCase(
        "sequential-mlp",
        lambda: nn.Sequential([nn.Dense(6), nn.Tanh(), nn.Dense(4), nn.ReLU(), nn.Dense(2)]),
        (5, 3),
    ),
    LayerCase("sequential-empty-params", lambda: nn.Sequential([nn.Tanh(), nn.Sigmoid()]), (5, 3)),
]
