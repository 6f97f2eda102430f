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

Workloads (--workload): `mixed` (the synthetic or file dataset above); `shared-prefix`
(chat: conversations whose first turn is one common --system-len-token prompt plus a
distinct user message, each follow-up the previous prompt plus a reply and a new message,
sent when the previous turn has finished); `interference` (--streams requests decoding
long outputs, and one --long-prompt request arriving --long-delay-s later: the streams'
inter-token gaps while it is prefilled, p99 against their median). Beside throughput every
line reports TTFT / TPOT / ITL / e2e percentiles, the prefix hit rate (prompt tokens the
prefix cache held, from usage.cached_prompt_tokens) and the peak number of sequences that
ran at once.

One run compares scheduling modes on the SAME warmed engine (default: continuous vs
static batching; `no-prefix-cache` is continuous with prefix caching off), printing one
JSON line per mode and comparison lines. `--apis grpc,openai` drives each served mode
through both APIs, one after the other with the same requests, each on a fresh server
over the same warmed engine, so neither finds the other's prompts cached (the
OpenAI path: streamed /v1/completions, token-id prompts, continuous usage stats), and
adds an `openai_vs_grpc_<mode>` line: output throughput ratio, TTFT p50 added (ms), TPOT
p50 ratio. Mode `offline` drives the continuous-batching orchestrator in-process with
every request queued at t=0 and no gRPC or client (like `vllm bench throughput`): the
ceiling of engine + scheduler that the served modes are measured against. With
--hf-compare it also runs Hugging Face `transformers` `generate` (static batches of --hf-batch-size,
left-padded, greedy, each batch decoding to its longest requested output) on the SAME
weights: a random LlamaForCausalLM built locally and imported with tandem/model/hf.py (or
--hf-dir), so both stacks serve identical parameters. HF has no streaming here, so its
line reports throughput and e2e only (every request arrives at t=0 in that run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import multiprocessing as mp
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

log = logging.getLogger("serve_bench")


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_ids: tuple[int, ...]
    output_len: int
    arrival: float | None = None  # seconds after the start (None: the Poisson draw)
    tag: str = ""  # a workload's name for a group of requests ("stream", "long", ...)


@dataclasses.dataclass
class RequestResult:
    ok: bool
    start: float
    ttft: float = math.nan
    e2e: float = math.nan
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # usage.cached_prompt_tokens: prompt tokens the prefix cache held
    itl: list[float] = dataclasses.field(default_factory=list)
    itl_at: list[float] = dataclasses.field(default_factory=list)  # when each gap ended
    tag: str = ""
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


def _tokens(rng: random.Random, n: int, vocab: int) -> tuple[int, ...]:
    low = min(vocab - 1, 3)  # avoid the lowest ids (often special) in random prompts
    return tuple(rng.randrange(low, vocab) for _ in range(n))


def shared_prefix_conversations(
    n: int,
    *,
    turns: int,
    system_len: int,
    suffix_len: Mixture,
    output_len: Mixture,
    vocab: int,
    seed: int,
) -> list[list[BenchRequest]]:
    """Chat with one long system prompt: n conversations, each `turns` requests sent one
    after the other (the next when the previous has finished). Turn 1 is the common
    `system_len`-token prefix plus a distinct user message; a follow-up is the previous
    prompt plus a reply and a new user message. The reply in the history is synthetic (the
    same tokens for every system compared), so prompts do not depend on what a server
    generated."""
    rng = random.Random(seed)
    system = _tokens(rng, system_len, vocab)
    conversations = []
    for _ in range(n):
        history, conv = system, []
        for turn in range(turns):
            if turn:
                history += _tokens(rng, conv[-1].output_len, vocab)  # the reply
            history += _tokens(rng, _draw(rng, suffix_len), vocab)  # the user's message
            conv.append(BenchRequest(history, _draw(rng, output_len), tag=f"turn{turn + 1}"))
        conversations.append(conv)
    return conversations


def interference_requests(
    *,
    streams: int,
    stream_prompt: int,
    stream_output: int,
    long_prompt: int,
    long_output: int,
    delay_s: float,
    vocab: int,
    seed: int,
) -> list[BenchRequest]:
    """`streams` requests decoding long outputs from t = 0, and one `long_prompt`-token
    request arriving `delay_s` later, while they decode: how much its prefill delays their
    tokens (the `interference` line: their inter-token gaps while it is prefilled)."""
    rng = random.Random(seed)
    reqs = [
        BenchRequest(_tokens(rng, stream_prompt, vocab), stream_output, 0.0, "stream")
        for _ in range(streams)
    ]
    return [*reqs, BenchRequest(_tokens(rng, long_prompt, vocab), long_output, delay_s, "long")]


async def _one(stub: Any, pb: Any, req: BenchRequest, timeout: float) -> RequestResult:
    import grpc

    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, prompt_tokens=len(req.prompt_ids), tag=req.tag)
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
                    res.itl_at.append(now)
                res.output_tokens += len(msg.token_ids)
                last = now
            if msg.finish_reason:
                res.cached_tokens = msg.usage.cached_prompt_tokens
        res.e2e = last - start
        res.ok = res.output_tokens == req.output_len
    except grpc.RpcError as e:
        res.error = e.code().name
    return res


