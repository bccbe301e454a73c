#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the pinned dependencies and the project installed in editable mode.
# Idempotent: a no-op when nothing changed. Linux and macOS (where sha256sum is shasum, and torch must be arm64 to
# reach the Apple GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
sha256() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256 | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "Python 3.10 or later is needed (3.11 is what the image uses); $PY is $("$PY" --version 2>&1 || echo missing)." >&2
    echo "Install Python 3.11 (macOS: brew install python@3.11) or set PYTHON=/path/to/python3.11." >&2
    exit 1
  fi
  if [ "$(uname -s)" = Darwin ] && [ "$("$PY" -c 'import platform; print(platform.machine())')" != arm64 ]; then
    echo "warning: $PY is an x86_64 (Rosetta) Python: torch will not reach the Apple GPU (MPS); use an arm64 one" >&2
  fi
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: anything unpinned that pulls it in would fetch a multi-GB CUDA build.
.venv/bin/python -m pip install -q "$(grep '^torch==' requirements.txt)"
.venv/bin/python -m pip install -q -r requirements-dev.txt
# The project itself, editable: `lib` and predict.py import from anywhere, scripts need no path tricks.
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
