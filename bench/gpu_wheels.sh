#!/usr/bin/env bash
# Download the wheels the GPU device lacks (Python 3.12, x86_64) into .gpu_wheels/ (ignored by
# git); carry that folder to the device, where bench/gpu_check.sh installs them offline.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --implementation cp \
    -d .gpu_wheels orjson structlog gguf
ls -la .gpu_wheels
