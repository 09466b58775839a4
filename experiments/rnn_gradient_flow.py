"""Vanishing and exploding gradients through time: SimpleRNN vs LSTM, and gradient clipping.

Adding problem with T=50 (see adding_problem.py). Variants: a SimpleRNN with an
orthogonal recurrent init (gain 1), one with gain 2 (exploding), the same with
gradients clipped to global norm 1 (``optax.clip_by_global_norm`` through the
spec's ``clip``), and an LSTM. The report measures, with fbp's own backward, the
error signal that reaches each input step, ``‖∂L/∂x_t‖`` (mean over a test batch),
before and after training, and plots it with the training curves to
``gradient_flow.png`` in the run's directory (``runs/rnn-gradient-flow`` without ``--out``).

What it shows (seed 0): at init the SimpleRNN's signal shrinks going back in time
(‖∂L/∂x_0‖/‖∂L/∂x_49‖ ≈ 0.03: vanishing) while gain 2 makes it grow ≈ 7600×
(exploding); SGD on the exploding network without clipping saturates it (the
signal reaching the inputs ends at 0) while the clipped run keeps its gradient and
its loss falls steadily. Five epochs of SGD do not solve the task for any variant;
adding_problem.py is the experiment that does.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fbp import figures, losses, nn
from fbp.data import Dataset
from fbp.run import Experiment

_spec = importlib.util.spec_from_file_location(
    "fbp_experiment_adding_problem_data", Path(__file__).with_name("adding_problem.py")
)
adding = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(adding)

T, HIDDEN, N_PROBE = 50, 64, 500


def data(seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    splits = [adding.adding_split(rng, n, T) for n in (4000, 500, 1000)]
    return Dataset(*splits, classes=None, name=f"adding-T{T}")


def model(cell, **kw):
    return lambda ds: nn.Sequential([cell(HIDDEN, **kw), nn.LastStep(), nn.Dense(1)])


def input_grad_norms(net, params, x, y) -> np.ndarray:
    """‖∂L/∂x_t‖ per step t, mean over the batch, by the model's hand-written backward."""
    pred, res = net.forward(params, x)
    _, dx = net.backward(params, res, losses.mse.backward(pred, y))
    return np.asarray(jnp.mean(jnp.linalg.norm(dx, axis=-1), axis=0))


def _ratio(g: np.ndarray) -> str:
    """‖∂L/∂x_0‖ / ‖∂L/∂x_T-1‖, or a word when the signal has died out."""
    if not np.isfinite(g).all():
        return "non-finite"
    return f"{g[0] / g[-1]:.1e}" if g[-1] > 0 else f"{g[0]:.1e} / 0 (dead)"


def report(result) -> list[str]:
    runs = result.variants or {"run": result}
    x = jnp.asarray(result.dataset.test.x[:N_PROBE])
    y = jnp.asarray(result.dataset.test.y[:N_PROBE])
    fig = figures.new_figure(figsize=(16, 4.5))
    axes = fig.subplots(1, 3)
    lines = [
        "| variant | ‖∂L/∂x_0‖/‖∂L/∂x_T-1‖ at init | after training | test MSE |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        init = r.model.init(jax.random.key(r.config["seed"]), x)
        g0 = input_grad_norms(r.model, init, x, y)
        g1 = input_grad_norms(r.model, r.state.params, x, y)
        axes[0].semilogy(g0, label=name)
        axes[1].semilogy(g1, label=name)
        axes[2].semilogy(
            [h["epoch"] for h in r.history], [h["loss"] for h in r.history], marker="o", label=name
        )
        lines.append(f"| {name} | {_ratio(g0)} | {_ratio(g1)} | {r.test['loss']:.4f} |")
    for ax, title in zip(
        axes, ["‖∂L/∂x_t‖ at init", "‖∂L/∂x_t‖ after training", "training loss (MSE)"], strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("time step t" if "x_t" in title else "epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(result.out) if result.out is not None else Path.cwd() / "runs" / "rnn-gradient-flow"
    out.mkdir(parents=True, exist_ok=True)
    figures.save_figure(fig, out / "gradient_flow.png")
    lines.append(f"plot: {out / 'gradient_flow.png'}")
    return lines


EXPERIMENT = Experiment(
    name="rnn-gradient-flow",
    description="adding problem T=50: per-step ‖∂L/∂x_t‖ of SimpleRNN (gain 1, 2, clipped) vs LSTM",
    data=data,
    model=model(nn.SimpleRNN),
    loss=losses.mse,
    optimizer=lambda lr, steps: optax.sgd(lr, momentum=0.9),
    epochs=5,
    lr=0.01,
    batch_size=50,
    report=report,
    variants={
        "simple-rnn": {"model": model(nn.SimpleRNN)},
        "simple-rnn-gain2": {"model": model(nn.SimpleRNN, w_hh_gain=2.0)},
        "simple-rnn-gain2-clipped": {"model": model(nn.SimpleRNN, w_hh_gain=2.0), "clip": 1.0},
        "lstm": {"model": model(nn.LSTM)},
    },
)
