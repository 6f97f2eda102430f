"""The device time of one serving decode step, beside the TPOT the serving benchmark saw.

One step of every slot as the engine runs it on device: the model's `decode` over
per-layer weights (`unstack_layers`, as the engine holds them) with the KV cache donated,
then the next token picked (argmax; sampling costs about the same). Slots hold
`--context` +- 50 % cached tokens. The median step time is the floor under a token's
latency; `--serve-jsonl` reads the TPOT p50 of a `serve_bench.py` run (its continuous
mode) and reports the device's share of it, the rest being the host (scheduling,
prefills between steps, detokenization, gRPC).

    python benchmarks/step_bench.py --bundle /tmp/b1b --slots 64 --max-len 1024 \\
        --serve-jsonl gpu-results/serve_bench.jsonl        # a GPU, after serve_bench
    python benchmarks/step_bench.py                        # CPU: the tiny model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from tandem.config import load_config
from tandem.model.config import ModelConfig
from tandem.model.transformer import Transformer, init_cache


def _model(args: argparse.Namespace) -> Transformer:
    if args.bundle:
        from tandem.model.bundle import Bundle

        return Bundle.load(args.bundle).model()
    cfg = load_config(ModelConfig, args.model, args.model_set)
    return Transformer(cfg, rngs=nnx.Rngs(args.seed))


def serve_tpot_p50_ms(path: Path) -> float | None:
    """The continuous mode's TPOT p50 (ms) in a serve_bench JSONL file, if there is one."""
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("mode") == "continuous" and "tpot_ms" in record:
            return float(record["tpot_ms"]["p50"])
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle to load (else a random --model)")
    p.add_argument("--model", default="tiny", help="ModelConfig preset/file when no bundle")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024, help="cache capacity per slot")
    p.add_argument("--context", type=int, default=160, help="mean cached tokens per slot")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-jsonl", type=Path, default=None, help="serve_bench.py output")
    args = p.parse_args(argv)

    model = _model(args)
    cfg = model.cfg
    layers = model.unstack_layers()
    del model.layers  # the engine's layout: per-layer weights, the rest in the module
    graphdef, rest = nnx.split(model, nnx.Param)

    def step(rest, layers, tokens, cache, lengths):
        logits, cache = nnx.merge(graphdef, rest).decode(tokens, cache, lengths, layers=layers)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache  # [B]

    run = jax.jit(step, donate_argnums=(3,))
    rng = np.random.default_rng(args.seed)
    low, high = max(1, args.context // 2), min(args.max_len - 1, args.context * 3 // 2)
    lengths = jnp.asarray(rng.integers(low, high + 1, args.slots), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, args.slots), jnp.int32)
    cache = init_cache(cfg, args.slots, args.max_len)
    start = time.perf_counter()
    tokens, cache = jax.block_until_ready(run(rest, layers, tokens, cache, lengths))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.iters):  # lengths stay put: every step does the same work
        start = time.perf_counter()
        tokens, cache = jax.block_until_ready(run(rest, layers, tokens, cache, lengths))
        times.append(time.perf_counter() - start)
    step_ms = float(np.median(times)) * 1e3
    line = {
        "bench": "step",
        "model": args.bundle or args.model,
        "params": cfg.num_params,
        "dtype": cfg.dtype,
        "attention_impl": cfg.attention_impl,
        "device": jax.devices()[0].device_kind,
        "slots": args.slots,
        "max_len": args.max_len,
        "context_mean": float(np.mean(np.asarray(lengths))),
        "compile_s": round(compile_s, 2),
        "step_ms_median": step_ms,
        "step_ms_best": float(np.min(times)) * 1e3,
        "tokens_per_s": args.slots / (step_ms / 1e3),
    }
    if args.serve_jsonl is not None and args.serve_jsonl.exists():
        tpot = serve_tpot_p50_ms(args.serve_jsonl)
        if tpot:
            line |= {"serve_tpot_p50_ms": tpot, "device_share_of_tpot": step_ms / tpot}
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
