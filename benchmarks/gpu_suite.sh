#!/usr/bin/env bash
# The GPU run of fbp's core benchmarks: MLP, CNN, LSTM (and attention when
# benchmarks/attention.py exists), JAX on CUDA, PyTorch on CUDA as the peer.
#
# Usage (from the repository root): bash benchmarks/gpu_suite.sh OUT_DIR
# Writes OUT_DIR/<name>.md (the script's table), OUT_DIR/<name>.json (results),
# OUT_DIR/<name>.log (stderr), OUT_DIR/env.txt (GPU and versions), OUT_DIR/status.txt.
# Each benchmark is bounded by $FBP_GPU_TIMEOUT seconds (default 80), so the whole
# suite stays under ~6 minutes including compilation. Needs jax with CUDA, torch with
# CUDA, optax and chex; fbp is imported from this checkout (PYTHONPATH=.).
# FBP_SUITE_PLATFORMS=cpu runs the same suite on the CPU (a dry run of the plumbing).
set -u
out="${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR}"
mkdir -p "$out"
limit="${FBP_GPU_TIMEOUT:-80}"
export JAX_PLATFORMS="${FBP_SUITE_PLATFORMS:-cuda}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"  # room for torch
py="${PYTHON:-python}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$py" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.version.cuda)" 2>&1
} > "$out/env.txt"
cat "$out/env.txt"

: > "$out/status.txt"
bench() {  # name, then the command
  local name="$1"
  shift
  local t0=$SECONDS
  timeout -k 5 "$limit" "$py" "$@" > "$out/$name.md" 2> "$out/$name.log"
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$out/status.txt"
}

bench mlp benchmarks/mlp.py --single --rounds 30 --steps 10 --json "$out/mlp.json"
bench cnn benchmarks/cnn.py --rounds 30 --json "$out/cnn.json"
bench lstm benchmarks/lstm.py --child --rounds 30 --json "$out/lstm.json"
if [ -f benchmarks/attention.py ]; then
  if "$py" benchmarks/attention.py --help 2>/dev/null | grep -q -- "--json"; then
    bench attention benchmarks/attention.py --json "$out/attention.json"
  else
    bench attention benchmarks/attention.py
  fi
fi
cat "$out/status.txt"
