"""The XLA:CPU flags study: every benchmark under every setting, one process per run.

XLA reads ``XLA_FLAGS`` once per process, so each (setting, benchmark) pair runs as
its own subprocess with ``XLA_FLAGS`` set to the setting's flags (and ``FBP_XLA=off``
so fbp adds nothing), optionally with the glibc malloc tunables. Runs are
interleaved in time: every repeat goes once through all settings (in a shuffled
order) and benchmarks, so drift on a shared machine spreads over all settings.
Inside each process the benchmark compares fbp, ``jax.grad`` and PyTorch in
interleaved rounds; the table reports per-process medians (the median over
repeats) and, for ratios, the median of the per-process ratios.

Each run also saves fbp's float32 gradients; they are compared with those of the
``xla`` setting (XLA's defaults) in the same allocator setting: a miscompile shows
as a large difference, reassociation as ~1e-6. ``--parity NAME ...`` also runs fbp's
parity suite (float64 against ``jax.grad`` and finite differences, plus its float32
cases) under each named setting.

Benchmarks are names (``mlp``, ``cnn``, ``lstm``, ``digits``) or paths of further
scripts that accept ``--json PATH`` and write ``benchmarks.common.record(...)`` with a
``variants`` mapping (e.g. ``benchmarks/attention.py``).

Usage:
  python benchmarks/xla_study.py --out study/ [--settings xla ynn-no-conv ...]
      [--benchmarks mlp cnn lstm digits benchmarks/attention.py] [--repeats 2]
      [--tunables off on] [--parity xla ynn-no-conv]
  python benchmarks/xla_study.py --out study/ --report   # tables from study/raw.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

YNN = "--xla_cpu_experimental_ynn_fusion_type"
XNN = "--xla_cpu_experimental_xnn_fusion_type"
GRAPH = "--xla_cpu_experimental_xnn_graph_fusion_mode"
ONEDNN = "--xla_cpu_use_onednn=true"
ONEDNN_FUSION = "--xla_cpu_experimental_onednn_fusion_type"
YNN_OFF = f"{YNN}=-individual_dot,-individual_convolution,-reduce"

# name -> XLA_FLAGS. jaxlib 0.10.2's YNN default list is individual_dot,
# individual_convolution, reduce (same compiled programs as setting it explicitly);
# '+x' / '-x' add to / remove from that list, a plain list replaces it.
SETTINGS: dict[str, str] = {
    "xla": "",
    "ynn-no-conv": f"{YNN}=-individual_convolution",
    "ynn-no-dot": f"{YNN}=-individual_dot",
    "ynn-no-reduce": f"{YNN}=-reduce",
    "ynn-off": YNN_OFF,
    "ynn=dot": f"{YNN}=dot",
    "ynn+dot": f"{YNN}=+dot",
    "ynn+eltwise": f"{YNN}=+eltwise",
    "ynn=dot,eltwise,reduce": f"{YNN}=dot,eltwise,reduce",
    "ynn-no-conv+eltwise": f"{YNN}=-individual_convolution,+eltwise",
    "xnn=dot,eltwise,reduce": f"{XNN}=dot,eltwise,reduce",
    "xnn-graph-greedy": f"{GRAPH}=XNN_GRAPH_FUSION_MODE_GREEDY",
    "xnn-graph-slinky": f"{GRAPH}=XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY",
    "xnnpack-off": "--xla_cpu_use_xnnpack=false",
    "onednn": ONEDNN,
    "onednn+fusions": f"{ONEDNN} {ONEDNN_FUSION}=dot,eltwise,reduce",
    "ynn-off+onednn": f"{YNN_OFF} {ONEDNN} {ONEDNN_FUSION}=dot",
    "ynn-off+xnn": f"{YNN_OFF} {XNN}=dot,eltwise,reduce {GRAPH}=XNN_GRAPH_FUSION_MODE_GREEDY",
}
BASELINE = "xla"

# name -> (script, arguments for a short run). {json} and {save} are filled in.
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "mlp": ("mlp.py", ["--rounds", "8", "--steps", "5", "--json", "{json}", "--save", "{save}"]),
    "cnn": ("cnn.py", ["--rounds", "6", "--json", "{json}", "--save", "{save}"]),
    "lstm": ("lstm.py", ["--child", "--rounds", "6", "--json", "{json}", "--save", "{save}"]),
    "digits": ("digits_vs_sklearn.py", ["--json", "{json}", "--repeats", "2"]),
}
PARITY_TESTS = ["tests/test_layers.py", "tests/test_zoo.py", "tests/test_recurrent.py"]
GRAD_RTOL = 1e-4  # float32 gradients of two settings: reassociation only


def child_env(setting: str, tunables: bool) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "FBP_XLA", "PYTHONPATH")
    }
    env.update(FBP_XLA="off", PYTHONPATH=str(ROOT))
    if SETTINGS[setting]:
        env["XLA_FLAGS"] = SETTINGS[setting]
    if tunables:
        env["GLIBC_TUNABLES"] = common.TUNABLES
    return env


def command(
    bench: str, json_path: Path, save: Path, rounds: int | None = None, torch_threads=None
) -> list[str]:
    """The command line of one run; ``rounds`` overrides the timed rounds (repeats),
    ``torch_threads`` the PyTorch variants (mlp, cnn, lstm)."""
    script, args = BENCHMARKS.get(bench, (bench, ["--json", "{json}"]))
    path = HERE / script if bench in BENCHMARKS else Path(script).resolve()
    fill = {"{json}": str(json_path), "{save}": str(save)}
    args = [fill.get(a, a) for a in args]
    for flag in ("--rounds", "--repeats"):
        if rounds and flag in args:
            args[args.index(flag) + 1] = str(rounds if flag == "--rounds" else max(1, rounds // 3))
    if torch_threads and bench in ("mlp", "cnn", "lstm"):
        args += ["--torch-threads", *map(str, torch_threads)]
    return [sys.executable, str(path), *args]


def bench_name(bench: str) -> str:
    return bench if bench in BENCHMARKS else Path(bench).stem


def run_one(
    out: Path,
    bench: str,
    setting: str,
    tunables: bool,
    rep: int,
    timeout: int,
    rounds=None,
    torch_threads=None,
) -> dict:
    tag = f"{bench_name(bench)}.{setting}.{'on' if tunables else 'off'}.{rep}"
    json_path, save = out / "runs" / f"{tag}.json", out / "grads" / f"{tag}.npz"
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            command(bench, json_path, save, rounds, torch_threads),
            env=child_env(setting, tunables),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", (e.stderr or b"").decode(errors="replace")
    row = {
        "kind": "bench",
        "bench": bench_name(bench),
        "setting": setting,
        "tunables": tunables,
        "rep": rep,
        "rc": rc,
        "seconds": time.perf_counter() - t0,
        "load_before": list(load0),
        "grads": str(save) if save.exists() else None,
    }
    if rc == 0 and json_path.exists():
        row["result"] = json.loads(json_path.read_text())
    else:
        row["error"] = err[-1500:]
    return row


def run_parity(setting: str, timeout: int) -> dict:
    t0, load0 = time.perf_counter(), os.getloadavg()
    cmd = [sys.executable, "-m", "pytest", *PARITY_TESTS, "-q", "-x", "-p", "no:randomly"]
    try:
        proc = subprocess.run(
            cmd,
            env=child_env(setting, False),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        rc, tail = proc.returncode, proc.stdout.strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", []
    return {
        "kind": "parity",
        "setting": setting,
        "rc": rc,
        "summary": tail[0] if tail else "",
        "seconds": time.perf_counter() - t0,
        "load_before": list(load0),
    }


# ----------------------------------------------------------------------------- report


def grad_diff(a: str | None, b: str | None) -> float | None:
    """max over leaves of max|a - b| / max|b| (None when either is missing)."""
    if not a or not b or not Path(a).exists() or not Path(b).exists():
        return None
    with np.load(a) as fa, np.load(b) as fb:
        errs = [
            float(np.max(np.abs(fa[k] - fb[k])) / max(float(np.max(np.abs(fb[k]))), 1e-30))
            for k in fb.files
        ]
    return max(errs, default=0.0)


PEERS = {  # bench -> (fbp variant, jax.grad variant, PyTorch variants, extra ratio)
    "mlp": (
        "fbp make_step",
        "jax.grad make_step",
        ("torch", "torch, 1 thread"),
        "dots, all in one call",
    ),
    "cnn": ("fbp", "jax.grad", ("PyTorch", "PyTorch, 1 thread"), None),
    "lstm": ("fbp", "jax.grad (textbook scan)", ("torch nn.LSTM", "torch nn.LSTM, 1 thread"), None),
    "digits": ("fbp", "jax.grad", ("PyTorch",), "scikit-learn"),
}


def _med(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def _fmt(x, spec=".1f", suffix=""):
    return "–" if x is None else f"{x:{spec}}{suffix}"


def report(rows: list[dict]) -> str:
    """Markdown tables, one per benchmark: a row per (setting, tunables), medians over runs."""
    benches = [r for r in rows if r["kind"] == "bench"]
    parity = {r["setting"]: r for r in rows if r["kind"] == "parity"}
    base = {
        (r["bench"], r["tunables"]): r
        for r in benches
        if r["setting"] == BASELINE and r.get("result")
    }
    out = []
    first = next((r["result"] for r in benches if r.get("result")), None)
    if first:
        out.append(f"jax {first['jax']}; machine: {first['machine'].split(', load')[0]}")
    for bench in dict.fromkeys(r["bench"] for r in benches):
        f, j, torches, extra = PEERS.get(bench, ("fbp", "jax.grad", ("PyTorch",), None))
        seen = {
            k
            for r in benches
            if r["bench"] == bench
            for k in r.get("result", {}).get("variants", {})
        }
        ts = [k for k in torches if k in seen] or [torches[0]]
        out.append(f"\n#### {bench}\n")
        head = ["setting", "tunables", "runs", "fbp ms", "fbp CPU ms", "fbp/jax.grad (CPU)"]
        head += [f"fbp/{t} (CPU)" for t in ts]
        if extra == "scikit-learn":
            head.append("scikit-learn/fbp (CPU)")
        elif extra:
            head.append("matmuls in one call / fbp (CPU)")
        head += ["grads vs xla", "same program as xla", "library fusions", "load", "parity"]
        table = []
        groups: dict[tuple, list[dict]] = {}
        for r in benches:
            if r["bench"] == bench:
                groups.setdefault((r["setting"], r["tunables"]), []).append(r)
        order = list(SETTINGS)
        for (setting, tun), rs in sorted(
            groups.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))
        ):
            ok = [r for r in rs if r.get("result")]
            if not ok:
                rc = rs[0]["rc"]
                table.append([setting, "on" if tun else "off", f"0/{len(rs)}: rc {rc}"])
                continue
            v = [r["result"]["variants"] for r in ok]

            def ratio(a, b, v=v):
                """'wall / CPU' medians of per-process ratios a/b."""
                got = []
                for key in ("ms", "cpu_ms"):
                    xs = [x[a][key] / x[b][key] for x in v if a in x and b in x and x[b].get(key)]
                    got.append(_med(xs))
                return "–" if got[0] is None else f"{got[0]:.2f} / {_fmt(got[1], '.2f')}"

            fm = _med([x[f]["ms"] for x in v])
            fs = _med([float(x[f]["spread"].strip("±%")) for x in v])
            b = base.get((bench, tun))
            diffs = [grad_diff(r.get("grads"), b and b.get("grads")) for r in ok]
            same = b and all(r["result"].get("hlo") == b["result"].get("hlo") for r in ok)
            fus = ok[0]["result"].get("library_fusions") or {}
            loads = [r["result"]["load"][0] for r in ok]
            p = parity.get(setting)
            row = [
                setting,
                "on" if tun else "off",
                f"{len(ok)}/{len(rs)}",
                f"{fm:.2f} ±{fs:.0f}%",
                _fmt(_med([x[f].get("cpu_ms") for x in v]), ".2f"),
                ratio(f, j),
            ]
            row += [ratio(f, t) for t in ts]
            if extra == "scikit-learn":
                row.append(ratio(extra, f))
            elif extra:
                row.append(ratio(extra, f))
            dmax = max((d for d in diffs if d is not None), default=None)
            flag = "" if dmax is None or dmax <= GRAD_RTOL else " DIFFERS"
            row += [
                _fmt(dmax, ".0e") + flag,
                "–" if b is None else ("yes" if same else "no"),
                ", ".join(f"{k.strip('_').split('_')[0]} {n}" for k, n in fus.items()) or "none",
                f"{min(loads):.1f}-{max(loads):.1f}",
                "–" if p is None else ("pass" if p["rc"] == 0 else f"FAIL ({p['summary']})"),
            ]
            table.append(row)
        width = len(head)
        out.append(common.table(head, [r + [""] * (width - len(r)) for r in table]))
    out.append(
        "\nRatios are 'wall / CPU': medians over runs of the ratio measured inside each "
        "process (CPU = process CPU time, all threads). 'grads vs xla': max relative "
        f"difference of fbp's float32 gradients from the {BASELINE} setting's (same inputs)."
    )
    if parity:
        out.append("\n#### parity suite (" + " ".join(PARITY_TESTS) + ")\n")
        out.append(
            common.table(
                ["setting", "result", "minutes", "load before"],
                [
                    [s, p["summary"] or str(p["rc"]), f"{p['seconds'] / 60:.1f}"]
                    + [f"{p['load_before'][0]:.1f}"]
                    for s, p in parity.items()
                ],
            )
        )
    crashes = [r for r in benches if not r.get("result")]
    if crashes:
        out.append("\n#### runs without a result\n")
        for r in crashes:
            err = (r.get("error") or "").strip().splitlines()
            why = next(
                (e for e in reversed(err) if "Error" in e or "failed" in e), err[-1:] or [""]
            )
            why = why if isinstance(why, str) else why[0]
            out.append(
                f"- {r['bench']} / {r['setting']} / tunables {'on' if r['tunables'] else 'off'}: "
                f"rc {r['rc']}: `{why.strip()[:160]}`"
            )
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for raw.jsonl, runs/, grads/, study.md")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tunables", nargs="+", default=["off"], choices=["off", "on"])
    ap.add_argument("--parity", nargs="*", default=[], choices=list(SETTINGS))
    ap.add_argument("--timeout", type=int, default=400, help="seconds per benchmark run")
    ap.add_argument(
        "--rounds", type=int, help="timed rounds per run (digits: a third of it, as repeats)"
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        nargs="+",
        help="PyTorch variants to time (default: each script's)",
    )
    ap.add_argument("--report", action="store_true", help="only rebuild the tables")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for sub in ("runs", "grads"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    raw = out / "raw.jsonl"
    if not args.report:
        settings = list(dict.fromkeys([BASELINE, *args.settings]))  # gradients are compared
        for rep in range(args.repeats):
            order = settings[:]
            random.Random(rep).shuffle(order)
            order.remove(BASELINE)
            order.insert(0, BASELINE)  # its gradients are the reference of the others
            for tun in args.tunables:
                for setting in order:
                    for bench in args.benchmarks:
                        row = run_one(
                            out,
                            bench,
                            setting,
                            tun == "on",
                            rep,
                            args.timeout,
                            args.rounds,
                            args.torch_threads,
                        )
                        with raw.open("a") as fh:
                            fh.write(json.dumps(row) + "\n")
                        ms = row.get("result", {}).get("variants", {})
                        first = next(iter(ms.values()), {}).get("ms")
                        print(
                            f"[{time.strftime('%H:%M:%S')}] rep {rep} {tun:>3} {setting:<24} "
                            f"{row['bench']:<8} rc={row['rc']} {row['seconds']:.0f}s "
                            f"first={_fmt(first, '.2f')} ms load={os.getloadavg()[0]:.1f}",
                            flush=True,
                        )
        for setting in args.parity:
            row = run_parity(setting, timeout=3600)
            with raw.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"parity {setting}: {row['summary']} ({row['seconds']:.0f} s)", flush=True)
    rows = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]
    text = report(rows)
    (out / "study.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
