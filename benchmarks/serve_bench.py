"""Serving benchmark (`tandem bench serve`): vLLM `bench serve` metrics over real gRPC.

Open-loop load — Poisson arrivals at --request-rate (inf = all at once), optionally capped
at --max-concurrency in flight — from a synthetic dataset (random token prompts, input and
output lengths drawn from uniform ranges; outputs forced to their length with ignore_eos,
as vLLM's random dataset does) or a JSONL file of {"prompt": ..., "output_len": N}.

Metrics follow vLLM's definitions:
  TTFT  request start -> first streamed token
  TPOT  (e2e - TTFT) / (output tokens - 1), per request
  ITL   gap between consecutive streamed messages of a request
  e2e   request start -> last message
  request / output-token / total-token throughput over the run's wall time;
  goodput: requests per second that met EVERY SLO given (--slo-ttft-ms ...).

One run compares scheduling modes on the SAME warmed engine (default: continuous vs
static batching), printing one JSON line per mode and comparison lines. Mode `offline`
drives the continuous-batching orchestrator in-process with every request queued at t=0
and no gRPC or client (like `vllm bench throughput`): the ceiling of engine + scheduler
that the served modes are measured against. With --hf-compare
it also runs Hugging Face `transformers` `generate` (static batches of --hf-batch-size,
left-padded, greedy, each batch decoding to its longest requested output) on the SAME
weights: a random LlamaForCausalLM built locally and imported with model/hf.py (or
--hf-dir), so both stacks serve identical parameters. HF has no streaming here, so its
line reports throughput and e2e only (every request arrives at t=0 in that run).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("serve_bench")


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_ids: tuple[int, ...]
    output_len: int


@dataclasses.dataclass
class RequestResult:
    ok: bool
    start: float
    ttft: float = math.nan
    e2e: float = math.nan
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        if self.output_tokens <= 1:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


Mixture = tuple[tuple[int, int, float], ...]  # (lo, hi, weight) components


def _range(text: str) -> Mixture:
    """`N`, `LO:HI`, or a weighted mixture `LO:HI@W,LO:HI@W` (e.g. mostly short, some long)."""
    parts = []
    for item in text.split(","):
        span, _, weight = item.partition("@")
        lo, _, hi = span.partition(":")
        try:
            lo_i, hi_i, w = int(lo), int(hi or lo), float(weight or 1.0)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: expected N, LO:HI or LO:HI@W,...") from e
        if not 1 <= lo_i <= hi_i or w <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= LO <= HI and W > 0")
        parts.append((lo_i, hi_i, w))
    return tuple(parts)


def _draw(rng: random.Random, mix: Mixture) -> int:
    lo, hi, _ = rng.choices(mix, weights=[w for *_, w in mix])[0]
    return rng.randint(lo, hi)


def synthetic_dataset(
    n: int, input_len: Mixture, output_len: Mixture, vocab: int, seed: int
) -> list[BenchRequest]:
    rng = random.Random(seed)
    low = min(vocab - 1, 3)  # avoid the lowest ids (often special) in random prompts
    return [
        BenchRequest(
            tuple(rng.randrange(low, vocab) for _ in range(_draw(rng, input_len))),
            _draw(rng, output_len),
        )
        for _ in range(n)
    ]


def file_dataset(path: Path, tokenizer: Any, n: int) -> list[BenchRequest]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(BenchRequest(tuple(tokenizer.encode(row["prompt"])), int(row["output_len"])))
    if not out:
        raise ValueError(f"{path}: no requests (JSONL with prompt and output_len)")
    return (out * math.ceil(n / len(out)))[:n]


async def _one(stub: Any, pb: Any, req: BenchRequest, timeout: float) -> RequestResult:
    import grpc

    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, prompt_tokens=len(req.prompt_ids))
    last = start
    try:
        call = stub.Generate(
            pb.GenerateRequest(
                prompt_token_ids=list(req.prompt_ids), max_tokens=req.output_len, ignore_eos=True
            ),
            timeout=timeout,
        )
        async for msg in call:
            now = time.perf_counter()
            if msg.token_ids:
                if res.output_tokens == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                res.output_tokens += len(msg.token_ids)
                last = now
        res.e2e = last - start
        res.ok = res.output_tokens == req.output_len
    except grpc.RpcError as e:
        res.error = e.code().name
    return res


async def run_load(
    target: str,
    requests: list[BenchRequest],
    *,
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
    timeout: float = 600.0,
) -> tuple[list[RequestResult], float]:
    import grpc

    from tandem.proto.v1 import generate_pb2 as pb
    from tandem.proto.v1 import generate_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def limited(req: BenchRequest) -> RequestResult:
            if sem is None:
                return await _one(stub, pb, req, timeout)
            async with sem:
                return await _one(stub, pb, req, timeout)

        t0 = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return list(results), duration


def _load_process(
    target: str,
    requests: list[BenchRequest],
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
) -> tuple[list[RequestResult], float]:
    """Entry point of the client process: one open-loop run."""
    return asyncio.run(
        run_load(
            target, requests, request_rate=request_rate, max_concurrency=max_concurrency, seed=seed
        )
    )


def offline_run(engine: Any, requests: list[BenchRequest]) -> tuple[list[RequestResult], float]:
    """Every request queued at t=0 on an in-process continuous-batching orchestrator, stepped
    on this thread until all finish; token times are taken when the orchestrator emits them."""
    from tandem.serve.orchestrator import Orchestrator
    from tandem.serve.sampling import SamplingParams

    cfg = dataclasses.replace(engine.serve_cfg, max_queue=len(requests), mode="continuous")
    orch = Orchestrator(engine, cfg)
    results: list[RequestResult] = []
    unfinished = [len(requests)]
    t0 = time.perf_counter()

    def sink_for(res: RequestResult, want: int):
        last = [t0]

        def sink(out: Any) -> None:
            now = time.perf_counter()
            if out.token_ids:
                if res.output_tokens == 0:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last[0])
                res.output_tokens += len(out.token_ids)
                last[0] = now
            if out.final:
                res.e2e = last[0] - t0
                res.ok = out.error is None and res.output_tokens == want
                res.error = out.error.code if out.error is not None else ""
                unfinished[0] -= 1

        return sink

    for req in requests:
        res = RequestResult(ok=False, start=t0, prompt_tokens=len(req.prompt_ids))
        results.append(res)
        params = SamplingParams(max_tokens=req.output_len, ignore_eos=True)
        orch.submit(list(req.prompt_ids), params, sink_for(res, req.output_len))
    while unfinished[0]:
        orch.step()
    return results, time.perf_counter() - t0


def _pct(values: list[float]) -> dict[str, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], np.float64) * 1000.0
    if arr.size == 0:
        return {"mean": math.nan, "p50": math.nan, "p95": math.nan, "p99": math.nan}
    return {
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
    }


def summarize(
    results: list[RequestResult], duration: float, slo_ms: dict[str, float]
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def good(r: RequestResult) -> bool:
        checks = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
        return all(
            not math.isnan(checks[k]) and checks[k] * 1000.0 <= v
            for k, v in slo_ms.items()
            if not (k == "tpot" and r.output_tokens <= 1)
        )

    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error}),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + in_tokens) / duration,
        "total_output_tokens": out_tokens,
        "total_input_tokens": in_tokens,
        "ttft_ms": _pct([r.ttft for r in ok]),
        "tpot_ms": _pct([r.tpot for r in ok]),
        "itl_ms": _pct([g for r in ok for g in r.itl]),
        "e2e_ms": _pct([r.e2e for r in ok]),
    }
    if slo_ms:
        summary["slo_ms"] = slo_ms
        summary["goodput"] = sum(1 for r in ok if good(r)) / duration
    return summary


def save_random_hf_llama(cfg: Any, directory: Path, seed: int) -> Path:
    """A LlamaForCausalLM with tandem `cfg`'s shape, random init, saved locally + byte
    tokenizer (no download)."""
    import torch
    import transformers

    from tandem.model.tokenizer import Tokenizer

    torch.manual_seed(seed)
    tok = Tokenizer.byte()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    transformers.LlamaForCausalLM(hf_cfg).eval().save_pretrained(directory)
    tok.save(directory)
    return directory


def hf_generate_baseline(
    hf_dir: Path, requests: list[BenchRequest], batch_size: int, pad_id: int, dtype: str
) -> tuple[list[RequestResult], float]:
    """Batched `generate` (greedy, static batches, left padding) over the workload, on the
    GPU when torch sees one (as tandem's engine runs on it), else on the CPU."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    results: list[RequestResult] = []

    def run_batch(batch: list[BenchRequest]) -> None:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        new = max(r.output_len for r in batch)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                min_new_tokens=new, do_sample=False, pad_token_id=pad_id,
            )  # fmt: skip
        out.cpu()  # waits for the device

    # torch's intra-op threads can thrash on a small, busy CPU (2 threads here ran ~30x
    # slower than 1): time a short batch at each thread count and keep the fastest, so the
    # baseline is HF at its best, not at its default.
    probe = [dataclasses.replace(r, output_len=min(r.output_len, 8)) for r in requests[:batch_size]]
    timings = {}
    for threads in sorted({1, max(1, os.cpu_count() or 1)}) if device == "cpu" else [1]:
        torch.set_num_threads(threads)
        run_batch(probe)  # warm-up at this setting
        t = time.perf_counter()
        run_batch(probe)
        timings[threads] = time.perf_counter() - t
    torch.set_num_threads(min(timings, key=timings.get))
    log.info(
        "transformers generate: torch threads %s (probe s: %s)", torch.get_num_threads(), timings
    )
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        run_batch(batch)
        end = time.perf_counter() - t0
        for r in batch:
            results.append(
                RequestResult(
                    ok=True, start=0.0, e2e=end, output_tokens=r.output_len,
                    prompt_tokens=len(r.prompt_ids),
                )
            )  # fmt: skip
    return results, time.perf_counter() - t0


