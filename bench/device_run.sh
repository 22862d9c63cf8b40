#!/usr/bin/env bash
# bench/vs_trl.py on the lent GPU machine (torch and transformers there, no registry):
# installs the wheels of bench/fetch_wheels.sh (carried as .whl), checks the imports, runs
# the bench with the given arguments, and leaves report.md and results.tar under $OUT.
# Each variant is one process saved as JSON, so the work splits into calls of < 10 min:
#   here:   bash bench/fetch_wheels.sh
#   there:  (device run, carry [".whl"]) first the GPU tests: bash bench/device_run.sh --tests
#           then the bench, COMMON="--models qwen1.5b --row-tokens 8192 --pairs 1500
#           --pair-words 100-500,50-600"
#     1. bash bench/device_run.sh $COMMON --variants peak,ours-score,ours-train,ours-train-zero0
#     1b. bash bench/device_run.sh $COMMON --variants peak,ours-score-unshared,ours-train-unshared
#     1c. bash bench/device_run.sh $COMMON --variants peak,ours-score-persegment,ours-train-persegment
#     2. bash bench/device_run.sh $COMMON --variants peak,trl-live,trl-precompute,trl-live-fp32-master
#     3. bash bench/device_run.sh $COMMON --variants peak --fit ours-train,trl-live
#   here:   untar every results.tar into one folder R, then
#           .venv/bin/python bench/vs_trl.py --report --results R/results --device cuda $COMMON
set -euo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
python3 -c "
import torch, transformers, trl, deepspeed, datasets, pyarrow, accelerate
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(),
      '| transformers', transformers.__version__, '| trl', trl.__version__, '| deepspeed', deepspeed.__version__,
      '| datasets', datasets.__version__, '| pyarrow', pyarrow.__version__, '| accelerate', accelerate.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
if [ "${1:-}" = "--tests" ]; then  # the GPU correctness tests first (tests/test_gpu.py), a few minutes
  shift
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_logps.py "$@" 2>&1 | tee "$OUT/tests.log"
  exit "${PIPESTATUS[0]}"
fi
status=0
python3 bench/vs_trl.py --device cuda --out /tmp/bench --results /tmp/bench/results "$@" | tee "$OUT/report.md" || status=$?
tar -C /tmp/bench -cf "$OUT/results.tar" results
exit $status
