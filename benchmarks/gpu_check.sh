#!/usr/bin/env bash
# One run on a fresh GPU machine (Python 3.12, a CUDA build of PyTorch installed): the CUDA tests, the whole suite,
# then on CUDA bench_fast_lrp (exact), bench_speed, bench_backbones (each also with fused kernels, rows "fast_fused",
# and with CUDA graphs, rows "fast_graphs"), bench_overhead (also "fast_graphs") and bench_fast_lrp (fast precision);
# JSON into benchmarks/results/*_cuda*.json, then the speed goals read from it (gpu_goals.py). At most
# GPU_CHECK_BUDGET seconds (default 470); each step is capped, the rest goes on.
# GPU_CHECK_STEPS="cuda suite fast_lrp speed backbones overhead fast_lrp_fast goals" (the default) picks steps.
#
# Run it from the repository root:  bash benchmarks/gpu_check.sh
#
# Packages the machine lacks (Zennit 1.0, Captum, zarr and zarr's own needs) are installed from wheels in .wheels/
# (ignored by git), fetched beforehand on any machine with pip:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .wheels zennit==1.0.0 captum==0.9.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
#
# Where $OUT is set (a folder that is copied back), the JSON files and the log are copied there as well.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
LOG=$RESULTS/gpu_check_cuda.log
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for the whole script
mkdir -p "$RESULTS"
START=$(date +%s)  # the goals read only the JSON of this run
: > "$LOG"

say() { echo "== [$SECONDS s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - SECONDS )); }
step() {  # step NAME MAX_SECONDS command...: run with a cap (never past the budget), log, go on
  local name=$1 cap=$2; shift 2
  local room; room=$(left)
  if [ "$room" -lt 20 ]; then say "$name: skipped (time budget spent)"; return; fi
  [ "$cap" -gt "$room" ] && cap=$room
  say "$name (at most ${cap} s)"
  timeout --signal=INT --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG"
  say "$name: exit ${PIPESTATUS[0]}"
}

if compgen -G ".wheels/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/neon_site \
      .wheels/*.whl 2>&1 | tail -3 | tee -a "$LOG"
  export PYTHONPATH=/tmp/neon_site:$PWD
else
  export PYTHONPATH=$PWD
fi
say "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import sys, torch, torchvision, zennit, importlib.metadata as m; print(sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.cuda.is_available(), 'zennit', m.version('zennit'), 'captum', m.version('captum'),
'zarr', m.version('zarr'), 'threads', torch.get_num_threads())" 2>&1; } | tee -a "$LOG"

# GPU_CHECK_STEPS picks steps (default: all, in this order: the tests first, they matter most)
STEPS=" ${GPU_CHECK_STEPS:-cuda suite fast_lrp speed backbones overhead fast_lrp_fast goals} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

# 1. the tests that need the GPU (they skip on a CPU) and the precision/device/batch-norm tests around them
want cuda && step "CUDA tests" 120 $PY -m pytest -q -p no:cacheprovider -rs tests/test_precision.py tests/test_devices.py \
    "tests/test_deep.py::test_cuda_matches_cpu" "tests/test_models.py::test_cuda_matches_cpu" tests/test_fused.py tests/test_cuda_graphs.py

# 2. the whole suite on this machine's environment (its Python, torch, Zennit and thread count)
want suite && step "whole suite" 150 $PY -m pytest -q -p no:cacheprovider -rfE -n 12 tests

# 3. benchmarks, exact precision (the default) unless said; every row of the JSON names its precision
want fast_lrp && step "bench_fast_lrp exact" 90 $PY benchmarks/bench_fast_lrp.py --device cuda --precision exact \
    --size 224 --batches 1 32 128 --repeats 5 --zennit-max-batch 32 --channels-last --fused --cuda-graphs \
    --output $RESULTS/fast_lrp_cuda.json
want speed && step "bench_speed exact" 80 $PY benchmarks/bench_speed.py --device cuda --precision exact \
    --batches 1 32 128 --heads kde_outlier --supports 10000 --repeats 3 --budget 10 --reference-max-batch 32 \
    --autocast --fused --cuda-graphs --output $RESULTS/speed_cuda.json
want backbones && step "bench_backbones exact" 70 $PY benchmarks/bench_backbones.py --device cuda --precision exact \
    --batches 1 32 --backbones resnet18 resnet50 --support 2000 --repeats 3 --budget 10 --zennit-max-batch 32 \
    --no-real-weights --fused --cuda-graphs --output $RESULTS/backbones_cuda.json
want overhead && step "bench_overhead" 40 $PY benchmarks/bench_overhead.py --device cuda --precision exact \
    --output $RESULTS/overhead_cuda.json
want fast_lrp_fast && step "bench_fast_lrp fast" 50 $PY benchmarks/bench_fast_lrp.py --device cuda --precision fast \
    --size 224 --batches 1 32 128 --repeats 5 --no-zennit --output $RESULTS/fast_lrp_cuda_fast.json

# 4. the speed goals read from the JSON above: which exact variant meets them (goals_cuda.json)
# (a second's work: it runs even when the budget is spent)
want goals && { say "goals"; timeout 20 $PY benchmarks/gpu_goals.py --device cuda --since "$START" 2>&1 | tee -a "$LOG"; }

say "done"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp $RESULTS/*_cuda*.json "$LOG" "$OUT"/ 2>/dev/null
  ls -l "$OUT" | tee -a "$LOG"
fi
