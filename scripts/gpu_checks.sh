#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run, under 10 minutes on one H100/H200:
#   1. llama3-1b training: MFU (table and measured peak) and memory per step
#   2. compiled kernel tests (Triton kernels == references, forward and grads)
#   3. ~1B serving vs transformers on the same bf16 weights (throughput, TTFT, TPOT)
#   4. the serving decode step's device time beside that run's TPOT
#   5. the paged-attention kernel (`tandem bench paged`) per page size
#
#   WHEELS=.whl OUT=gpu-results bash scripts/gpu_checks.sh     # OUT defaults to gpu-results
#
# Runs on the machine's own python3 (the device image: jax 0.11.2 with CUDA, flax 0.12.10,
# torch, transformers). tandem is installed into /tmp/site from this checkout without its
# dependencies, so the image's jax and flax are the ones used (the lock's flax 0.12.8 does
# not import on jax 0.11.2); WHEELS (from scripts/gpu_wheels.sh) adds what the image lacks
# (grain, grpcio extras, optax, orbax-checkpoint, ...). No network is needed. The stages
# run most important first, each under its own time limit and all under BUDGET_S seconds
# (default 570): a stage that would start with too little time left is skipped, saying so.
# Every stage writes its results to OUT as it finishes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
BUDGET_S=${BUDGET_S:-570}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --upgrade \
    --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PYTHON" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, \
jax.devices())" | tee "$OUT/versions.txt"

deadline=$((SECONDS + BUDGET_S))
# stage LIMIT_S NAME: prints the seconds the stage may run (its limit, or what the budget
# has left), or returns 1 when fewer than 30 s would be left.
stage() {
    local left=$((deadline - SECONDS)) limit=$1
    shift
    if [ "$left" -lt 30 ]; then
        echo "=== SKIPPED (budget spent): $*" | tee -a "$OUT/skipped.txt" >&2
        return 1
    fi
    echo "=== $(date -u +%H:%M:%S) (+${SECONDS}s) $*" >&2
    echo $((limit < left ? limit : left))
}

# The ~1B HF checkpoint and its bf16 bundle for stage 3, built on the CPU meanwhile.
( CUDA_VISIBLE_DEVICES= JAX_PLATFORMS=cpu "$PYTHON" -c "
from pathlib import Path
from tandem.benchmarks.serve_bench import save_random_hf_llama
from tandem.config import load_config
from tandem.model.config import ModelConfig
from tandem.model.hf import import_hf
save_random_hf_llama(load_config(ModelConfig, 'llama3-1b', []), Path('/tmp/hf1b'), 0)
import_hf(Path('/tmp/hf1b'), Path('/tmp/b1b'), dtype='bfloat16')
" > "$OUT/hf_prep.log" 2>&1 ) &
prep=$! prep_status=""
prepared() {  # waits for the checkpoint once; its status every time
    [ -n "$prep_status" ] || { wait "$prep"; prep_status=$?; }
    return "$prep_status"
}

export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
if t=$(stage 150 "1. llama3-1b training: MFU and memory per step"); then
    timeout "$t" "$PYTHON" benchmarks/train_bench.py --presets llama3-1b --steps 8 \
        model.remat=dots | tee "$OUT/train_bench.jsonl"
fi

if t=$(stage 150 "2. compiled kernel tests"); then
    timeout "$t" "$PYTHON" -m pytest tests/kernels -m gpu -q -p no:cacheprovider 2>&1 \
        | tail -30 | tee "$OUT/gpu_tests.log"
fi

if t=$(stage 240 "3. ~1B serving vs transformers"); then
    if prepared; then
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "$t" "$PYTHON" benchmarks/serve_bench.py \
            --bundle /tmp/b1b --hf-compare --hf-dir /tmp/hf1b --hf-dtype bfloat16 \
            --num-requests 256 --max-slots 64 --max-len 1024 --max-prompt-len 64 \
            --input-len 16:64 --output-len 8:32@3,192:256@1 --modes continuous,static \
            --out "$OUT/serve_bench.jsonl" > "$OUT/serve_bench.log" 2>&1
        grep -v INFO "$OUT/serve_bench.log" | tail -5
    else
        echo "HF checkpoint preparation failed: $OUT/hf_prep.log" >&2
    fi
fi

if t=$(stage 60 "4. decode step device time vs the served TPOT"); then
    prepared && timeout "$t" "$PYTHON" benchmarks/step_bench.py --bundle /tmp/b1b \
        --slots 64 --max-len 1024 --context 160 --serve-jsonl "$OUT/serve_bench.jsonl" \
        | tee "$OUT/step_bench.jsonl"
fi

if t=$(stage 60 "5. paged attention kernel per page size (Llama-3-8B heads, bf16)"); then
    timeout "$t" "$PYTHON" benchmarks/paged_bench.py --impl pallas --dtype bfloat16 \
        --n-heads 32 --n-kv-heads 8 --head-dim 128 --page-sizes 16 32 64 128 \
        --decode-rows 64 --decode-len 1000 --max-rows 128 --max-len 2048 --rounds 20 \
        | tee "$OUT/paged_bench.jsonl"
fi
wait
echo "=== done in ${SECONDS}s; results in $OUT" >&2
