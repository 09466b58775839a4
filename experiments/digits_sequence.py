"""scikit-learn's 8x8 digits read row by row: 8 steps of 8 pixels into a GRU.

Each standardised image is a sequence (8, 8): step t is pixel row t. Model:
GRU(64) -> last step -> Dense(10), Adam, batch 32. Target: test accuracy >= 0.95.
"""

import optax

from fbp import data, losses, nn
from fbp.data import Dataset
from fbp.run import Experiment


def rows(seed: int) -> Dataset:
    """Standardised digits, each (8, 8): 8 steps of 8 pixels; the statistics go along
    (shape (8, 8)), so ``fbp export`` takes raw pixel rows."""
    return data.reshape(data.load("digits", seed=seed), (8, 8), name="digits-rows")


EXPERIMENT = Experiment(
    name="digits-sequence",
    description="8x8 digits as 8 steps of 8 pixels: GRU(64) -> last step -> Dense(10), Adam",
    data=rows,
    model=lambda ds: nn.Sequential([nn.GRU(64), nn.LastStep(), nn.Dense(ds.classes)]),
    loss=losses.softmax_cross_entropy,
    optimizer=lambda lr, steps: optax.adam(lr),
    epochs=30,
    lr=3e-3,
    batch_size=32,
    log_every=5,
)
