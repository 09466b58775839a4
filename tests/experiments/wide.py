"""Test-only: a 4-256-64-3 tanh MLP on iris, Adam, batch 16: large enough leaves to shard."""

import optax

from fbp import data, losses, nn
from fbp.run import Experiment

EXPERIMENT = Experiment(
    name="wide",
    description="test-only 4-256-64-3 MLP on iris (leaves of 1024+ elements)",
    data=lambda seed: data.load("iris", seed=seed),
    model=lambda ds: nn.Sequential(
        [nn.Dense(256), nn.Tanh(), nn.Dense(64), nn.Tanh(), nn.Dense(3)]
    ),
    loss=losses.softmax_cross_entropy,
    optimizer=lambda lr, steps: optax.adam(lr),
    epochs=2,
    lr=0.01,
    batch_size=16,
    checkpoint_every=1,
    features=4,
)
