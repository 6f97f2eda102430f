#!/usr/bin/env bash
# Regenerates requirements.lock from pyproject.toml (direct deps + the `test` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install --quiet uv
.venv/bin/uv pip compile pyproject.toml --extra test --python-version 3.11 -o requirements.lock
