#!/usr/bin/env bash
# Runs the whole test suite (CPU, tiny random models, no network). Extra arguments go to pytest.
# Installs what it needs first: the Debian packages (scripts/system_deps.sh) and .venv (scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/system_deps.sh
scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
