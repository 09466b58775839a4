"""Learning without weight transport: backprop vs feedback alignment, DFA and sign symmetry.

The same 64-128-128-128-10 tanh MLP, the same SGD with momentum, four backward
modes (``fbp.rules``): backprop (wᵀ), feedback alignment (fixed random Bᵀ;
Lillicrap et al. 2016), direct feedback alignment (the output error through a fixed
random matrix straight to every hidden layer; Nøkland 2016) and sign symmetry
(sign(w)ᵀ; Liao, Leibo & Poggio 2016). Every epoch logs, per layer, the angle
between the rule's update and the true gradient on a fixed batch.
"""

import jax
import jax.numpy as jnp
import optax

from fbp import data, diagnostics, losses, nn, rules
from fbp.run import Experiment

LOSS = losses.softmax_cross_entropy
FEEDBACK_KEY = 1  # the fixed random feedback matrices are drawn from this key
X_EXAMPLE = jnp.zeros((1, 64), jnp.float32)  # digits: 64 features


def model(ds):
    return nn.Sequential(
        [
            nn.Dense(128),
            nn.Tanh(),
            nn.Dense(128),
            nn.Tanh(),
            nn.Dense(128),
            nn.Tanh(),
            nn.Dense(ds.classes),
        ]
    )


def rule_grad_fn(m, rule):
    return rules.grad_fn(m, LOSS, rule, jax.random.key(FEEDBACK_KEY), X_EXAMPLE)


def variant(rule):
    def probe(m, loss, opt):
        angles = rules.alignment_probe(m, loss, rule_grad_fn(m, rule))
        stats = diagnostics.stats_fn(m, loss, opt)
        return lambda ts, x, y: {**angles(ts, x, y), **stats(ts, x, y)}

    return {"grad_fn": lambda m, ds: rule_grad_fn(m, rule), "probe": probe}


def report(result) -> list[str]:
    runs = result.variants
    last = {n: r.history[-1] for n, r in runs.items()}
    layers = sorted(
        {k for row in last.values() for k in row if k.startswith("angle/")},
        key=lambda k: int(k.split("/")[1]),
    )
    lines = [
        "| rule | test accuracy | " + " | ".join(f"angle {k[6:]} (°)" for k in layers) + " |",
        "| --- | --- |" + " --- |" * len(layers),
    ]
    for n, r in runs.items():
        angles = " | ".join(f"{last[n][k]:.1f}" for k in layers)
        lines.append(f"| {n} | {r.test['accuracy']:.4f} | {angles} |")
    if result.out is not None:
        histories = {n: r.history for n, r in runs.items()}
        diagnostics.plot_metric(histories, result.out / "val_accuracy.png")
        diagnostics.plot_layer_series(
            {n: h for n, h in histories.items() if n != "backprop"},
            result.out / "alignment_angles.png",
            "angle",
            log=False,
            title="angle between the rule's update and the true gradient (degrees)",
        )
        lines.append(
            f"plots: {result.out / 'val_accuracy.png'}, {result.out / 'alignment_angles.png'}"
        )
    return lines


EXPERIMENT = Experiment(
    name="digits-feedback-alignment",
    description="BP vs feedback alignment vs DFA vs sign symmetry on digits, with alignment angles",
    data=lambda seed: data.load("digits", seed=seed),
    model=model,
    loss=LOSS,
    optimizer=lambda lr, steps: optax.sgd(lr, momentum=0.9),
    epochs=60,
    lr=0.01,
    batch_size=32,
    log_every=20,
    report=report,
    variants={
        "backprop": variant("backprop"),
        "feedback-alignment": variant("feedback_alignment"),
        "direct-feedback-alignment": variant("direct_feedback_alignment"),
        "sign-symmetry": variant("sign_symmetry"),
    },
)
