"""The digits MLP trained with DP-SGD at epsilon 1, 3 and 8 (delta 1e-5), next to the plain run.

The 64-128-10 ReLU MLP of ``digits-mlp`` (Adam, lr 3e-3, 40 epochs of batch 64). Each
private variant clips every example's gradient to norm 1 and adds Gaussian noise
whose multiplier ``fbp.extend.accounting.noise_for_epsilon`` calibrates so that the
run's 760 steps (sampling rate 64/1257) end at the target epsilon; the runner logs the
epsilon actually spent per epoch (``fbp.run.privacy``). The report tabulates test accuracy
against the final epsilon and writes ``accuracy_vs_epsilon.png``.
"""

import logging

import optax

from fbp import data, losses, nn
from fbp.figures import new_figure, save_figure
from fbp.run import Experiment

EPOCHS, BATCH, TRAIN_EXAMPLES, CLIP, DELTA = 40, 64, 1257, 1.0, 1e-5
TARGETS = (8.0, 3.0, 1.0)


def noise_multipliers() -> dict[float, float]:
    """The noise multiplier for each target epsilon over this run's steps.

    Without dp-accounting (the ``dp`` extra) the multipliers cannot be calibrated;
    they are then 1.0, and the runner refuses the private variants with the install
    line before training anything.
    """
    try:
        from fbp.extend.accounting import noise_for_epsilon

        steps = EPOCHS * (TRAIN_EXAMPLES // BATCH)
        absl = logging.getLogger("absl")  # RDP orders that do not converge are reported there
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            return {
                eps: noise_for_epsilon(
                    eps, sampling_rate=BATCH / TRAIN_EXAMPLES, steps=steps, delta=DELTA
                )
                for eps in TARGETS
            }
        finally:
            absl.setLevel(level)
    except ImportError:
        return dict.fromkeys(TARGETS, 1.0)


def report(result) -> list[str]:
    """Accuracy against epsilon: a table, and the plot when the run has a directory."""
    rows = []
    for name, r in result.variants.items():
        eps = r.history[-1].get("epsilon") if r.history else None
        noise = r.config.get("dp_noise")
        rows.append((name, eps, noise, r.test["accuracy"]))
    lines = [
        "| run | epsilon (delta 1e-5) | noise multiplier | test accuracy |",
        "| --- | --- | --- | --- |",
    ]
    for name, eps, noise, acc in rows:
        e = "inf (not private)" if eps is None else f"{eps:.2f}"
        s = "-" if noise is None else f"{noise:.3f}"
        lines.append(f"| {name} | {e} | {s} | {acc:.4f} |")
    if result.out is not None:
        path = result.out / "accuracy_vs_epsilon.png"
        fig = new_figure(figsize=(6, 4))
        ax = fig.add_subplot()
        private = sorted((eps, acc) for _, eps, _, acc in rows if eps is not None)
        ax.plot(*zip(*private, strict=True), "o-", label="DP-SGD (clip 1)")
        for _, eps, _, acc in rows:
            if eps is None:
                ax.axhline(acc, color="gray", ls="--", label="non-private")
        ax.set_xscale("log")
        ax.set_xticks([e for e, _ in private], [f"{e:.3g}" for e, _ in private])
        ax.minorticks_off()
        ax.set_xlabel("epsilon (delta 1e-5)")
        ax.set_ylabel("test accuracy")
        ax.set_title("digits MLP: accuracy against privacy budget")
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, path)
        lines.append(f"plot: {path}")
    return lines


_NOISE = noise_multipliers()

EXPERIMENT = Experiment(
    name="digits-dp",
    description="digits MLP with DP-SGD (clip 1) at epsilon 8, 3, 1 (delta 1e-5) vs non-private",
    data=lambda seed: data.load("digits", seed=seed),
    model=lambda ds: nn.Sequential([nn.Dense(128), nn.ReLU(), nn.Dense(10)]),
    loss=losses.softmax_cross_entropy,
    optimizer=lambda lr, steps: optax.adam(lr),
    epochs=EPOCHS,
    lr=3e-3,
    batch_size=BATCH,
    log_every=10,
    report=report,
    variants={
        "non-private": {},
        **{
            f"dp-eps{eps:g}": {"dp_clip": CLIP, "dp_noise": _NOISE[eps], "dp_delta": DELTA}
            for eps in TARGETS
        },
    },
)
