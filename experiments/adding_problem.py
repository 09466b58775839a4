"""The adding problem (Hochreiter & Schmidhuber 1997), T=100: LSTM vs SimpleRNN.

Each sequence has T steps of two features: a value drawn from U(0, 1) and a marker
that is 1 at exactly two steps (one in each half) and 0 elsewhere. The target is
the sum of the two marked values. Predicting the mean (1.0) always gives a test
MSE of 1/6 ≈ 0.167; a model that has learnt to remember across ~50-100 steps gets
far below. Model: recurrent layer (64 units) -> last step -> Dense(1), Adam with
gradients clipped to global norm 1. The LSTM solves it (test MSE < 0.01); the
SimpleRNN, whose gradient vanishes over the gap, stays near the baseline.
"""

import numpy as np
import optax

from fbp import losses, nn
from fbp.data import Dataset, Split
from fbp.run import Experiment

T, HIDDEN = 100, 64
N_TRAIN, N_VAL, N_TEST = 10_000, 1_000, 2_000
BASELINE = 1 / 6  # MSE of always predicting 1.0: Var(u1 + u2) = 2/12


def adding_split(rng: np.random.Generator, n: int, time: int = T) -> Split:
    """n sequences (n, time, 2) float32 and targets (n, 1) float32."""
    values = rng.uniform(0, 1, (n, time)).astype(np.float32)
    first = rng.integers(0, time // 2, n)
    second = rng.integers(time // 2, time, n)
    marks = np.zeros((n, time), np.float32)
    marks[np.arange(n), first] = 1
    marks[np.arange(n), second] = 1
    y = (values[np.arange(n), first] + values[np.arange(n), second])[:, None]
    return Split(np.stack([values, marks], axis=-1), y.astype(np.float32))


def adding_data(seed: int, time: int = T) -> Dataset:
    rng = np.random.default_rng(seed)
    splits = [adding_split(rng, n, time) for n in (N_TRAIN, N_VAL, N_TEST)]
    return Dataset(*splits, classes=None, name=f"adding-T{time}")


def model(cell):
    return lambda ds: nn.Sequential([cell(HIDDEN), nn.LastStep(), nn.Dense(1)])


def report(result) -> list[str]:
    runs = result.variants or {"run": result}
    lines = [f"baseline (always predict 1.0): test MSE {BASELINE:.4f}"]
    for name, r in runs.items():
        mse = r.test["loss"]
        lines.append(
            f"{name}: test MSE {mse:.4f} ({mse / BASELINE:.3f} of baseline), "
            f"solved (< 0.01): {mse < 0.01}, {r.train_seconds:.0f} s"
        )
    return lines


EXPERIMENT = Experiment(
    name="adding-problem",
    description="adding problem T=100: LSTM(64) reaches MSE < 0.01, SimpleRNN(64) stays near 0.167",
    data=adding_data,
    model=model(nn.LSTM),
    loss=losses.mse,
    optimizer=lambda lr, steps: optax.adam(lr),
    epochs=12,
    lr=3e-3,
    batch_size=50,
    clip=1.0,
    log_every=1,
    report=report,
    variants={"lstm": {"model": model(nn.LSTM)}, "simple-rnn": {"model": model(nn.SimpleRNN)}},
)
