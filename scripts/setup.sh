#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs tandem (editable) with its locked dependencies:
#   bash scripts/setup.sh          the runtime only: train, export, serve (requirements.lock)
#   bash scripts/setup.sh test     + the test and bench extras (requirements-test.lock)
# Idempotent: re-running on a set-up checkout only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
case ${1:-runtime} in
    runtime) lock=requirements.lock ;;
    test) lock=requirements-test.lock ;;
    *) echo "usage: bash scripts/setup.sh [runtime|test]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Every package pinned (uv pip compile output; regenerate with scripts/lock.sh).
.venv/bin/python -m pip install --quiet -r "$lock"
# setuptools prints an "Editable installation" notice for every flat-layout editable
# install: it warns about folders named like the package, and here the one such folder,
# tandem/, is the package itself.
PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/python -m pip install --quiet --no-deps -e .
