#!/usr/bin/env bash
# On a GPU machine without a package index (wheels from scripts/gpu_wheels.sh in .whl/), from the repository root:
# the GPU-marked tests of the model and the optimiser, then the whole benchmark with torch.compile, written to $OUT
# (default: results/gpu_run). With MODE=compile: no tests, and only the reference regime and ours under torch.compile
# (`--compile-only`, whose CUDA-graph warm-up alone took over 5 minutes), with the whole budget for them.
# Copy $OUT/benchmarks.{json,md} into results/ only from such a GPU run.
set -o pipefail
MODE=${MODE:-all}
[ "$MODE" = all ] || [ "$MODE" = compile ] || { echo "gpu_bench: MODE=$MODE: must be 'all' or 'compile'" >&2; exit 2; }
OUT=${OUT:-results/gpu_run}
BUDGET_S=${BUDGET_S:-$([ "$MODE" = all ] && echo 450 || echo 540)}   # each mode: one device call (timeout 590)
mkdir -p "$OUT"
ls .whl/*.whl >/dev/null 2>&1 \
  || { echo "gpu_bench: no wheels in .whl/: run scripts/gpu_wheels.sh first and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used --format=csv
python3 -c "import torch, transformers, alcap.benchmarks; print('torch', torch.__version__, 'transformers', \
transformers.__version__)" || exit 1
if [ "$MODE" = compile ]; then
  python3 -m alcap.benchmarks --out "$OUT" --budget-s "$BUDGET_S" --compile-only 2>&1 | tee "$OUT/benchmark_log.txt"
  exit
fi
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_model.py tests/test_adafactor.py tests/test_train.py \
  2>&1 | tee "$OUT/gpu_tests.txt"
python3 -m alcap.benchmarks --out "$OUT" --budget-s "$BUDGET_S" --compile 2>&1 | tee "$OUT/benchmark_log.txt"
