#!/usr/bin/env bash
# One prepared GPU run, about 9 minutes on one H200 (docs/results/gpu.md), everything written under $OUT:
#   1. python benchmarks/bench_gpu.py --only kernels, then --only step  -> gpu_bench.json, gpu_bench.md
#   2. python benchmarks/probe_jobs.py fig6: how many runs to train at once so the sweep ends in the time left
#   3. cdgrad run fig6 --executor local --jobs N --devices cuda:0        (data: $CDGRAD_DATA, default ./data)
#   4. cdgrad report fig6 --out $OUT/report                             -> fig6.md and its three plots
#   5. the results folder (store, run records, logs, the probe's JSON), without checkpoints -> fig6-results.tar.gz
# and its own log, gpu_run.log: 8 files in all.  Every step runs under `timeout`; a step that fails is recorded
# and the next one runs; the last lines of the log list each step's outcome, and the exit status is 1 when any
# step failed.
#
#   mkdir -p data && cp -r ../shared/data/mnist ../shared/data/fashion-mnist data/   # once: data/ is git-ignored
#   OUT=/some/folder bash benchmarks/gpu_run.sh             # the GPU run; BUDGET_S (default 540) is the total
#   RESULTS=/a/results/folder OUT=... bash benchmarks/gpu_run.sh   # resume: runs finished there are skipped
#   bash benchmarks/gpu_run.sh --smoke                      # the same steps on the CPU at tiny sizes (CI)
#
# --smoke: bench_gpu.py --smoke; the probe on the CPU with at most 2 workers; fig6 restricted to one data set that
# is found, 1 seed, 1 epoch, 200 training and 200 test images, in 2 local workers without devices (without any
# data set, the sweep is a --dry-run); OUT defaults to a new temporary folder.  PYTHON (default python3) is the
# interpreter; the repository's src/ is appended to PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [--smoke]" >&2; exit 2 ;;
esac
if [ -z "${OUT:-}" ]; then
  if [ "$SMOKE" = 1 ]; then OUT=$(mktemp -d); else echo "gpu_run.sh: set OUT to the output folder" >&2; exit 2; fi
fi
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
REPORT_RESERVE_S=60  # the report and the archive, after the sweep
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT/src" PYTHONUNBUFFERED=1
if [ -z "${CDGRAD_DATA:-}" ] && [ -d "$ROOT/data" ]; then export CDGRAD_DATA=$ROOT/data; fi
WORK=$(mktemp -d)
RESULTS=${RESULTS:-$WORK/results}  # set it to resume: the runs finished there are skipped
START=$(date +%s)
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
TEE=$!

outcomes=()
# step NAME LIMIT_S COMMAND...: run one step under timeout, log its outcome and duration, never stop the script
step() {
  local name=$1 limit=$2 t0 status=0
  shift 2
  t0=$(date +%s)
  echo "gpu_run: == $name (limit ${limit} s, $((t0 - START)) s since the start): $*"
  timeout -k 10 "$limit" "$@" || status=$?
  local line
  line="$name: $([ "$status" = 0 ] && echo ok || echo "FAILED (exit $status$([ "$status" = 124 ] && echo ', timed out'))") in $(($(date +%s) - t0)) s"
  echo "gpu_run: == $line"
  outcomes+=("$line")
  return "$status"
}

echo "gpu_run: $(date -u +%FT%TZ), smoke=$SMOKE, OUT=$OUT, budget ${BUDGET_S} s, CDGRAD_DATA=${CDGRAD_DATA:-unset}"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" || true
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
echo "gpu_run: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo) memory"

# The data sets the sweep can read (the toolkit's own lookup: $CDGRAD_DATA, ~/.cache/cdgrad/data, /usr/share/datasets)
found=$("$PY" - <<'EOF'
from cdgrad.experiments.data.sources import find_dataset_dir

names = []
for name in ("mnist", "fashion-mnist"):
    try:
        find_dataset_dir(name)
        names.append(name)
    except Exception:
        pass
print(" ".join(names))
EOF
) || found=""
echo "gpu_run: data sets found: ${found:-none}"

