"""digits-mlp training: fbp's scanned epochs vs scikit-learn's MLPClassifier.

Both train a 64-128-10 ReLU MLP with Adam (lr 1e-3, batch 32, 100 epochs, no weight
penalty) on the same standardised training split of ``fbp.data.load('digits', seed)``
and are scored on its test split. fbp runs the experiment file
experiments/digits_mlp.py through ``fbp.train.make_epoch`` (one jitted ``lax.scan``
per epoch); its first call (trace, compile, one discarded epoch) is timed apart.
scikit-learn runs ``MLPClassifier(solver='adam', alpha=0, n_iter_no_change=max_iter,
tol=0)`` so it trains all epochs. Differences that remain: scikit-learn also steps
on the last partial batch of an epoch, and initialises weights its own way.

``--json OUT.json`` instead times, for one seed in interleaved repeats, the same
100-epoch training by fbp, by ``jax.grad`` in the same ``make_epoch`` (its
``grad_fn``), by PyTorch (the same MLP and Adam, eager, one shuffled pass of batches
per epoch) and by scikit-learn, and writes the results as JSON.

The JAX platform comes from the environment (``JAX_PLATFORMS``); PyTorch uses CUDA
when JAX runs on a GPU and it can. fbp's XLA:CPU setting for this model is applied
first (``fbp.configure_cpu``).

Usage:
  python benchmarks/digits_vs_sklearn.py            # seeds 0 1 2
  python benchmarks/digits_vs_sklearn.py --quick    # 1 seed, 2 epochs (smoke test)
  python benchmarks/digits_vs_sklearn.py --json OUT.json [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

from fbp import train  # noqa: E402
from fbp.run import experiment

EXPERIMENT_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "digits_mlp.py"
)


def jax_grad_fn(model, loss):
    """``jax.value_and_grad`` of the plain loss, in ``step_fn``'s ``grad_fn`` signature."""
    import fbp
    from fbp.core import Aux

    vg = jax.value_and_grad(fbp.loss_fn(model, loss))

    def f(params, x, y, *, key=None, state=None, train=True):
        value, grads = vg(params, x, y, key=key, state=state, train=train)
        return (value, Aux(None, None)), grads

    return f


