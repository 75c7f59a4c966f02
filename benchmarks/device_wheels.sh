#!/usr/bin/env bash
# The wheels the GPU suite (benchmarks/gpu.sh) needs on a CUDA machine that has PyTorch, NumPy,
# SciPy, safetensors, sentencepiece and pytest but no package index: av, soxr and pyloudnorm at
# requirements.txt's versions, for CPython 3.12 on x86-64 Linux, downloaded here into .whl/
# (git-ignored; about 36 MB). There, before the suite:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for name in av soxr pyloudnorm; do
    pin=$(grep -E "^$name==" requirements.txt)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$pin"
done
ls -l .whl
