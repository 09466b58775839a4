"""Does fbp's ``conv`` XLA:CPU setting cost anything outside convolutions?

XLA reads ``XLA_FLAGS`` once per process, so each setting (``xla``: XLA's defaults;
``conv``: ``fbp.xla_config.SETTINGS['conv']``) runs in its own child process with
``FBP_XLA=off``; children of the two settings alternate (``--repeats`` each). A
child compiles the train step of each model (MLP 64-1024-1024-10 in float32 and
bfloat16-mixed, LSTM H=256, the char-lm transformer, a digits-mlp epoch, a
digits-cnn step), prints each compiled program's fingerprint
(``benchmarks.common.hlo_fingerprint``) and its median step time. Equal fingerprints
mean XLA compiled the same program under both settings: any time difference is noise.

Usage:
  python benchmarks/cpu_setting.py [--repeats 2] [--rounds 8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODELS = ("mlp", "mlp bf16-mixed", "lstm", "char-lm", "digits-mlp epoch", "digits-cnn")


def _programs(quick: bool):
    """name -> (jitted step, args): the programs a child compiles and times."""
    import jax
    import optax
    import precision as bench

    from fbp import data, losses, nn, train

    out = {}
    for name in ("mlp", "lstm", "char-lm", "digits-cnn"):
        model, loss, x, y = bench.case(name, quick)
        opt = optax.sgd(1e-3)
        ts = train.init(model, opt, jax.random.key(1), x)
        out[name] = (jax.jit(train.step_fn(model, loss, opt)), (ts, x, y))
        if name == "mlp":
            step = jax.jit(train.step_fn(model, loss, opt, precision="bf16-mixed"))
            out["mlp bf16-mixed"] = (step, (ts, x, y))
    ds = data.load("digits", seed=0)
    model = nn.Sequential([nn.Dense(128), nn.ReLU(), nn.Dense(10)])
    opt = optax.adam(1e-3)
    x, y = jax.numpy.asarray(ds.train.x), jax.numpy.asarray(ds.train.y)
    ts = train.init(model, opt, jax.random.key(0), x)
    epoch = train.make_epoch(model, losses.softmax_cross_entropy, opt, batch_size=32)
    out["digits-mlp epoch"] = (epoch, (ts, x, y))
    return out


def child(rounds: int, quick: bool) -> dict:
    import common

    programs = _programs(quick)
    result = {}
    for name, (fn, args) in programs.items():
        text = fn.lower(*args).compile().as_text()
        result[name] = {"fingerprint": common.hlo_fingerprint(text)}
    fns = {name: (lambda fn=fn, args=args: fn(*args)) for name, (fn, args) in programs.items()}
    times = common.interleaved(fns, rounds=rounds, warmup=2)
    for name, ts in times.items():
        result[name]["ms"] = 1e3 * common.median(ts)
    return result


def run_child(setting: str, rounds: int, quick: bool) -> dict:
    from fbp import xla_config

    env = {**os.environ, "FBP_XLA": "off", "PYTHONPATH": str(HERE.parent)}
    env["XLA_FLAGS"] = xla_config.format_flags(xla_config.flags_for(setting))
    cmd = [sys.executable, __file__, "--child", "--rounds", str(rounds)] + ["--quick"] * quick
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.rounds, args.quick)))
        return
    import common

    runs: dict[str, list[dict]] = {"xla": [], "conv": []}
    for r in range(args.repeats):
        for setting in ("xla", "conv") if r % 2 == 0 else ("conv", "xla"):
            runs[setting].append(run_child(setting, args.rounds, args.quick))
    print(common.machine())
    rows = []
    for name in MODELS:
        fx = {run[name]["fingerprint"] for run in runs["xla"]}
        fc = {run[name]["fingerprint"] for run in runs["conv"]}
        mx = common.median([run[name]["ms"] for run in runs["xla"]])
        mc = common.median([run[name]["ms"] for run in runs["conv"]])
        same = "yes" if fx == fc and len(fx) == 1 else "no"
        rows.append([name, same, f"{mx:.2f}", f"{mc:.2f}", f"{mc / mx:.2f}"])
    headers = ["program", "same program", "xla ms", "conv ms", "conv / xla"]
    print(common.table(headers, rows))


if __name__ == "__main__":
    main()
