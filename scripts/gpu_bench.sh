#!/usr/bin/env bash
# On a GPU machine without a package index (wheels from scripts/gpu_wheels.sh in .whl/), from the repository root:
# the GPU-marked tests of the model, the optimiser and the trainer, then the whole benchmark with torch.compile,
# written to $OUT (default: results/gpu_run). Everything ends within DEADLINE_S seconds of the script's start (default
# 560, for one device call with timeout_s=590: a 15-minute device session still has the minutes to start the machine
# and bring the files back). The benchmark gets what the tests leave and fits its phases into it, the CUDA-graph step
# right after training and captioning. With MODE=compile: no tests, and only the reference regime and ours under
# torch.compile (`--compile-only`), with the whole deadline for them.
# Copy $OUT/benchmarks.{json,md} into results/ only from such a GPU run.
set -o pipefail
MODE=${MODE:-all}
[ "$MODE" = all ] || [ "$MODE" = compile ] || { echo "gpu_bench: MODE=$MODE: must be 'all' or 'compile'" >&2; exit 2; }
OUT=${OUT:-results/gpu_run}
DEADLINE_S=${DEADLINE_S:-560}
[[ "$DEADLINE_S" =~ ^[0-9]+$ ]] \
  || { echo "gpu_bench: DEADLINE_S=$DEADLINE_S: must be a whole number of seconds" >&2; exit 2; }
mkdir -p "$OUT"
ls .whl/*.whl >/dev/null 2>&1 \
  || { echo "gpu_bench: no wheels in .whl/: run scripts/gpu_wheels.sh first and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used --format=csv
python3 -c "import torch, transformers, alcap.benchmarks; print('torch', torch.__version__, 'transformers', \
transformers.__version__)" || exit 1
left() { echo $((DEADLINE_S - SECONDS - 5)); }   # seconds left for the next step (SECONDS: since the script began)
if [ "$MODE" = compile ]; then
  python3 -m alcap.benchmarks --out "$OUT" --budget-s "$(left)" --compile-only 2>&1 | tee "$OUT/benchmark_log.txt"
  exit
fi
# the tests took 68 s on one H100 (6 of them); they get at most a third of the deadline
timeout $((DEADLINE_S / 3)) python3 -m pytest -q -m gpu -p no:cacheprovider --durations=0 \
  tests/test_model.py tests/test_adafactor.py tests/test_train.py \
  2>&1 | tee "$OUT/gpu_tests.txt"
budget=$(left)
[ "$budget" -gt 60 ] \
  || { echo "gpu_bench: only $budget s left for the benchmark (DEADLINE_S=$DEADLINE_S)" >&2; exit 1; }
python3 -m alcap.benchmarks --out "$OUT" --budget-s "$budget" --compile 2>&1 | tee "$OUT/benchmark_log.txt"