def static_batch_work(requests: list[BenchRequest], batch_size: int) -> tuple[int, int]:
    """(decode steps, row-steps) of static batches of `batch_size` in arrival order: each
    batch decodes until its longest output is done, every row on every step."""
    steps = row_steps = 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        longest = max(r.output_len for r in batch)
        steps += longest
        row_steps += longest * len(batch)
    return steps, row_steps


def _let_exit(pool: Any) -> None:
    """Lets the pool's worker exit on its own: leaving the `with` block terminates it, and a
    terminated worker leaves its semaphores for the resource tracker to warn about."""
    pool.close()
    pool.join()


def _build_engine(args: argparse.Namespace, serve_cfg: Any) -> Any:
    from tandem.serve.engine import JaxEngine

    if args.bundle:
        return JaxEngine.from_bundle(args.bundle, serve_cfg)
    if args.hf_compare:
        import tempfile

        from tandem.config import load_config
        from tandem.model.config import ModelConfig
        from tandem.model.hf import import_hf

        work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
        if args.hf_dir is None:
            cfg = load_config(ModelConfig, args.model, args.model_set)
            args.hf_dir = save_random_hf_llama(cfg, work / "hf", args.seed)
        bundle = import_hf(args.hf_dir, work / "bundle", dtype=args.hf_dtype)
        return JaxEngine.from_bundle(bundle, serve_cfg)
    from flax import nnx

    from tandem.config import load_config
    from tandem.model.config import ModelConfig
    from tandem.model.tokenizer import Tokenizer
    from tandem.model.transformer import Transformer

    cfg = load_config(ModelConfig, args.model, args.model_set)
    tokenizer = Tokenizer.byte()
    model = Transformer(cfg, rngs=nnx.Rngs(args.seed))
    return JaxEngine.from_model(model, tokenizer, serve_cfg)


