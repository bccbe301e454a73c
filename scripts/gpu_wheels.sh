#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what scripts/gpu_check.sh needs on the GPU machine beyond its preinstalled torch,
# transformers, accelerate, peft and safetensors: run here, where PyPI is reachable; about 14 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -h "^$1==" requirements.txt requirements-dev.txt | head -1; }
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "$(pin diffusers)" "$(pin cog)" "coglet==$(pin cog | cut -d= -f3)" structlog==26.1.0 \
  "$(pin starlette)" "$(pin uvicorn)" "$(pin websockets)" "$(pin anyio)" "$(pin click)" "$(pin h11)" idna==3.20
du -sh .whl
