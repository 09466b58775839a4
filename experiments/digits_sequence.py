"""scikit-learn's 8x8 digits read row by row: 8 steps of 8 pixels into a GRU.

Each standardised image is a sequence (8, 8): step t is pixel row t. Model:
GRU(64) -> last step -> Dense(10), Adam, batch 32. Target: test accuracy >= 0.95.
"""

import optax

from fbp import data, losses, nn
from fbp.data import Dataset, Split
from fbp.experiment import Experiment


def rows(seed: int) -> Dataset:
    ds = data.load("digits", seed=seed)
    seq = [Split(s.x.reshape(-1, 8, 8), s.y) for s in (ds.train, ds.val, ds.test)]
    return Dataset(*seq, classes=ds.classes, name="digits-rows")


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
