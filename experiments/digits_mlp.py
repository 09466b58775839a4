"""scikit-learn's 8x8 digits, standardised, a 64-128-10 MLP trained with Adam."""

import optax

from fbp import data, losses, nn
from fbp.run import Experiment

EXPERIMENT = Experiment(
    name="digits-mlp",
    description="64-128-10 ReLU MLP on scikit-learn's 8x8 digits, Adam, 100 epochs of batch 32",
    data=lambda seed: data.load("digits", seed=seed),
    model=lambda ds: nn.Sequential([nn.Dense(128), nn.ReLU(), nn.Dense(10)]),
    loss=losses.softmax_cross_entropy,
    optimizer=lambda lr, steps: optax.adam(lr),
    epochs=100,
    lr=1e-3,
    batch_size=32,
    log_every=10,
)
