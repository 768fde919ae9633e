#!/usr/bin/env bash
# The wheels a borrowed GPU box (Python 3.12, torch with CUDA, no Ray / DeepSpeed / MLflow, no network)
# needs for `python -m pytest -m gpu` and `benchmarks/gpu_smoke.py`: DeepSpeed (built here as a pure
# Python wheel, DS_BUILD_OPS=0), the transformers this project pins and what it needs beyond that
# box's packages, kvpress (the baseline presses). ~20 MB into ./wheels (git-ignored; carry it).
#   bash benchmarks/gpu_wheels.sh && ls wheels/
# then on the GPU box:
#   pip install --no-deps wheels/*.whl && pip install --no-deps -e . && python -m pytest -m gpu -q && python benchmarks/gpu_smoke.py
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
py=(--python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: --no-deps -d wheels)
pip download "${py[@]}" "transformers==$(python -c 'import transformers; print(transformers.__version__)')" \
    "tokenizers==$(python -c 'import tokenizers; print(tokenizers.__version__)')" \
    "huggingface-hub==$(python -c 'import huggingface_hub; print(huggingface_hub.__version__)')" \
    kvpress==0.5.5 hjson py-cpuinfo
pip download --no-deps --no-binary=:all: -d wheels/src deepspeed==0.19.8
DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w wheels wheels/src/deepspeed-0.19.8.tar.gz
rm -rf wheels/src
du -sh wheels
