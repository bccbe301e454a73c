#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the pinned dependencies and the project installed in editable mode.
# Idempotent: a no-op when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: anything unpinned that pulls it in would fetch a multi-GB CUDA build.
.venv/bin/python -m pip install -q "$(grep '^torch==' requirements.txt)"
.venv/bin/python -m pip install -q -r requirements-dev.txt
# The project itself, editable: `lib` and predict.py import from anywhere, scripts need no path tricks.
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
