#!/usr/bin/env bash
# The learner's checks on a CUDA machine, in one go: the CUDA tests, then the learner benchmark
# at the default settings (the whole update as a CUDA graph), with eager updates, and with 32
# minibatches per request.
# Usage: bash benchmarks/cuda.sh [OUTPUT_DIR]   (needs torch with CUDA, numpy, redis-py, pytest)
# Each step has its own time limit and writes its own log, so one failing step costs only itself.
cd "$(dirname "$0")/.." || exit 1
out=${1:-runs/cuda-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$py" -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"
  lscpu | grep -E '^Model name|^CPU\(s\)'
} 2>&1 | tee "$out/machine.txt"
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  tail -n 8 "$out/$name.txt"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}
step tests 150 "$py" -m pytest -q -p no:cacheprovider tests/unit/test_learner_cuda.py
step bench_default 200 "$py" benchmarks/learner.py --device cuda --quick
step bench_eager 200 "$py" benchmarks/learner.py --device cuda --quick --no-cuda-graphs
step bench_k32 200 "$py" benchmarks/learner.py --device cuda --quick --batches-per-request 32
