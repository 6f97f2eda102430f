#!/usr/bin/env bash
# The GPU checks behind docs/benchmarks.md's GPU section, in one run (about 6 minutes on
# one H100): compiled Pallas kernel tests, the decode-attention benchmark, the llama3-1b
# training benchmark and ~1B serving against transformers on the same weights.
#
#   WHEELS=.whl OUT=gpu-results bash scripts/gpu_checks.sh
#
# Runs on the machine's own python3 (jax with CUDA, torch, transformers, flax). WHEELS
# (from scripts/gpu_wheels.sh) installs what that image lacks into /tmp/site first, and
# tandem itself is installed there from this checkout (no network needed). Each stage has a
# time limit; results land in OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site \
    . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
stage() { echo "=== $(date -u +%H:%M:%S) $*"; }

stage "HF checkpoint + bf16 bundle for the serving run (CPU, in the background)"
( CUDA_VISIBLE_DEVICES= JAX_PLATFORMS=cpu python3 -c "
from pathlib import Path
from tandem.benchmarks.serve_bench import save_random_hf_llama
from tandem.config import load_config
from tandem.model.config import ModelConfig
from tandem.model.hf import import_hf
save_random_hf_llama(load_config(ModelConfig, 'llama3-1b', []), Path('/tmp/hf1b'), 0)
import_hf(Path('/tmp/hf1b'), Path('/tmp/b1b'), dtype='bfloat16')
" > "$OUT/hf_prep.log" 2>&1 ) &
prep=$!

stage "compiled kernel tests"
timeout 300 python3 -m pytest tests/kernels -m gpu -q -p no:cacheprovider 2>&1 \
    | tail -30 | tee "$OUT/gpu_tests.log"

export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
stage "decode-attention benchmark"
timeout 120 python3 benchmarks/kernel_bench.py --batch 1 16 64 --context 2048 8192 32768 \
    --iters 30 | tee "$OUT/kernel_bench.jsonl"
timeout 60 python3 benchmarks/kernel_bench.py --batch 64 --context 8192 --ragged --iters 30 \
    | tee -a "$OUT/kernel_bench.jsonl"

stage "llama3-1b training benchmark"
timeout 120 python3 benchmarks/train_bench.py --presets llama3-1b --steps 8 model.remat=dots \
    | tee "$OUT/train_bench.jsonl"

stage "~1B serving vs transformers"
wait "$prep" || { echo "HF checkpoint preparation failed: $OUT/hf_prep.log"; exit 1; }
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5  # transformers shares the GPU
timeout 300 python3 benchmarks/serve_bench.py --bundle /tmp/b1b --hf-compare --hf-dir /tmp/hf1b \
    --hf-dtype bfloat16 --num-requests 256 --max-slots 64 --max-len 1024 --max-prompt-len 64 \
    --input-len 16:64 --output-len 8:32@3,192:256@1 --modes continuous,static \
    --out "$OUT/serve_bench.jsonl" > "$OUT/serve_bench.log" 2>&1
grep -v INFO "$OUT/serve_bench.log" | tail -5
stage done
