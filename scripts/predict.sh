#!/usr/bin/env bash
# One prediction, files written to ./outputs (or -o DIR) and their paths printed.
# With the cog CLI and a running Docker it is `cog predict` (GPU box); otherwise the same Predictor runs in-process
# in a local .venv. On a Mac always in-process: Docker there has no Apple GPU, torch reaches it in-process (MPS).
# `--tiny` always runs in-process on tiny random weights (offline check).
#   scripts/predict.sh -i prompt="a lighthouse at dusk" -i mode=sd-turbo
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --tiny "* ]] && [[ "$(uname -s)" != Darwin ]] && command -v cog >/dev/null && docker info >/dev/null 2>&1; then
  exec cog predict "$@"
fi
scripts/setup_env.sh
if [[ "$(uname -s)" == Darwin ]]; then
  export PYTORCH_ENABLE_MPS_FALLBACK="${PYTORCH_ENABLE_MPS_FALLBACK:-1}"  # an op MPS lacks runs on the CPU, not fails
fi
exec .venv/bin/python -m lib.local "$@"