def fbp_trainer(exp, ds, seed: int, epochs: int, autodiff: bool = False):
    """Compile the epoch ahead of time; return (first-call seconds, train function).

    First-call seconds cover tracing, compiling and one discarded epoch (the first
    execution of a compiled program pays one-off costs). The train function runs
    ``epochs`` epochs from the same initial state and returns (seconds, CPU seconds,
    test metrics).
    """
    model = exp.model(ds)
    steps = epochs * (ds.train.x.shape[0] // exp.batch_size)
    opt = exp.optimizer(exp.lr, steps)
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    ts0 = train.init(model, opt, jax.random.key(seed), x)
    common.block(ts0)
    t0 = time.perf_counter()
    grad_fn = jax_grad_fn(model, exp.loss) if autodiff else None
    epoch = train.make_epoch(model, exp.loss, opt, batch_size=exp.batch_size, grad_fn=grad_fn)
    compiled = epoch.lower(ts0, x, y).compile()
    common.block(compiled(ts0, x, y))  # pure: ts0 is unchanged
    first_call = time.perf_counter() - t0

    def run() -> tuple[float, float, dict]:
        c0, t0 = time.process_time(), time.perf_counter()
        ts = ts0
        for _ in range(epochs):
            ts, metrics = compiled(ts, x, y)
        common.block(ts)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        test = train.evaluate(
            model, exp.loss, ts.params, jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
        )
        return seconds, cpu, test

    return first_call, run


def run_sklearn(exp, ds, seed: int, epochs: int) -> dict:
    clf = MLPClassifier(
        hidden_layer_sizes=(128,),
        activation="relu",
        solver="adam",
        alpha=0.0,
        batch_size=exp.batch_size,
        learning_rate_init=exp.lr,
        max_iter=epochs,
        n_iter_no_change=epochs,
        tol=0.0,
        shuffle=True,
        random_state=seed,
    )
    c0, t0 = time.process_time(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(ds.train.x, ds.train.y)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    acc = float(np.mean(clf.predict(ds.test.x) == ds.test.y))
    return {"train": train_s, "cpu": cpu_s, "acc": acc, "epochs": clf.n_iter_}


def torch_trainer(exp, ds, seed: int, epochs: int):
    """The same MLP (64-128-10 ReLU) and Adam in PyTorch; returns a train function.

    On a CPU it runs one thread: at batch 32 more threads only add synchronisation
    (and spin-waiting collapses when other jobs share the cores).
    """
    import torch

    device = common.torch_device()
    if device == "cpu":
        torch.set_num_threads(1)
    x = torch.tensor(np.asarray(ds.train.x, np.float32)).to(device)
    y = torch.tensor(np.asarray(ds.train.y, np.int64)).to(device)
    bs, n = exp.batch_size, x.shape[0]

    xt = torch.tensor(np.asarray(ds.test.x, np.float32)).to(device)
    yt = torch.tensor(np.asarray(ds.test.y, np.int64)).to(device)

    def run() -> tuple[float, float]:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], 128), torch.nn.ReLU(), torch.nn.Linear(128, ds.classes)
        ).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=exp.lr)
        lossf = torch.nn.CrossEntropyLoss()
        t0 = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(n, device=device)
            for i in range(n // bs):
                idx = order[i * bs : (i + 1) * bs]
                opt.zero_grad(set_to_none=True)
                lossf(net(x[idx]), y[idx]).backward()
                opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            acc = float((net(xt).argmax(-1) == yt).float().mean())
        return seconds, acc

    return run


def study(exp, seed: int, epochs: int, repeats: int, json_path: str) -> None:
    """fbp, jax.grad, PyTorch and scikit-learn on the same training, interleaved."""
    ds = exp.data(seed)
    first_fbp, fbp_run = fbp_trainer(exp, ds, seed, epochs)
    first_jax, jax_run = fbp_trainer(exp, ds, seed, epochs, autodiff=True)
    torch_run = torch_trainer(exp, ds, seed, epochs)
    torch_run()  # warm-up (allocator, threads)
    wall: dict[str, list[float]] = {"fbp": [], "jax.grad": [], "PyTorch": [], "scikit-learn": []}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    acc = {}
    for _ in range(repeats):
        for name, run in (("fbp", fbp_run), ("jax.grad", jax_run)):
            seconds, c, test = run()
            wall[name].append(seconds)
            cpu[name].append(c)
            acc[name] = test["accuracy"]
        c0 = time.process_time()
        seconds, acc["PyTorch"] = torch_run()
        wall["PyTorch"].append(seconds)
        cpu["PyTorch"].append(time.process_time() - c0)
        sk = run_sklearn(exp, ds, seed, epochs)
        wall["scikit-learn"].append(sk["train"])
        cpu["scikit-learn"].append(sk["cpu"])
        acc["scikit-learn"] = sk["acc"]
    variants = {k: common.summary(wall[k], cpu[k], per=epochs) for k in wall}
    for k, v in variants.items():
        v["train_s"] = common.median(wall[k])
    speed = common.median(wall["scikit-learn"]) / common.median(wall["fbp"])
    model = exp.model(ds)
    epoch = train.make_epoch(model, exp.loss, exp.optimizer(exp.lr, 1), batch_size=exp.batch_size)
    ts = train.init(model, exp.optimizer(exp.lr, 1), jax.random.key(seed), jnp.asarray(ds.train.x))
    compiled = epoch.lower(ts, jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)).compile()
    common.write_json(
        json_path,
        common.record(
            "digits",
            epochs=epochs,
            repeats=repeats,
            seed=seed,
            variants=variants,
            first_call_s={"fbp": first_fbp, "jax.grad": first_jax},
            accuracy=acc,
            speedup_vs_sklearn=speed,
            hlo=common.hlo_fingerprint(compiled.as_text()),
            library_fusions=common.library_fusions(compiled.as_text()),
        ),
    )
    rows = [
        [
            k,
            f"{v['train_s']:.3f}",
            v["spread"],
            f"{v['cpu_ms'] * epochs / 1e3:.3f}",
            f"{acc[k]:.3f}",
        ]
        for k, v in variants.items()
    ]
    print(common.table(["variant", f"train s ({epochs} epochs)", "IQR", "CPU s", "test acc"], rows))
    print(f"fbp speed-up over scikit-learn: {speed:.1f}x;  machine: {common.machine()}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs (smoke test)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per seed (median)")
    ap.add_argument("--json", metavar="PATH", help="fbp, jax.grad, PyTorch, scikit-learn; JSON")
    args = ap.parse_args(argv)
    import fbp

    fbp.configure_cpu(experiment=EXPERIMENT_FILE)  # before the first JAX computation
    exp = experiment.get(EXPERIMENT_FILE)
    if exp.penalty is not None or exp.weight_decay:
        raise SystemExit(
            "digits_vs_sklearn: the experiment has a weight penalty; "
            "this comparison assumes none (scikit-learn alpha=0)."
        )
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = 2 if args.quick else exp.epochs
    repeats = args.repeats or (1 if args.quick else 3)
    if args.json:
        study(exp, seeds[0], epochs, repeats, args.json)
        return
    rows, speedups, speedups_c, speedups_cpu = [], [], [], []
    for seed in seeds:
        ds = exp.data(seed)
        first_call, run = fbp_trainer(exp, ds, seed, epochs)
        f_s, s_s, f_c, s_c = [], [], [], []
        for _ in range(repeats):  # interleaved; each run is the same deterministic training
            seconds, cpu, test = run()
            f_s.append(seconds)
            f_c.append(cpu)
            sk = run_sklearn(exp, ds, seed, epochs)
            s_s.append(sk["train"])
            s_c.append(sk["cpu"])
        f_t, s_t = common.median(f_s), common.median(s_s)
        speedups_cpu.append(common.median(s_c) / common.median(f_c))
        speedups.append(s_t / f_t)
        speedups_c.append(s_t / (f_t + first_call))
        rows.append(
            [
                seed,
                f"{f_t:.3f}",
                f"{first_call:.2f}",
                f"{100 * test['accuracy']:.1f}%",
                f"{s_t:.2f}",
                f"{100 * sk['acc']:.1f}%",
                f"{speedups[-1]:.1f}x",
                f"{speedups_c[-1]:.1f}x",
                f"{speedups_cpu[-1]:.1f}x",
            ]
        )
    rows.append(
        [
            "median",
            "",
            "",
            "",
            "",
            "",
            f"{np.median(speedups):.1f}x",
            f"{np.median(speedups_c):.1f}x",
            f"{np.median(speedups_cpu):.1f}x",
        ]
    )
    print(
        f"digits-mlp ({exp.description}); train split {ds.train.x.shape[0]} examples, "
        f"test {ds.test.x.shape[0]}; {epochs} epochs. fbp: make_epoch, float32; "
        f"scikit-learn MLPClassifier(adam, alpha=0). Times are wall seconds of the "
        f"training loop, median of {repeats} interleaved runs per seed; fbp's first call "
        f"(trace + compile + one discarded epoch) is apart. The last column compares "
        f"process CPU seconds (all threads), steadier than wall time on a loaded machine.\n"
    )
    print(
        common.table(
            [
                "seed",
                "fbp train s",
                "fbp first call s",
                "fbp test acc",
                "sklearn train s",
                "sklearn test acc",
                "speed-up",
                "speed-up incl. first call",
                "speed-up by CPU time",
            ],
            rows,
        )
    )
    import sklearn

    print(f"\n- machine: {common.machine()}; scikit-learn {sklearn.__version__}")


if __name__ == "__main__":
    main()
