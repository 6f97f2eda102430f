#!/usr/bin/env bash
# Regenerates the committed gRPC stubs from tandem/proto/v1/generate.proto.
#   bash scripts/gen_proto.sh [OUT_DIR]      (default OUT_DIR: tandem/proto/v1)
# protoc names a stub's imports after the .proto's path under -I (here the repo root), so
# the stubs import `tandem.proto.v1.generate_pb2`. It runs on a copy, so OUT_DIR can be
# anywhere: tests/proto checks the committed stubs equal a fresh run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-tandem/proto/v1}")
PYTHON=${PYTHON:-.venv/bin/python}
case $PYTHON in /*) ;; */*) PYTHON=$PWD/$PYTHON ;; esac  # a path, made absolute (not resolved:
# a venv's python is a symlink to the base interpreter)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tandem/proto/v1" "$OUT"
cp tandem/proto/v1/generate.proto "$work/tandem/proto/v1/"
(cd "$work" && "$PYTHON" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
    --grpc_python_out=. tandem/proto/v1/generate.proto)
cp "$work"/tandem/proto/v1/generate_pb2.py "$work"/tandem/proto/v1/generate_pb2.pyi \
    "$work"/tandem/proto/v1/generate_pb2_grpc.py "$OUT/"
