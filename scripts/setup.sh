#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the locked dependencies plus tandem itself.
# Idempotent: re-running on a set-up checkout only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Every package pinned (uv pip compile output; regenerate with scripts/lock.sh).
.venv/bin/python -m pip install --quiet -r requirements.lock
# torch is only the parity oracle and the serving baseline (transformers' backend). It is
# pinned here rather than in the lock because its CPU build is a separate wheel.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet --no-deps -e .
