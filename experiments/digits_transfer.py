"""Transfer learning: pretrain on digits 0-4, fine-tune on 5-9 from 20 examples per class.

The pretraining is itself an experiment (``PRETRAIN``, run by the runner, once per
seed); the fine-tuning variants start from its parameters (``Experiment.init``)
with a fresh output layer, and are compared with the same network trained from
scratch on the same 100 examples:

* ``scratch``: random init, every layer trained;
* ``frozen-backbone``: hidden layers wrapped in ``nn.Frozen`` (their weight
  gradients are never computed), only the new head learns;
* ``all-layers-head-lr-x10``: every layer trained, the pretrained ones at a tenth of the
  head's learning rate (``fbp.finetune.per_layer``, i.e. ``optax.multi_transform``);
* ``all-layers``: every layer trained at the same rate.
"""

import functools

import jax
import numpy as np
import optax

from fbp import data, finetune, losses, nn
from fbp.data import Dataset, Split
from fbp.run import Experiment, runner

PER_CLASS = 20
HEAD = "4"  # the output layer's key in the Sequential


def _classes(s: Split, lo: int, hi: int) -> Split:
    keep = (s.y >= lo) & (s.y <= hi)
    return Split(s.x[keep], s.y[keep])


def pretrain_data(seed: int) -> Dataset:
    """Digits 0-4 of the standardised digits (the statistics of all ten go along)."""
    ds = data.load("digits", seed=seed)
    tr, va, te = (_classes(s, 0, 4) for s in (ds.train, ds.val, ds.test))
    return ds._replace(train=tr, val=va, test=te, name="digits-0-4")


def finetune_data(seed: int) -> Dataset:
    """20 training examples of each of 5-9 (drawn by seed), the full 5-9 val/test splits."""
    ds = data.load("digits", seed=seed)
    tr = _classes(ds.train, 5, 9)
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(tr.y == c), PER_CLASS, replace=False) for c in range(5, 10)]
    )
    val, test = _classes(ds.val, 5, 9), _classes(ds.test, 5, 9)
    small = Split(tr.x[idx], tr.y[idx])
    return ds._replace(train=small, val=val, test=test, name="digits-5-9-small")


def mlp(frozen: bool = False):
    wrap = nn.Frozen if frozen else (lambda layer: layer)
    return lambda ds: nn.Sequential(
        [
            wrap(nn.Dense(128)),
            nn.ReLU(),
            wrap(nn.Dense(128)),
            nn.ReLU(),
            nn.Dense(ds.classes),
        ]
    )


PRETRAIN = Experiment(
    name="digits-transfer-pretrain",
    description="64-128-128-10 ReLU MLP on digits 0-4 (the pretraining of digits-transfer)",
    data=pretrain_data,
    model=mlp(),
    loss=losses.softmax_cross_entropy,
    optimizer=lambda lr, steps: optax.adam(lr),
    epochs=30,
    lr=1e-3,
    batch_size=32,
)


@functools.cache
def pretrained(seed: int):
    """The runner's result of PRETRAIN for this seed (run once per process)."""
    return runner.run(PRETRAIN, seed=seed, print_fn=lambda line: None)


def from_pretrained(model, ds, seed):
    """Pretrained hidden layers, a fresh output layer."""
    fresh = model.init(jax.random.key(seed + 1), ds.train.x[:1])
    return {**pretrained(seed).state.params, HEAD: fresh[HEAD]}


def report(result) -> list[str]:
    pre = pretrained(result.config["seed"])
    lines = [
        f"pretraining on 0-4: test accuracy {pre.test['accuracy']:.4f} ({pre.train_seconds:.1f} s)",
        "| variant | test accuracy on 5-9 | training time (s) |",
        "| --- | --- | --- |",
    ]
    for name, r in result.variants.items():
        lines.append(f"| {name} | {r.test['accuracy']:.4f} | {r.train_seconds:.2f} |")
    return lines


EXPERIMENT = Experiment(
    name="digits-transfer",
    description="pretrain on digits 0-4, fine-tune on 5-9 with 20 per class vs from scratch",
    data=finetune_data,
    model=mlp(),
    loss=losses.softmax_cross_entropy,
    optimizer=lambda lr, steps: optax.adam(lr),
    epochs=100,
    lr=1e-3,
    batch_size=20,
    log_every=50,
    report=report,
    variants={
        "scratch": {},
        "frozen-backbone": {"model": mlp(frozen=True), "init": from_pretrained},
        "all-layers-head-lr-x10": {
            "init": from_pretrained,
            "optimizer": lambda lr, steps: finetune.per_layer(
                {HEAD: optax.adam(lr)}, default=optax.adam(lr / 10)
            ),
        },
        "all-layers": {"init": from_pretrained},
    },
)
