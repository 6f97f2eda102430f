#!/usr/bin/env bash
# Downloads (here, with network) the Python 3.12 x86-64 wheels that a GPU image without
# network lacks, at requirements.lock's versions, into DIR (default .whl/). The image must
# bring jax with CUDA, torch, transformers and flax: flax 0.12.8 (our lock) does not import
# on jax 0.11.2, so the image's own flax is used there (docs/benchmarks.md, GPU section).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PACKAGES="grain array-record portpicker grpcio grpcio-health-checking grpcio-reflection
protobuf optax orbax-checkpoint tensorboardx uvloop httptools"
mkdir -p "$DIR"
for name in $PACKAGES; do
    pin=$(grep -i "^${name}==" requirements.lock)
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$DIR" "$pin"
done
ls "$DIR"