def _parser() -> argparse.ArgumentParser:
    from tandem.serve.config import ServeConfig

    p = argparse.ArgumentParser(prog="tandem bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=None, help="bundle to serve (else a random --model)")
    p.add_argument("--model", default="tiny", help="ModelConfig preset/file when no bundle")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--modes", default="continuous,static", help="comma list: continuous,static,offline"
    )
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s (inf = burst)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--dataset", default="synthetic", help="'synthetic' or a JSONL file")
    p.add_argument(
        "--input-len", type=_range, default="16:64", help="N, LO:HI or LO:HI@W,... tokens"
    )
    p.add_argument(
        "--output-len", type=_range, default="8:128", help="N, LO:HI or LO:HI@W,... tokens"
    )
    p.add_argument("--max-seqs", "--max-slots", type=int, default=8, dest="max_seqs")
    p.add_argument("--max-len", type=int, default=0, help="0 = model max_seq_len")
    p.add_argument("--max-prompt-len", type=int, default=0)
    p.add_argument("--kv-cache-tokens", type=int, default=0, help="0 = the engine derives it")
    p.add_argument("--page-size", type=int, default=ServeConfig.page_size)
    p.add_argument("--max-num-batched-tokens", type=int, default=ServeConfig.max_num_batched_tokens)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--static-batch-wait-s", type=float, default=0.05)
    p.add_argument(
        "--stream-interval", type=int, default=1, help="tokens per streamed message (server)"
    )
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--slo-e2e-ms", type=float, default=None)
    p.add_argument("--hf-compare", action="store_true", help="also run transformers generate")
    p.add_argument("--hf-dir", type=Path, default=None, help="HF Llama dir (else random)")
    p.add_argument("--hf-batch-size", type=int, default=None, help="default: --max-seqs")
    p.add_argument(
        "--hf-dtype", default="float32", choices=["float32", "bfloat16"],
        help="weights of both stacks with --hf-compare (bfloat16 on a GPU)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := sorted(set(modes) - {"continuous", "static", "offline"}):
        parser.error(f"--modes: unknown {unknown}; allowed continuous, static, offline")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from tandem.serve.config import ServeConfig
    from tandem.serve.server import BackgroundServer, TandemServer

    base = ServeConfig(
        max_seqs=args.max_seqs,
        max_len=args.max_len,
        max_prompt_len=args.max_prompt_len,
        kv_cache_tokens=args.kv_cache_tokens,
        page_size=args.page_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        max_queue=max(64, args.num_requests),
        static_batch_wait_s=args.static_batch_wait_s,
        stream_interval=args.stream_interval,
    )
    engine = _build_engine(args, base)
    t0 = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - t0
    vocab = engine.tokenizer.vocab_size
    if args.dataset == "synthetic":
        cap = engine.max_prompt_len
        input_len = tuple((min(lo, cap), min(hi, cap), w) for lo, hi, w in args.input_len)
        requests = synthetic_dataset(
            args.num_requests, input_len, args.output_len, vocab, args.seed
        )
    else:
        requests = file_dataset(Path(args.dataset), engine.tokenizer, args.num_requests)
    requests = [
        dataclasses.replace(r, output_len=min(r.output_len, engine.max_len - len(r.prompt_ids)))
        for r in requests
    ]
    slo = {
        k: v
        for k, v in (
            ("ttft", args.slo_ttft_ms),
            ("tpot", args.slo_tpot_ms),
            ("e2e", args.slo_e2e_ms),
        )
        if v is not None
    }
    lines = []
    for mode in modes:
        if mode == "offline":
            results, duration = offline_run(engine, requests)
            lines.append(
                {
                    "bench": "serve",
                    "mode": mode,
                    "backend": "tandem-in-process",
                    "num_requests": len(requests),
                    "max_seqs": engine.max_seqs,
                    **summarize(results, duration, slo),
                }
            )
            continue
        cfg = dataclasses.replace(engine.serve_cfg, mode=mode, max_queue=base.max_queue)
        # The load generator runs in its own process (as `vllm bench serve` does), so the
        # client's Python never competes with the server for the GIL.
        with (
            BackgroundServer(TandemServer(engine, dataclasses.replace(cfg, port=0))) as bg,
            mp.get_context("spawn").Pool(1) as pool,
        ):
            pool.apply(_load_process, (bg.target, requests[:1], math.inf, None, args.seed))
            results, duration = pool.apply(
                _load_process,
                (bg.target, requests, args.request_rate, args.max_concurrency, args.seed),
            )
            _let_exit(pool)
        line = {
            "bench": "serve",
            "mode": mode,
            "backend": "tandem-grpc",
            "num_requests": len(requests),
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "max_concurrency": args.max_concurrency,
            "max_seqs": engine.max_seqs,
            "input_len": [list(c) for c in args.input_len],
            "output_len": [list(c) for c in args.output_len],
            "model": engine.info().get("config", {}),
            "warmup_s": warmup_s,
            **summarize(results, duration, slo),
        }
        lines.append(line)
    if args.hf_compare:
        batch_size = args.hf_batch_size or args.max_seqs
        with mp.get_context("spawn").Pool(1) as pool:  # a clean process: torch's own threads
            results, duration = pool.apply(
                hf_generate_baseline,
                (Path(args.hf_dir), requests, batch_size, engine.tokenizer.pad_id,
                 args.hf_dtype),
            )  # fmt: skip
            _let_exit(pool)
        summary = summarize(results, duration, {})
        for key in ("ttft_ms", "tpot_ms", "itl_ms"):
            summary.pop(key)
        steps, row_steps = static_batch_work(requests, batch_size)
        lines.append(
            {
                "bench": "serve",
                "mode": "hf_generate",
                "backend": "transformers",
                "num_requests": len(requests),
                "batch_size": batch_size,
                # Static batches decode to their longest output: the share of row-steps that
                # produce a requested token, and the run's time per row-step (prompts included).
                "useful_row_step_fraction": summary["total_output_tokens"] / row_steps,
                "us_per_row_step": duration / row_steps * 1e6,
                "decode_steps": steps,
                **summary,
            }
        )
    by_mode = {line["mode"]: line for line in lines}
    # (name, numerator mode, denominator mode, ratios beyond output throughput)
    comparisons = (
        ("continuous_vs_static", "continuous", "static",
         {"request_throughput_ratio": "request_throughput", "ttft_p50_ratio": "ttft_ms"}),
        ("tandem_continuous_vs_hf_generate", "continuous", "hf_generate",
         {"e2e_p50_ratio": "e2e_ms"}),
        ("tandem_offline_vs_hf_generate", "offline", "hf_generate", {}),
    )  # fmt: skip
    for name, num, den, extra in comparisons:
        if num in by_mode and den in by_mode:
            a, b = by_mode[num], by_mode[den]
            line = {"bench": "serve", "comparison": name}
            line["output_throughput_ratio"] = a["output_throughput"] / b["output_throughput"]
            for key, metric in extra.items():
                if isinstance(a[metric], dict):  # latency percentiles: compare the p50s
                    line[key] = a[metric]["p50"] / b[metric]["p50"]
                else:
                    line[key] = a[metric] / b[metric]
            lines.append(line)
    for line in lines:
        text = json.dumps(line, default=float)
        sys.stdout.write(text + "\n")
        if args.out:
            with args.out.open("a") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
