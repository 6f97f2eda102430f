"""The device time of one serving decode step, beside the TPOT the serving benchmark saw.

One decode step of `--slots` running sequences as the engine runs it on device: its
compiled step (tandem/serve/engine.py: `Transformer.step` over the paged cache, the per-row
sampler, the packed output) on a plan of one token per sequence, the sequences holding
`--context` +- 50 % cached tokens (prefilled through the engine first). The median step
time is the floor under a token's latency; `--serve-jsonl` reads the TPOT p50 of a
`serve_bench.py` run (its continuous mode) and reports the device's share of it, the rest
being the host (scheduling, prompt chunks between decode steps, detokenization, gRPC).

`--long-prompt N` then adds one N-token prompt beside the decoding sequences (the
interference workload's shape) and times each step that runs a chunk of it, by where the
chunk starts (`--band` positions per figure): a chunk attends to every position before
it, so the steps late in a long prompt are the slowest, and the streams decoding beside
it wait that long for their token. These are sync steps from `engine.step` to the
tokens on the host, the decode-only step measured the same way beside them.

    python benchmarks/step_bench.py --bundle /tmp/b1b --slots 64 --max-len 1024 \\
        --serve-jsonl gpu-results/serve_bench.jsonl        # a GPU, after serve_bench
    python benchmarks/step_bench.py                        # CPU: the tiny model
    python benchmarks/step_bench.py --slots 16 --context 100 --long-prompt 2000 \\
        --max-num-batched-tokens 64 --max-len 4096 --model-set max_seq_len=4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from tandem.config import load_config
from tandem.model.config import ModelConfig
from tandem.model.transformer import Transformer
from tandem.serve.config import ServeConfig
from tandem.serve.engine import JaxEngine
from tandem.serve.sampling import SamplingParams
from tandem.serve.scheduler import Request, Scheduler


def _engine(args: argparse.Namespace) -> JaxEngine:
    # A budget of one token per sequence would prefill the prompts a few tokens a step
    # beside the decodes, so the first sequences would finish before the last started; at
    # four mean contexts per step every sequence is decoding long before any ends.
    budget = args.max_num_batched_tokens or max(args.slots, 8, 4 * args.context)
    cfg = ServeConfig(
        max_seqs=args.slots + (1 if args.long_prompt else 0),
        max_len=args.max_len,
        max_num_batched_tokens=budget,
    )
    if args.bundle:
        return JaxEngine.from_bundle(args.bundle, cfg)
    from tandem.model.tokenizer import Tokenizer

    model = Transformer(load_config(ModelConfig, args.model, args.model_set), rngs=nnx.Rngs(0))
    return JaxEngine.from_model(model, Tokenizer.byte(), cfg)


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
    p.add_argument("--slots", type=int, default=64, help="running sequences (max_seqs)")
    p.add_argument("--max-len", type=int, default=0, help="positions per sequence (0 = model's)")
    p.add_argument("--context", type=int, default=160, help="mean cached tokens per sequence")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-jsonl", type=Path, default=None, help="serve_bench.py output")
    p.add_argument("--long-prompt", type=int, default=0, help="then time a prompt's chunks")
    p.add_argument("--band", type=int, default=250, help="chunk start positions per figure")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=0, help="0 = 4 mean contexts per step"
    )
    args = p.parse_args(argv)

    engine = _engine(args)
    start = time.perf_counter()
    engine.warmup()
    compile_s = time.perf_counter() - start
    sched = Scheduler(engine.serve_cfg, cache_key=engine.cache_key)
    rng = np.random.default_rng(args.seed)
    max_len, vocab = engine.max_len, engine.tokenizer.vocab_size
    low, high = max(1, args.context // 2), min(max_len // 2, args.context * 3 // 2)
    for i, n in enumerate(rng.integers(low, high + 1, args.slots)):
        prompt = rng.integers(0, vocab, int(n)).tolist()
        params = SamplingParams(max_tokens=max_len - int(n), ignore_eos=True)  # never ends here
        sched.add_request(Request(str(i), prompt, params, seed=i))
    while True:  # the prompts, through the engine, until every sequence is decoding
        plan = sched.schedule()
        if plan.num_tokens == plan.num_rows == args.slots:
            break
        sched.update_from_output(plan, engine.step(plan).tokens(plan.num_rows))
    # The compiled step alone, on that plan padded as `step` pads it: its writes land in
    # the same slots every time, so every iteration does the same work.
    bucket = engine._bucket(plan.num_tokens)
    run, inputs = engine.compiled_functions()[bucket], engine.packed_inputs(plan, bucket)
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        engine._cache, out, _ = run(engine._weights, engine._cache, inputs)  # _: prompt rows
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    step_ms = float(np.median(times)) * 1e3
    cfg = engine.cfg
    line = {
        "bench": "step",
        "model": args.bundle or args.model,
        "params": cfg.num_params,
        "dtype": cfg.dtype,
        "attention_impl": cfg.attention_impl,
        "device": jax.devices()[0].device_kind,
        "slots": args.slots,
        "max_len": max_len,
        "page_size": engine.serve_cfg.page_size,
        "tokens_bucket": bucket,
        "context_mean": float(np.mean(plan.num_computed_tokens)),
        "compile_s": round(compile_s, 2),
        "step_ms_median": step_ms,
        "step_ms_best": float(np.min(times)) * 1e3,
        "tokens_per_s": args.slots / (step_ms / 1e3),
    }
    if args.long_prompt:
        line |= chunk_steps(engine, sched, args.long_prompt, args.band, args.iters, rng)
    if args.serve_jsonl is not None and args.serve_jsonl.exists():
        tpot = serve_tpot_p50_ms(args.serve_jsonl)
        if tpot:
            line |= {"serve_tpot_p50_ms": tpot, "device_share_of_tpot": step_ms / tpot}
    print(json.dumps(line), flush=True)
    return 0


def chunk_steps(
    engine: JaxEngine,
    sched: Scheduler,
    prompt_len: int,
    band: int,
    iters: int,
    rng: np.random.Generator,
) -> dict[str, object]:
    """Sync step times (ms) of a `prompt_len`-token prompt's chunks beside the decoding
    sequences of `sched`, median per `band` of chunk start positions, and of the
    decode-only step before it."""

    def timed_step() -> float:
        plan = sched.schedule()
        start = time.perf_counter()
        tokens = engine.step(plan).tokens(plan.num_rows)
        elapsed = time.perf_counter() - start
        sched.update_from_output(plan, tokens)
        return elapsed * 1e3

    decode = [timed_step() for _ in range(iters)]
    prompt = rng.integers(0, engine.tokenizer.vocab_size, prompt_len).tolist()
    long = Request("long", prompt, SamplingParams(max_tokens=1), seed=0)
    sched.add_request(long)
    by_band: dict[int, list[float]] = {}
    while long.num_computed_tokens < prompt_len:
        start = long.num_computed_tokens
        by_band.setdefault(start // band * band, []).append(timed_step())
    times = [t for band_times in by_band.values() for t in band_times]
    return {
        "long_prompt": prompt_len,
        "max_num_batched_tokens": engine.serve_cfg.max_num_batched_tokens,
        "decode_step_ms": float(np.median(decode)),
        "chunk_step_ms_by_start": {str(b): float(np.median(t)) for b, t in by_band.items()},
        "chunk_steps": len(times),
        "slowest_chunk_step_ms": max(times),
        "prefill_ms": sum(times),
    }


if __name__ == "__main__":
    sys.exit(main())
