"""Decode-attention benchmark: our ragged GQA Pallas kernel vs the XLA reference vs jax's
shipped `jax.experimental.pallas.ops.gpu.decode_attention.gqa`, all in one process.

On a GPU it sweeps batch x context (default batch 1, 4, 16, 64 x context 512 .. 32k with
Llama-3-8B attention shapes: N=32, K=8, H=128, bf16) and prints one JSON line per
(implementation, batch, context) with the time, the achieved HBM bandwidth and its fraction
of the device's peak, plus the reference's time from the same run as the baseline.

Bytes counted are the *useful* bytes - K and V of the valid cache entries (sum of lengths),
q and the output - the same for every implementation, so bandwidth numbers compare
directly (the reference also reads the padding past each length; it is not credited).

On CPU (or with --smoke) it runs a tiny configuration through the reference and the
kernels in interpret mode: a correctness check and a timing ratio, so it runs anywhere.

    python benchmarks/kernel_bench.py                      # GPU sweep or CPU smoke
    python benchmarks/kernel_bench.py --batch 8 --context 4096 --ragged
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tandem.kernels.decode_attention import ragged_decode_attention
from tandem.kernels.reference import decode_attention_reference
from tandem.kernels.testing import decode_inputs

# Peak HBM bandwidth, bytes/s, by a substring of jax's device_kind.
PEAK_HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def peak_bandwidth(device: jax.Device) -> float | None:
    for name, peak in PEAK_HBM_BYTES_PER_S.items():
        if name in device.device_kind:
            return peak
    return None


def time_fn(fn: Callable[[], jax.Array], *, iters: int, repeats: int = 3) -> float:
    """Seconds per call: best of `repeats` loops of `iters` back-to-back calls."""
    jax.block_until_ready(fn())  # compile + warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def useful_bytes(lengths: np.ndarray, n_heads: int, n_kv: int, head_dim: int, itemsize: int) -> int:
    kv = 2 * int(lengths.sum()) * n_kv * head_dim * itemsize
    q_and_out = 2 * len(lengths) * n_heads * head_dim * itemsize
    return kv + q_and_out


def make_lengths(batch: int, context: int, ragged: bool, seed: int = 0) -> np.ndarray:
    if not ragged:
        return np.full(batch, context, np.int32)
    return np.random.default_rng(seed).integers(1, context + 1, batch).astype(np.int32)


def _bench_point(
    impls: dict[str, Callable[[], jax.Array]],
    point: dict,
    n_bytes: int,
    peak: float | None,
    iters: int,
) -> None:
    """Times every impl at one (batch, context) point; the reference goes first and is the
    baseline in every line. A failing impl prints an error line and the sweep goes on."""
    want = np.asarray(impls["reference"](), np.float32)
    times: dict[str, float] = {}
    for name, fn in impls.items():
        try:
            err = float(np.abs(np.asarray(fn(), np.float32) - want).max())
            times[name] = time_fn(fn, iters=iters)
        except Exception as e:  # report and keep sweeping
            print(json.dumps({**point, "impl": name, "error": f"{type(e).__name__}: {e}"[:500]}))
            continue
        seconds = times[name]
        rate = n_bytes / seconds
        line = {
            **point,
            "impl": name,
            "time_us": round(seconds * 1e6, 2),
            "gbps": round(rate / 1e9, 1),
            "peak_fraction": None if peak is None else round(rate / peak, 3),
            "max_abs_err_vs_reference": err,
            "baseline_reference_us": round(times["reference"] * 1e6, 2),
            "speedup_vs_reference": round(times["reference"] / seconds, 3),
        }
        print(json.dumps(line), flush=True)


def _device_inputs(
    batch: int, n_heads: int, n_kv: int, context: int, head_dim: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, N, H], k/v [B, K, S, H] drawn on the device (a 32k x 64-slot cache is ~8 GB:
    too slow to build on the host)."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (batch, n_heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, n_kv, context, head_dim), dtype)
    v = jax.random.normal(kv, (batch, n_kv, context, head_dim), dtype)
    return q, k, v


def bench_gpu(args: argparse.Namespace) -> int:
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

    device = jax.devices()[0]
    peak = peak_bandwidth(device)
    dtype = jnp.dtype(args.dtype)
    n_heads, n_kv, head_dim = args.n_heads, args.n_kv_heads, args.head_dim
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    reference = jax.jit(decode_attention_reference)
    for batch in args.batch:
        for context in args.context:
            q, k, v = _device_inputs(batch, n_heads, n_kv, context, head_dim, dtype)
            lengths_np = make_lengths(batch, context, args.ragged)
            lengths = jnp.asarray(lengths_np)
            k_bskh = jnp.swapaxes(k, 1, 2)  # [B, S, K, H]: the layout jax's gqa takes
            v_bskh = jnp.swapaxes(v, 1, 2)
            impls: dict[str, Callable[[], jax.Array]] = {
                "reference": functools.partial(reference, q, k, v, lengths),
                "pallas": functools.partial(ragged_decode_attention, q, k, v, lengths),
                "jax_gqa": functools.partial(jax_decode.gqa, q, k_bskh, v_bskh, kv_seq_len=lengths),
            }
            n_bytes = useful_bytes(lengths_np, n_heads, n_kv, head_dim, dtype.itemsize)
            point = {
                "bench": "decode_attention",
                "device": device.device_kind,
                "date": stamp,
                "jax": jax.__version__,
                "dtype": dtype.name,
                "batch": batch,
                "context": context,
                "ragged": args.ragged,
                "n_heads": n_heads,
                "n_kv_heads": n_kv,
                "head_dim": head_dim,
            }
            _bench_point(impls, point, n_bytes, peak, args.iters)
    return 0


def bench_smoke(args: argparse.Namespace) -> int:
    """Tiny shapes through the interpreter: correctness plus a (meaningless for speed, but
    always runnable) timing ratio against the reference measured in the same run."""
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

    batch, n_heads, n_kv, head_dim, context = 4, 8, 2, 64, 256
    q, k, v = decode_inputs(0, batch, n_heads, n_kv, context, head_dim, jnp.float32)
    lengths_np = np.array([0, 1, 100, context], np.int32)
    lengths = jnp.asarray(lengths_np)
    reference = jax.jit(decode_attention_reference)
    k_bskh, v_bskh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    impls: dict[str, Callable[[], jax.Array]] = {
        "reference": lambda: reference(q, k, v, lengths),
        "pallas_interpret": lambda: ragged_decode_attention(
            q, k, v, lengths, block_k=64, interpret=True
        ),
        "jax_gqa_interpret": lambda: jax_decode.gqa(
            q, k_bskh, v_bskh, kv_seq_len=lengths, k_splits=4, interpret=True
        ),
    }
    want = np.asarray(impls["reference"]())
    times = {name: time_fn(fn, iters=args.smoke_iters) for name, fn in impls.items()}
    ok = True
    for name, fn in impls.items():
        got = np.asarray(fn())
        if name == "jax_gqa_interpret":  # its length-0 rows are 0/eps garbage: compare the rest
            got, ref = got[lengths_np > 0], want[lengths_np > 0]
        else:
            ref = want
        err = float(np.abs(got - ref).max())
        ok &= err < 1e-4
        print(
            json.dumps(
                {
                    "bench": "decode_attention_smoke",
                    "impl": name,
                    "device": jax.devices()[0].device_kind,
                    "batch": batch,
                    "context": context,
                    "lengths": lengths_np.tolist(),
                    "time_us": round(times[name] * 1e6, 1),
                    "baseline_reference_us": round(times["reference"] * 1e6, 1),
                    "time_ratio_vs_reference": round(times[name] / times["reference"], 2),
                    "max_abs_err_vs_reference": err,
                }
            ),
            flush=True,
        )
    return 0 if ok else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--n-heads", type=int, default=32)
    p.add_argument("--n-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ragged", action="store_true", help="random lengths in [1, context]")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="tiny interpret-mode run (any backend)")
    p.add_argument("--smoke-iters", type=int, default=3)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke or jax.default_backend() != "gpu":
        return bench_smoke(args)
    return bench_gpu(args)


if __name__ == "__main__":
    raise SystemExit(main())
