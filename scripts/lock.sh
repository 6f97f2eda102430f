#!/usr/bin/env bash
# Regenerates the two locks from pyproject.toml (uv pip compile, Python 3.11, this platform):
#   requirements.lock       the runtime: what `pip install tandem` needs (README command a)
#   requirements-test.lock  runtime + the test and bench extras (README command b), held to
#                           the runtime lock's versions
# torch is pinned in the test lock as the plain version; pip on the dev/CI machines takes
# the CPU wheel for it, whose dependencies carry no CUDA, so the CUDA-only packages that
# PyPI's Linux torch wheel would add (nvidia-*, triton, cuda-*) are left out of the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install --quiet uv
uv=.venv/bin/uv
common=(--python-version 3.11 --quiet)
$uv pip compile pyproject.toml "${common[@]}" -o requirements.lock
test=(pyproject.toml --extra test --extra bench -c requirements.lock "${common[@]}")
cuda_only=$($uv pip compile "${test[@]}" --no-header --no-annotate |
    sed -nE 's/^((nvidia|cuda)-[A-Za-z0-9_.-]+|triton)==.*/\1/p')
skip=()
for name in $cuda_only; do skip+=(--no-emit-package "$name"); done
$uv pip compile "${test[@]}" "${skip[@]}" -o requirements-test.lock
