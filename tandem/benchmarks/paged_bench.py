"""Paged attention step time per page size.

One decode-heavy engine step (default: 32 decode rows of 250-350 cached tokens plus one
256-token prompt chunk, tiny-model heads N=4, K=2, H=64, float32, R=64 rows of capacity,
max_len 1024) runs through `kernels.paged_attention` for each page size. The page sizes
are timed round-robin (one call each per round), so load on a shared machine hits them
alike; the JSON lines give the best and median of the rounds.

    python benchmarks/paged_bench.py                          # CPU: the XLA reference
    python benchmarks/paged_bench.py --impl pallas --dtype bfloat16   # a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tandem import kernels
from tandem.kernels.testing import paged_step


def _step_rows(args: argparse.Namespace) -> list[tuple[int, int]]:
    rng = np.random.default_rng(args.seed)
    decode = rng.integers(args.decode_len - 50, args.decode_len + 51, args.decode_rows)
    return [(1, int(n)) for n in decode] + [(args.chunk, args.chunk_context + args.chunk)]


def _timings(fns: dict[str, Callable[[], jax.Array]], rounds: int) -> dict[str, list[float]]:
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile + warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--page-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--decode-rows", type=int, default=32)
    p.add_argument("--decode-len", type=int, default=300, help="mean cached tokens (+-50)")
    p.add_argument("--chunk", type=int, default=256, help="prompt-chunk query tokens")
    p.add_argument("--chunk-context", type=int, default=0, help="tokens cached before it")
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--impl", default="reference", choices=["reference", "pallas", "auto"])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    rows = _step_rows(args)
    shape = {"n_heads": args.n_heads, "n_kv": args.n_kv_heads, "head_dim": args.head_dim}
    fns: dict[str, Callable[[], jax.Array]] = {}
    for page_size in args.page_sizes:
        step = paged_step(
            args.seed, rows, page_size=page_size, dtype=dtype,
            padding_rows=args.max_rows - len(rows), padding_tokens=0,
            spare_pages=args.max_rows * args.max_len // page_size, **shape,
        )  # fmt: skip
        table = np.zeros((args.max_rows, args.max_len // page_size), np.int32)
        table[:, : step.page_indices.shape[1]] = step.page_indices
        step = step._replace(page_indices=jnp.asarray(table))
        run = jax.jit(lambda *a: kernels.paged_attention(*a, impl=args.impl))
        fns[f"paged-ps{page_size}"] = lambda run=run, step=step: run(*step)

    times = _timings(fns, args.rounds)
    for name, ts in times.items():
        record = {
            "bench": "paged_attention_step",
            "impl": name,
            "attention_impl": args.impl,
            "device": jax.devices()[0].device_kind,
            "decode_rows": args.decode_rows,
            "decode_len": args.decode_len,
            "chunk": args.chunk,
            "dtype": args.dtype,
            "best_ms": round(min(ts) * 1e3, 3),
            "median_ms": round(float(np.median(ts)) * 1e3, 3),
        }
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
