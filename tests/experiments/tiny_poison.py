"""Test-only: linear regression whose row 5 overflows the loss when TINY_POISON=1."""

import os

import numpy as np
import optax

from fbp import losses, nn
from fbp.data import Dataset, Split
from fbp.run import Experiment


def data(seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(48, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)
    if os.environ.get("TINY_POISON") == "1":
        x[5] = 1e20  # finite, but its squared error overflows float32
    return Dataset(
        Split(x[:32], y[:32]), Split(x[32:40], y[32:40]), Split(x[40:], y[40:]), None, "poison"
    )


EXPERIMENT = Experiment(
    name="tiny-poison",
    description="test-only regression with an overflowing row",
    data=data,
    model=lambda ds: nn.Sequential([nn.Dense(1)]),
    loss=losses.mse,
    optimizer=lambda lr, steps: optax.sgd(lr),
    epochs=3,
    lr=0.05,
    batch_size=8,
    checkpoint_every=1,
)
