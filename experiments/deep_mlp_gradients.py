"""Vanishing and exploding gradients: a 10-layer MLP on digits, five ways.

Ten hidden layers of 64 units, SGD with momentum (an optimizer that does not
rescale each layer's step, so a vanishing gradient means a layer that does not
learn). Variants: sigmoid with a small N(0, 0.05²) init (the classic vanishing
case), tanh with Glorot, ReLU with He, and the sigmoid/small-init network with
LayerNorm or BatchNorm after every Dense. The per-layer gradient norms are logged
every epoch (``fbp.diagnostics.probe``) and plotted per variant.
"""

import optax

from fbp import data, diagnostics, losses, nn
from fbp.run import Experiment

DEPTH, WIDTH = 10, 64
SMALL = nn.initializers.normal(0.05)


def mlp(act, w_init, norm=None):
    def build(ds):
        layers = []
        for _ in range(DEPTH):
            layers.append(nn.Dense(WIDTH, w_init=w_init))
            if norm is not None:
                layers.append(norm())
            layers.append(act())
        return nn.Sequential([*layers, nn.Dense(ds.classes, w_init=w_init)])

    return build


def _first_last(history, stat="grad_norm"):
    row = history[-1]
    keys = sorted((k for k in row if k.startswith(stat + "/")), key=lambda k: int(k.split("/")[1]))
    return row[keys[0]], row[keys[-1]]


def report(result) -> list[str]:
    runs = result.variants
    lines = [
        "| variant | test accuracy | ‖dL/dW‖ first layer (epoch 1 → last) | last layer | "
        "first/last (last epoch) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        f0, l0 = _first_last(r.history[:1])
        f1, l1 = _first_last(r.history)
        lines.append(
            f"| {name} | {r.test['accuracy']:.4f} | {f0:.2e} → {f1:.2e} | {l0:.2e} → {l1:.2e} "
            f"| {f1 / l1:.1e} |"
        )
    if result.out is not None:
        histories = {n: r.history for n, r in runs.items()}
        for name, r in runs.items():
            diagnostics.plot_gradient_flow(r.history, r.out / "gradient_flow.png", title=name)
        diagnostics.plot_layer_series(
            histories,
            result.out / "grad_norms.png",
            "grad_norm",
            title="per-layer ‖dL/dW‖ over training (dark: first layer)",
        )
        diagnostics.plot_metric(histories, result.out / "val_accuracy.png")
        lines.append(f"plots: {result.out / 'grad_norms.png'}, {result.out / 'val_accuracy.png'}")
    return lines


EXPERIMENT = Experiment(
    name="deep-mlp-gradients",
    description="10-layer MLP on digits: sigmoid/small init vs tanh/Glorot vs ReLU/He vs norms",
    data=lambda seed: data.load("digits", seed=seed),
    model=mlp(nn.Sigmoid, SMALL),
    loss=losses.softmax_cross_entropy,
    optimizer=lambda lr, steps: optax.sgd(lr, momentum=0.9),
    epochs=30,
    lr=0.01,
    batch_size=32,
    log_every=10,
    probe=diagnostics.probe,
    report=report,
    variants={
        "sigmoid-small-init": {"model": mlp(nn.Sigmoid, SMALL)},
        "tanh-glorot": {"model": mlp(nn.Tanh, "glorot_uniform")},
        "relu-he": {"model": mlp(nn.ReLU, "he_normal")},
        "sigmoid-small-layernorm": {"model": mlp(nn.Sigmoid, SMALL, nn.LayerNorm)},
        "sigmoid-small-batchnorm": {"model": mlp(nn.Sigmoid, SMALL, nn.BatchNorm)},
    },
)
