#!/usr/bin/env bash
# Wheels for a GPU machine that has Python 3.12 and torch 2.11 but no package index: the versions this checkout's
# .venv holds (set up by `bash .ci/setup`), of the packages the benchmark and the GPU tests import that such an image
# lacks, or has at another version (an image with transformers 5.17 and huggingface_hub 1.33 was seen: the hub
# satisfies transformers 5.24 and stays). Written to .whl/ (ignored by git); scripts/gpu_bench.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_wheels: $PY not found: run 'bash .ci/setup' first" >&2; exit 2; }
PACKAGES="transformers tokenizers safetensors regex fastcore nltk defusedxml rouge_score soundfile cffi pycparser"
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for name in $PACKAGES; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "gpu_wheels: $name is not installed in .venv" >&2; exit 2; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$name==$version" 2>/dev/null \
    || "$PY" -m pip wheel -q --no-deps -w .whl "$name==$version"   # a source release only (rouge_score): pure Python
done
ls .whl