async def _sse_events(host: str, port: int, path: str, body: dict) -> AsyncIterator[bytes]:
    """POSTs `body` as JSON and yields the `data:` payloads of the server-sent-event reply.
    HTTP/1.1 on asyncio streams, chunked or close-delimited: a client this lean costs the
    CPU a server shares with it (2 cores here) about what grpc.aio's C core does."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line
        if status != 200:
            raise OSError(f"HTTP {status}: {(await reader.read())[:300]!r}")
        buffer = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            elif not (data := await reader.read(1 << 16)):
                break
            *events, buffer = (buffer + data).split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    yield event[6:]
    finally:
        writer.close()


async def _openai_one(
    host: str, port: int, model: str, req: BenchRequest, timeout: float
) -> RequestResult:
    """One streamed /v1/completions request (token-id prompt, greedy, ignore_eos), timed
    like `_one`; tokens are counted from vLLM's continuous usage stats, which tandem and
    vLLM both send, so one message carrying several tokens counts them all."""
    body = {
        "model": model,
        "prompt": list(req.prompt_ids),
        "max_tokens": req.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, prompt_tokens=len(req.prompt_ids), tag=req.tag)
    last = start
    try:
        async with asyncio.timeout(timeout):
            async for data in _sse_events(host, port, "/v1/completions", body):
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    raise OSError(chunk["error"].get("message", "error event"))
                usage = chunk.get("usage") or {}
                total = usage.get("completion_tokens", res.output_tokens)
                if chunk.get("choices") and total > res.output_tokens:  # new tokens
                    if res.output_tokens == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                        res.itl_at.append(now)
                    res.output_tokens, last = total, now
                elif not chunk.get("choices"):  # the last, usage-only chunk
                    details = usage.get("prompt_tokens_details") or {}
                    res.cached_tokens = details.get("cached_tokens") or 0
        res.e2e = last - start
        res.ok = res.output_tokens == req.output_len
    except (OSError, TimeoutError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


async def run_load(
    target: str,
    requests: list[BenchRequest] | list[list[BenchRequest]],
    *,
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
    timeout: float = 600.0,
    api: str = "grpc",
    model: str = "",
) -> tuple[list[RequestResult], float]:
    """Open-loop load on `target` (host:port) through tandem's gRPC API or an
    OpenAI-compatible HTTP API (`api="openai"`, tandem's or vLLM's, naming `model`).

    Items are requests, or conversations (lists of turns, each turn sent when the one
    before it has finished). An item starts at its first request's `arrival` when it has
    one, else at Poisson times of `request_rate` items per second (inf = all at once). One
    asyncio task per item on one thread: the same client for every server, and one that
    does not starve when a server holds every core (a thread per request did)."""
    import grpc

    from tandem.proto.v1 import generate_pb2 as pb
    from tandem.proto.v1 import generate_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    async with contextlib.AsyncExitStack() as stack:
        if api == "grpc":
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(target))
            one = functools.partial(_one, pb_grpc.GenerationStub(channel), pb)
        else:
            host, port = target.rsplit(":", 1)
            one = functools.partial(_openai_one, host, int(port), model)

        async def converse(turns: list[BenchRequest]) -> list[RequestResult]:
            async with sem:
                return [await one(req, timeout) for req in turns]

        t0 = time.perf_counter()
        tasks = []
        # Each start is due at a time from t0 (Poisson: the gaps summed), never at a gap
        # after the previous wake-up: a client woken late (it shares the cores with the
        # server it measures) would otherwise shift every later start and offer a busier
        # server less than `request_rate`.
        due = 0.0
        for item in requests:
            turns = item if isinstance(item, list) else [item]
            arrival = turns[0].arrival
            if arrival is None:
                arrival = due
                if math.isfinite(request_rate):
                    due += rng.exponential(1.0 / request_rate)
            if arrival > 0:
                await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
            tasks.append(asyncio.create_task(converse(turns)))
        results = [r for turns in await asyncio.gather(*tasks) for r in turns]
        duration = time.perf_counter() - t0
    return results, duration


def _load_process(
    target: str,
    requests: list[BenchRequest] | list[list[BenchRequest]],
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
    api: str = "grpc",
    model: str = "",
) -> tuple[list[RequestResult], float]:
    """Entry point of the client process: one open-loop run (on uvloop, as the servers
    run: the client shares the host's cores with the server it measures)."""
    return uvloop.run(
        run_load(
            target, requests, request_rate=request_rate, max_concurrency=max_concurrency,
            seed=seed, api=api, model=model,
        )
    )  # fmt: skip


def offline_run(engine: Any, requests: list[Any]) -> tuple[list[RequestResult], float, int]:
    """Every request (every turn of every conversation) queued at t=0 on an in-process
    orchestrator, stepped on this thread until all finish; token times are taken when the
    orchestrator emits them. Returns the results, the duration and the peak number of
    sequences that ran at once."""
    from tandem.serve.orchestrator import Orchestrator
    from tandem.serve.sampling import SamplingParams

    cfg = dataclasses.replace(engine.serve_cfg, max_queue=len(requests), mode="continuous")
    orch = Orchestrator(engine, cfg)
    requests = [r for conv in requests for r in conv] if isinstance(requests[0], list) else requests
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
                res.cached_tokens = out.cached_prompt_tokens
                res.ok = out.error is None and res.output_tokens == want
                res.error = out.error.code if out.error is not None else ""
                unfinished[0] -= 1

        return sink

    for req in requests:
        res = RequestResult(ok=False, start=t0, prompt_tokens=len(req.prompt_ids), tag=req.tag)
        results.append(res)
        params = SamplingParams(max_tokens=req.output_len, ignore_eos=True)
        orch.submit(list(req.prompt_ids), params, sink_for(res, req.output_len))
    while unfinished[0]:
        orch.step()
    return results, time.perf_counter() - t0, orch.peak_running


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
    if in_tokens:
        summary["prefix_hit_rate"] = sum(r.cached_tokens for r in ok) / in_tokens
    tags = sorted({r.tag for r in ok if r.tag})
    if tags:
        summary["ttft_ms_by_tag"] = {t: _pct([r.ttft for r in ok if r.tag == t]) for t in tags}
    if "long" in tags and "stream" in tags:
        summary["interference"] = interference(ok)
    return summary


def interference(ok: list[RequestResult]) -> dict[str, Any]:
    """The streams' inter-token gaps overall and those that overlap the long request's
    prefill (from its arrival to its first token), and the ratio the goal bounds: p99 of
    the gaps during the prefill over the median gap."""
    [long] = [r for r in ok if r.tag == "long"]
    lo, hi = long.start, long.start + long.ttft
    streams = [r for r in ok if r.tag == "stream"]
    gaps = [g for r in streams for g in r.itl]
    during = [
        g
        for r in streams
        for g, end in zip(r.itl, r.itl_at, strict=True)
        if end > lo and end - g < hi
    ]
    median = float(np.median(gaps)) * 1000.0
    stats = {"stream_itl_ms": _pct(gaps), "during_prefill_itl_ms": _pct(during)}
    stats["during_prefill_itl_ms"]["max"] = max(during, default=math.nan) * 1000.0
    stats["long_ttft_ms"] = long.ttft * 1000.0
    stats["p99_during_prefill_vs_median"] = stats["during_prefill_itl_ms"]["p99"] / median
    return stats


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


MODES = ("continuous", "static", "offline", "no-prefix-cache")
WORKLOADS = ("mixed", "shared-prefix", "interference")
SIZES = ("max_seqs", "max_len", "kv_cache_tokens", "page_size", "max_num_batched_tokens")


def workload(args: argparse.Namespace, engine: Any) -> list[Any]:
    """The requests of --workload: `mixed` (the synthetic dataset or --dataset), a list of
    requests; `shared-prefix`, a list of conversations (lists of turns); `interference`,
    --streams decoding requests and one --long-prompt request arriving while they run."""
    vocab = engine.tokenizer.vocab_size
    if args.workload == "shared-prefix":
        return shared_prefix_conversations(
            args.num_requests, turns=args.turns, system_len=args.system_len,
            suffix_len=args.input_len, output_len=args.output_len, vocab=vocab, seed=args.seed,
        )  # fmt: skip
    if args.workload == "interference":
        return interference_requests(
            streams=args.streams, stream_prompt=32, stream_output=args.stream_output,
            long_prompt=args.long_prompt, long_output=8, delay_s=args.long_delay_s,
            vocab=vocab, seed=args.seed,
        )  # fmt: skip
    if args.dataset == "synthetic":
        cap = engine.max_prompt_len
        input_len = tuple((min(lo, cap), min(hi, cap), w) for lo, hi, w in args.input_len)
        requests = synthetic_dataset(
            args.num_requests, input_len, args.output_len, vocab, args.seed
        )
    else:
        requests = file_dataset(Path(args.dataset), engine.tokenizer, args.num_requests)
    return [
        dataclasses.replace(r, output_len=min(r.output_len, engine.max_len - len(r.prompt_ids)))
        for r in requests
    ]


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
    p.add_argument("--modes", default="continuous,static", help=f"comma list of {', '.join(MODES)}")
    p.add_argument(
        "--apis", default="grpc",
        help="comma list: grpc,openai (the OpenAI-compatible HTTP API); each API's pass on a "
        "fresh server over the same engine",
    )  # fmt: skip
    p.add_argument(
        "--workload", default="mixed", choices=WORKLOADS,
        help="mixed: --input-len/--output-len (or --dataset); shared-prefix: --num-requests "
        "conversations of --turns turns after a common --system-len prompt (--input-len: each "
        "user message); interference: --streams decoding + one --long-prompt arriving",
    )  # fmt: skip
    p.add_argument("--turns", type=int, default=2, help="shared-prefix: turns per conversation")
    p.add_argument("--system-len", type=int, default=1000, help="shared-prefix: common prompt")
    p.add_argument("--streams", type=int, default=16, help="interference: decoding requests")
    p.add_argument("--stream-output", type=int, default=512, help="interference: their tokens")
    p.add_argument("--long-prompt", type=int, default=2000, help="interference: its tokens")
    p.add_argument("--long-delay-s", type=float, default=1.0, help="interference: its arrival")
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
    p.add_argument(
        "--async-scheduling", action=argparse.BooleanOptionalAction,
        default=ServeConfig.async_scheduling, help="as tandem serve's",
    )  # fmt: skip
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
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"--modes: unknown {unknown}; allowed {', '.join(MODES)}")
    apis = [a.strip() for a in args.apis.split(",") if a.strip()]
    if not apis or set(apis) - {"grpc", "openai"}:
        parser.error(f"--apis={args.apis!r} is invalid: allowed grpc, openai (comma list)")
    if "offline" in modes and args.workload == "interference":
        parser.error(
            "--modes offline is invalid with --workload interference: offline queues every "
            "request at t=0, and the workload's long prompt arrives while the others decode"
        )
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
        async_scheduling=args.async_scheduling,
        max_queue=max(64, args.num_requests),
        static_batch_wait_s=args.static_batch_wait_s,
        stream_interval=args.stream_interval,
    )
    engine = _build_engine(args, base)
    t0 = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - t0
    requests = workload(args, engine)
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
            results, duration, peak = offline_run(engine, requests)
            lines.append(
                {
                    "bench": "serve",
                    "mode": mode,
                    "workload": args.workload,
                    "backend": "tandem-in-process",
                    "num_requests": len(results),
                    "max_seqs": engine.max_seqs,
                    "peak_running": peak,
                    **summarize(results, duration, slo),
                }
            )
            continue
        cfg = dataclasses.replace(
            engine.serve_cfg,
            mode="static" if mode == "static" else "continuous",
            enable_prefix_caching=base.enable_prefix_caching and mode != "no-prefix-cache",
            max_queue=base.max_queue,
            port=0,
            http_port=0 if "openai" in apis else None,
        )
        # The load generator runs in its own process (as `vllm bench serve` does), so the
        # client's Python never competes with the server for the GIL.
        # A first request that warms the client and the server's Python (its prompt shares
        # nothing with the workload's: random tokens) is not measured. Each API gets the
        # same requests, one after the other, each on a server of its own over the warmed
        # engine: on one server the second API's prompts would hit the first's cached
        # prefixes.
        probe = [BenchRequest(tuple(range(3, 11)), 2)]
        with mp.get_context("spawn").Pool(1) as pool:
            for api in apis:
                with BackgroundServer(TandemServer(engine, cfg)) as bg:
                    where = bg.target
                    if api == "openai":
                        where = f"{bg.server.host}:{bg.server.bound_http_port}"
                    probe_args = (where, probe, math.inf, None, args.seed, api, "tandem")
                    pool.apply(_load_process, probe_args)
                    bg.server.orch.peak_running = 0
                    results, duration = pool.apply(
                        _load_process,
                        (where, requests, args.request_rate, args.max_concurrency, args.seed,
                         api, "tandem"),
                    )  # fmt: skip
                    peak_running = bg.server.orch.peak_running
                lines.append(
                    {
                        "bench": "serve",
                        "mode": mode,
                        "api": api,
                        "workload": args.workload,
                        "backend": f"tandem-{api}",
                        "num_requests": len(results),
                        "request_rate": args.request_rate
                        if math.isfinite(args.request_rate)
                        else "inf",
                        "max_concurrency": args.max_concurrency,
                        "max_seqs": engine.max_seqs,
                        "peak_running": peak_running,
                        "serve_config": {k: getattr(engine.serve_cfg, k) for k in SIZES},
                        "async_scheduling": engine.serve_cfg.async_scheduling,
                        "input_len": [list(c) for c in args.input_len],
                        "output_len": [list(c) for c in args.output_len],
                        "model": engine.info().get("config", {}),
                        "warmup_s": warmup_s,
                        **summarize(results, duration, slo),
                    }
                )
            _let_exit(pool)
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
    for mode in modes:  # the OpenAI HTTP path against gRPC, same engine, same requests
        pair = {x["api"]: x for x in lines if x.get("mode") == mode and "api" in x}
        if {"grpc", "openai"} <= set(pair):
            http, grpc_line = pair["openai"], pair["grpc"]
            lines.append(
                {
                    "bench": "serve",
                    "comparison": f"openai_vs_grpc_{mode}",
                    "output_throughput_ratio": http["output_throughput"]
                    / grpc_line["output_throughput"],
                    "ttft_p50_added_ms": http["ttft_ms"]["p50"] - grpc_line["ttft_ms"]["p50"],
                    "tpot_p50_ratio": http["tpot_ms"]["p50"] / grpc_line["tpot_ms"]["p50"],
                }
            )
    by_mode = {x["mode"]: x for x in lines if "mode" in x and x.get("api", "grpc") == "grpc"}
    # (name, numerator mode, denominator mode, ratios beyond output throughput)
    comparisons = (
        ("continuous_vs_static", "continuous", "static",
         {"request_throughput_ratio": "request_throughput", "ttft_p50_ratio": "ttft_ms"}),
        ("prefix_cache_off_vs_on", "no-prefix-cache", "continuous",
         {"ttft_p50_ratio": "ttft_ms", "ttft_p99_ratio": "ttft_ms"}),
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
                if isinstance(a[metric], dict):  # latency percentiles: compare the p50s (p99s)
                    pct = "p99" if key.endswith("p99_ratio") else "p50"
                    line[key] = a[metric][pct] / b[metric][pct]
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
    from tandem.cli import setup_logging

    setup_logging("INFO")  # what `tandem bench serve` sets up before calling main
    raise SystemExit(main())
