#!/usr/bin/env bash
# Runs the whole test suite (CPU, tiny random models, no network). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
