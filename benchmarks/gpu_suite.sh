#!/usr/bin/env bash
# The GPU run of fbp's float64 parity report and core benchmarks: parity of every
# layer-registry case, bf16 mixed precision, MLP, attention, LSTM, CNN; JAX on CUDA,
# PyTorch on CUDA as the peer.
#
# Usage (from the repository root): bash benchmarks/gpu_suite.sh OUT_DIR
# Writes OUT_DIR/<name>.md (the script's table), OUT_DIR/<name>.json (results),
# OUT_DIR/<name>.log (stderr), OUT_DIR/env.txt (GPU and versions), OUT_DIR/status.txt.
# Each benchmark is bounded by $FBP_GPU_TIMEOUT seconds (default 80; precision.py, which
# compiles four models twice, by twice that), the parity report and the tests by
# $FBP_SUITE_TESTS_TIMEOUT (default 240; FBP_SUITE_TESTS= names the test files, empty
# for none), so the suite stays under ~12 minutes with compilation. Compiling for the
# GPU is slow: on an H200, one worker per file (xdist's loadfile) ran 299 tests of
# test_layers.py, test_attention.py and test_recurrent.py in 195 s without finishing,
# so the default is the registry's file alone, spread over 8 workers. Needs jax and
# torch with CUDA, optax and chex; fbp is imported from this checkout (PYTHONPATH=.).
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

# Correctness first, both at once (nothing is timed yet): the parity report, and the
# test files of the gradient rules on this backend (float64, as on the CPU). Nine
# processes share the GPU, so none of them takes its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
limit="${FBP_SUITE_TESTS_TIMEOUT:-240}" bench parity benchmarks/parity.py --json "$out/parity.json" &
tests="${FBP_SUITE_TESTS-tests/test_layers.py}"
if [ -n "$tests" ]; then
  # shellcheck disable=SC2086  # a list of files
  limit="${FBP_SUITE_TESTS_TIMEOUT:-240}" bench tests -m pytest -q -p no:cacheprovider \
    -p no:benchmark -n 8 --maxprocesses 8 --dist load --junitxml "$out/tests.xml" $tests
fi
wait
export XLA_PYTHON_CLIENT_PREALLOCATE=true
limit=$((2 * limit)) bench precision benchmarks/precision.py --rounds 20
bench mlp benchmarks/mlp.py --single --rounds 30 --steps 10 --json "$out/mlp.json"
bench attention benchmarks/attention.py --single --rounds 10 --times 512,2048,8192
bench lstm benchmarks/lstm.py --child --rounds 30 --json "$out/lstm.json"
bench cnn benchmarks/cnn.py --rounds 30 --json "$out/cnn.json"
cat "$out/status.txt"
