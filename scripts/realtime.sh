#!/usr/bin/env bash
# The realtime server in the local .venv (set up like predict.sh), then open http://127.0.0.1:7860/
#   scripts/realtime.sh                    sd-turbo on this machine's GPU (ENABLED_MODES for more; on a Mac: MPS)
#   scripts/realtime.sh --tiny             tiny random weights, offline: the whole path in seconds (noise frames)
#   REALTIME_TOKEN=... scripts/realtime.sh --host 0.0.0.0    on the network: the page opens with ?token=...
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
if [[ "$(uname -s)" == Darwin ]]; then
  export PYTORCH_ENABLE_MPS_FALLBACK="${PYTORCH_ENABLE_MPS_FALLBACK:-1}"  # an op MPS lacks runs on the CPU, not fails
fi
exec .venv/bin/python scripts/realtime.py "$@"