# ---- 1. the transform benchmarks and the step overhead
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  step "bench_gpu kernels" 120 "$PY" benchmarks/bench_gpu.py --only kernels --out "$OUT" --smoke
  step "bench_gpu step" 120 "$PY" benchmarks/bench_gpu.py --only step --out "$OUT" --smoke
else
  DEVICE=cuda:0
  step "bench_gpu kernels" 170 "$PY" benchmarks/bench_gpu.py --only kernels --out "$OUT" --budget-s 120
  step "bench_gpu step" 90 "$PY" benchmarks/bench_gpu.py --only step --out "$OUT"
fi

# ---- 2. the sweep's arguments and its number of workers
sweep=(fig6 --set threads=1)
if [ "$SMOKE" = 1 ]; then
  sweep+=(--set epochs=1 --set train_subset=200 --set test_subset=200)
  [ -n "$found" ] && sweep+=(--where "dataset=${found%% *}")
elif [ "$found" = mnist ] || [ "$found" = fashion-mnist ]; then
  sweep+=(--where "dataset=$found")
  echo "gpu_run: only $found was found: the sweep trains its half of fig6"
fi
seeds=()
[ "$SMOKE" = 1 ] && seeds=(--max-seeds 1)
deadline=$((START + BUDGET_S - REPORT_RESERVE_S))
probe_args=(--device "$DEVICE" --until "$deadline" --results "$RESULTS" --out "$WORK/probe.json")
[ "$SMOKE" = 1 ] && probe_args+=(--max-jobs 2)
jobs=""
if step "probe" 150 "$PY" benchmarks/probe_jobs.py "${sweep[@]}" "${seeds[@]}" "${probe_args[@]}"; then
  jobs=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['jobs'])" "$WORK/probe.json") || jobs=""
fi
if [ "$SMOKE" = 1 ]; then
  echo "gpu_run: the probe chose ${jobs:-nothing}; the smoke sweep uses 2 workers"
  jobs=2
elif [ -z "$jobs" ]; then
  jobs=$(nproc)
  echo "gpu_run: the probe gave no number; using one worker per CPU core: $jobs"
fi

# ---- 3. the sweep, in the time left before the report's reserve
executor=(--executor local --jobs "$jobs")
[ "$SMOKE" = 1 ] || executor+=(--devices "$DEVICE")
dry=()
if [ -z "$found" ]; then
  echo "gpu_run: no MNIST or Fashion-MNIST found (copy them into ./data or set CDGRAD_DATA): the sweep is a dry run"
  dry=(--dry-run)
fi
left=$((deadline - $(date +%s)))
[ "$left" -lt 30 ] && left=30
step "cdgrad run fig6" "$left" "$PY" -m cdgrad.experiments.cli run "${sweep[@]}" "${seeds[@]}" "${executor[@]}" \
  "${dry[@]}" --results "$RESULTS" --no-plots --no-progress

# ---- 4. the report, 5. the results folder
limit=$((START + BUDGET_S - 15 - $(date +%s)))  # the report ends inside the budget, the archive after it
[ "$limit" -gt 120 ] && limit=120
[ "$limit" -lt 30 ] && limit=30
step "cdgrad report fig6" "$limit" "$PY" -m cdgrad.experiments.cli report "${sweep[@]}" --results "$RESULTS" \
  --out "$OUT/report"
[ -f "$WORK/probe.json" ] && mkdir -p "$RESULTS" && cp "$WORK/probe.json" "$RESULTS/"
[ -d "$RESULTS" ] && step "archive results" 30 tar -czf "$OUT/fig6-results.tar.gz" -C "$(dirname "$RESULTS")" \
  --exclude checkpoints --exclude locks "$(basename "$RESULTS")"

echo "gpu_run: done in $(($(date +%s) - START)) s; files under $OUT:"
(cd "$OUT" && find . -type f | sort)
failed=0
for line in "${outcomes[@]}"; do
  echo "gpu_run: $line"
  case "$line" in *FAILED*) failed=1 ;; esac
done
rm -rf "$WORK"
exec >&- 2>&-
wait "$TEE"  # the log is complete before the script returns
exit "$failed"
