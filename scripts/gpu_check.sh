#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): the one command to run on a GPU machine; writes $OUT/gpu_check.json.
#   scripts/gpu_check.sh              on the GPU machine: python3 with torch, transformers, accelerate, peft and
#                                     safetensors there, no network; the other packages travel as wheels in .whl/
#                                     (fill it here with scripts/gpu_wheels.sh)
#   scripts/gpu_check.sh --dry-run    the same steps on the CPU with the tiny models (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/gpu-check-out} PYTHONUNBUFFERED=1
if [[ " $* " == *" --dry-run "* ]]; then
  scripts/setup_env.sh
  exec .venv/bin/python scripts/gpu_check.py "$@"
fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # `lib`: no editable install there
exec python3 scripts/gpu_check.py "$@"
