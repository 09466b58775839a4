"""Test-only: a 4-8-3 tanh MLP on iris, Adam, batch 16 (6 steps per epoch)."""

import optax

from fbp import data, losses, nn
from fbp.run import Experiment

EXPERIMENT = Experiment(
    name="tiny",
    description="test-only 4-8-3 MLP on iris",
    data=lambda seed: data.load("iris", seed=seed),
    model=lambda ds: nn.Sequential([nn.Dense(8), nn.Tanh(), nn.Dense(3)]),
    loss=losses.softmax_cross_entropy,
    optimizer=lambda lr, steps: optax.adam(lr),
    epochs=4,
    lr=0.01,
    batch_size=16,
    checkpoint_every=1,
    features=4,
)
