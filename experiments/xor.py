"""XOR with the classic 2-4-1 sigmoid MLP, MSE and plain full-batch gradient descent."""

import numpy as np
import optax

from fbp import losses, nn
from fbp.data import Dataset, Split
from fbp.run import Experiment

X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
Y = np.array([[0], [1], [1], [0]], np.float32)


def data(seed: int) -> Dataset:
    s = Split(X, Y)
    return Dataset(train=s, val=Split(X[:0], Y[:0]), test=s, classes=None, name="xor")


def report(result) -> list[str]:
    pred = np.asarray(result.model.apply(result.state.params, X)).ravel()
    rounded = np.round(pred).astype(int).tolist()
    return [
        "predictions " + " ".join(f"{p:.3f}" for p in pred) + f"  -> rounded {rounded}",
        f"solved: {rounded == [0, 1, 1, 0] and result.test['loss'] < 0.01}",
    ]


EXPERIMENT = Experiment(
    name="xor",
    description="2-4-1 sigmoid MLP learns XOR with MSE and plain gradient descent",
    data=data,
    model=lambda ds: nn.Sequential([nn.Dense(4), nn.Sigmoid(), nn.Dense(1), nn.Sigmoid()]),
    loss=losses.mse,
    optimizer=lambda lr, steps: optax.sgd(lr),
    epochs=10000,
    lr=2.0,
    batch_size=None,
    log_every=1000,
    report=report,
)
