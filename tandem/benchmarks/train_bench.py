"""Training throughput and MFU of the real train step, against the device's peak measured
in the same run.

    python benchmarks/train_bench.py                       # tiny + small on this machine
    python benchmarks/train_bench.py --presets llama3-1b   # on a GPU/TPU (bf16 preset)

Prints one JSON line per preset (and one for the measured matmul peak). The train step is
exactly the one `python -m tandem.train` runs (sharded jit, donated state, AdamW, clipping), fed
synthetic packed batches so the data pipeline is not measured (and Grain is not needed).
MFU = model FLOPs/token (ModelConfig.flops_per_token) x tokens/s / peak; it is reported
against both the measured matmul peak and, on GPU/TPU, the spec-sheet table peak. Memory
per step: XLA's accounting of the compiled step per device (`step_*_bytes`: arguments =
params, optimizer state and batch; temporaries = activations, gradients, the loss's
buffers) and, where the runtime reports it, the device's peak bytes in use.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import jax
import numpy as np

from tandem.config import load_config
from tandem.train.config import TrainConfig
from tandem.train.loop import BATCH_KEYS, Trainer
from tandem.train.mesh import batch_sharding, make_mesh, process_rows, to_global
from tandem.train.metrics import measure_matmul_flops, table_peak_flops

# Per preset: (batch, seq_len) defaults for CPU and for accelerators.
SHAPES = {
    "tiny": {"cpu": (8, 128), "acc": (64, 512)},
    "small": {"cpu": (4, 256), "acc": (32, 1024)},
    "llama3-1b": {"cpu": (1, 256), "acc": (8, 2048)},
    "llama3-8b": {"cpu": (1, 128), "acc": (2, 2048)},
}


def synthetic_batch(cfg: TrainConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Packed rows: 4 documents per row, positions restarting per document."""
    B, T = cfg.batch_size, cfg.seq_len
    seg = np.repeat(np.arange(1, 5), -(-T // 4))[:T]
    pos = np.concatenate([np.arange((seg == s).sum()) for s in range(1, 5)])
    tokens = rng.integers(0, cfg.model.vocab_size, (B, T), dtype=np.int32)
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "weights": np.ones((B, T), np.float32),
        "segment_ids": np.broadcast_to(seg, (B, T)).astype(np.int32),
        "positions": np.broadcast_to(pos, (B, T)).astype(np.int32),
    }


def _measured_peak(dtype: str) -> float:
    """Total matmul FLOP/s: per process on CPU (devices share the cores), per device else."""
    if jax.devices()[0].platform == "cpu":
        return measure_matmul_flops(dtype) * jax.process_count()
    return measure_matmul_flops("bfloat16", n=8192) * jax.device_count()


def bench(preset: str, overrides: list[str], steps: int, warmup: int) -> dict:
    platform_kind = "cpu" if jax.default_backend() == "cpu" else "acc"
    B, T = SHAPES.get(preset, SHAPES["tiny"])[platform_kind]
    base = [f"batch_size={B}", f"seq_len={T}", "run_dir=/tmp/tandem-train-bench"]
    cfg = load_config(TrainConfig, preset, [*base, *overrides])
    B, T = cfg.batch_size, cfg.seq_len  # overrides may change the preset's shape
    mesh = make_mesh(cfg)
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(cfg.seed)
    t = time.perf_counter()
    trainer.compile()
    compile_s = time.perf_counter() - t
    sh = batch_sharding(mesh)
    rows = process_rows(sh, cfg.batch_size)
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(cfg, rng) for _ in range(2)]
    dev = [{k: to_global(b[k][rows], rows, sh, b[k].shape) for k in BATCH_KEYS} for b in batches]
    for i in range(warmup):
        state, m = trainer.step(state, dev[i % 2])
    jax.block_until_ready(m)
    peak_before = _measured_peak(cfg.model.dtype)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, m = trainer.step(state, dev[i % 2])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_time = float(np.median(times))
    memory = {f"step_{k}": v for k, v in trainer.step_memory().items()}
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    tps = cfg.tokens_per_step / step_time
    flops = cfg.model.flops_per_token(T) * tps
    dtype = cfg.model.dtype
    d0 = jax.devices()[0]
    # best of a measurement before and after the timed steps (other load on the host)
    measured = max(peak_before, _measured_peak(dtype))
    table = table_peak_flops(d0.device_kind)
    table_total = table * jax.device_count() if table and d0.platform != "cpu" else None
    return {
        "bench": "train",
        "preset": preset,
        "overrides": overrides,
        "params": cfg.model.num_params,
        "dtype": dtype,
        "remat": cfg.model.remat,
        "batch_size": B,
        "seq_len": T,
        "device": d0.device_kind,
        "devices": jax.device_count(),
        "compile_s": round(compile_s, 2),
        "step_time_s": step_time,
        "tokens_per_s": tps,
        "model_tflops_per_s": flops / 1e12,
        "measured_matmul_peak_tflops": measured / 1e12,
        "mfu_vs_measured_peak": flops / measured,
        "table_peak_tflops": table_total / 1e12 if table_total else None,
        "mfu": flops / table_total if table_total else flops / measured,
        "final_loss": float(np.asarray(m["loss"])),
        **memory,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="TrainConfig key=value overrides")
    args = ap.parse_args(argv)
    presets = args.presets or (
        ["tiny", "small"] if jax.default_backend() == "cpu" else ["tiny", "llama3-1b"]
    )
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "jax": jax.__version__,
        "host": platform.node(),
        "backend": jax.default_backend(),
    }
    for preset in presets:
        print(
            json.dumps({**bench(preset, list(args.overrides), args.steps, args.warmup), **meta}),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
