"""benchmarks/serve_bench.py runs end to end on a tiny model and reports vLLM's metric set."""

from __future__ import annotations

import importlib
import itertools
import json
from pathlib import Path

import pytest


def _load_bench():
    return importlib.import_module("tandem.benchmarks.serve_bench")


def test_metrics_math() -> None:
    bench = _load_bench()
    r = bench.RequestResult(ok=True, start=0.0, ttft=0.1, e2e=1.0, output_tokens=10)
    assert r.tpot == pytest.approx(0.1)  # (e2e - ttft) / (tokens - 1)
    slow = bench.RequestResult(ok=True, start=0.0, ttft=0.5, e2e=3.0, output_tokens=6)
    s = bench.summarize([r, slow], 2.0, {"ttft": 200.0})
    assert s["completed"] == 2 and s["output_throughput"] == pytest.approx(8.0)
    assert s["goodput"] == pytest.approx(0.5)  # only one request met the TTFT SLO
    assert s["tpot_ms"]["p50"] == pytest.approx(300.0)


def test_static_batch_work_runs_each_batch_to_its_longest_output() -> None:
    bench = _load_bench()
    reqs = [bench.BenchRequest((1, 2), n) for n in (3, 10, 4, 4, 1)]
    # batches (3, 10) (4, 4) (1): 10 + 4 + 1 steps; 2*10 + 2*4 + 1*1 row-steps
    assert bench.static_batch_work(reqs, 2) == (15, 29)
    assert bench.static_batch_work(reqs, 8) == (10, 50)


def test_continuous_vs_static_run(tmp_path: Path, capsys) -> None:
    bench = _load_bench()
    out = tmp_path / "bench.jsonl"
    rc = bench.main(
        [
            "--model-set", "d_model=64", "--model-set", "n_layers=2", "--model-set", "d_ff=128",
            "--model-set", "head_dim=16", "--model-set", "vocab_size=320",
            "--model-set", "max_seq_len=64",
            "--max-seqs", "4", "--max-prompt-len", "16", "--num-requests", "12",
            "--input-len", "4:16", "--output-len", "2:40", "--slo-ttft-ms", "60000",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    modes = {x["mode"]: x for x in lines if "mode" in x}
    assert set(modes) == {"continuous", "static"}
    for line in modes.values():
        assert line["completed"] == 12 and line["failed"] == 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(line[key]) == {"mean", "p50", "p95", "p99"}
        assert line["goodput"] > 0
    # same workload in both modes: the same useful tokens
    assert modes["continuous"]["total_output_tokens"] == modes["static"]["total_output_tokens"]
    assert any(x.get("comparison") == "continuous_vs_static" for x in lines)


def test_offline_mode_runs_in_process(tmp_path: Path) -> None:
    """`offline` (no gRPC) serves the same workload to completion, with token timings."""
    bench = _load_bench()
    out = tmp_path / "bench.jsonl"
    rc = bench.main(
        [
            "--model-set", "d_model=64", "--model-set", "n_layers=2", "--model-set", "d_ff=128",
            "--model-set", "head_dim=16", "--model-set", "vocab_size=320",
            "--model-set", "max_seq_len=64", "--modes", "offline,continuous",
            "--max-seqs", "4", "--max-prompt-len", "16", "--num-requests", "10",
            "--input-len", "4:16", "--output-len", "2:40", "--out", str(out),
            "--apis", "grpc,openai",
        ]
    )  # fmt: skip
    assert rc == 0
    lines = list(map(json.loads, out.read_text().splitlines()))
    modes = {x["mode"]: x for x in lines if x.get("api", "grpc") == "grpc" and "mode" in x}
    # the OpenAI HTTP path of the same server: the same requests, all their tokens counted
    (http,) = [x for x in lines if x.get("api") == "openai"]
    assert http["backend"] == "tandem-openai" and http["completed"] == 10
    assert http["total_output_tokens"] == modes["continuous"]["total_output_tokens"]
    assert http["ttft_ms"]["p50"] > 0 and http["itl_ms"]["p50"] > 0
    (ratio,) = [x for x in lines if x.get("comparison") == "openai_vs_grpc_continuous"]
    assert ratio["output_throughput_ratio"] > 0
    offline = modes["offline"]
    assert offline["backend"] == "tandem-in-process"
    assert offline["completed"] == 10 and offline["failed"] == 0
    assert offline["total_output_tokens"] == modes["continuous"]["total_output_tokens"]
    assert offline["ttft_ms"]["p50"] > 0 and offline["tpot_ms"]["p50"] > 0


def test_starts_stay_on_the_poisson_schedule_when_the_client_wakes_late(monkeypatch) -> None:
    """Each start is due at the summed Poisson gaps from t0: a client held up (here the
    first request blocks its event loop for 0.5 s, as a busy server's cores may) starts
    the requests due meanwhile at once and the later ones on time, instead of pushing
    every later start back."""
    import asyncio
    import time

    import numpy as np

    bench = _load_bench()
    rate, n, seed = 20.0, 30, 3
    starts: list[float] = []

    async def one(host, port, model, req, timeout):
        starts.append(time.perf_counter())
        if len(starts) == 1:
            time.sleep(0.5)  # the client's loop does not run
        return bench.RequestResult(ok=True, start=starts[-1], ttft=0.0, e2e=0.0,
                                   output_tokens=req.output_len)  # fmt: skip

    monkeypatch.setattr(bench, "_openai_one", one)
    requests = [bench.BenchRequest((5, 6), 1) for _ in range(n)]
    _, duration = asyncio.run(
        bench.run_load("127.0.0.1:1", requests, request_rate=rate, max_concurrency=None,
                       seed=seed, api="openai", model="m")
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    due = np.concatenate([[0.0], np.cumsum([rng.exponential(1 / rate) for _ in range(n - 1)])])
    late = np.array(starts) - starts[0] - due
    assert due[-1] > 1.0 and late[-1] < 0.15, late  # a gap after each wake-up: ~0.45 s
    assert duration < due[-1] + 0.15  # and no sleep after the last start


def test_unknown_mode_is_rejected(capsys) -> None:
    with pytest.raises(SystemExit):
        _load_bench().main(["--modes", "continuous,turbo"])
    with pytest.raises(SystemExit):  # offline has no arrival times for the long prompt
        _load_bench().main(["--modes", "offline", "--workload", "interference"])
    assert "--modes offline is invalid with --workload interference" in capsys.readouterr().err


def test_shared_prefix_conversations_extend_one_system_prompt() -> None:
    bench = _load_bench()
    convs = bench.shared_prefix_conversations(
        3, turns=3, system_len=20, suffix_len=((2, 5, 1.0),), output_len=((4, 4, 1.0),),
        vocab=50, seed=0,
    )  # fmt: skip
    system = convs[0][0].prompt_ids[:20]
    for conv in convs:
        assert [t.tag for t in conv] == ["turn1", "turn2", "turn3"]
        assert conv[0].prompt_ids[:20] == system
        for prev, turn in itertools.pairwise(conv):
            assert turn.prompt_ids[: len(prev.prompt_ids)] == prev.prompt_ids
            assert len(turn.prompt_ids) - len(prev.prompt_ids) in range(4 + 2, 4 + 6)
    assert len({c[0].prompt_ids for c in convs}) == 3  # distinct user messages


def test_interference_stats_take_the_gaps_that_overlap_the_long_prefill() -> None:
    bench = _load_bench()
    # two streams with a gap every 10 ms, one of 100 ms ending at t = 1.1 (the prefill)
    streams = []
    for _ in range(2):
        ends = (
            [0.1 + 0.01 * i for i in range(1, 91)]
            + [1.1 + 0.1]
            + [1.2 + 0.01 * i for i in range(1, 11)]
        )
        gaps = [0.01] * 90 + [0.1] + [0.01] * 10
        streams.append(bench.RequestResult(ok=True, start=0.0, ttft=0.1, e2e=1.3,
                                           output_tokens=102, itl=gaps, itl_at=ends,
                                           tag="stream"))  # fmt: skip
    long = bench.RequestResult(ok=True, start=1.05, ttft=0.12, e2e=0.2, output_tokens=2, tag="long")
    stats = bench.interference([*streams, long])
    assert stats["during_prefill_itl_ms"]["max"] == pytest.approx(100.0)
    assert stats["stream_itl_ms"]["p50"] == pytest.approx(10.0)
    assert stats["long_ttft_ms"] == pytest.approx(120.0)
    assert stats["p99_during_prefill_vs_median"] > 5


def test_shared_prefix_workload_with_and_without_prefix_caching(tmp_path: Path) -> None:
    bench = _load_bench()
    out = tmp_path / "bench.jsonl"
    rc = bench.main(
        [
            "--model-set", "d_model=64", "--model-set", "n_layers=2", "--model-set", "d_ff=128",
            "--model-set", "head_dim=16", "--model-set", "vocab_size=320",
            "--model-set", "max_seq_len=128", "--workload", "shared-prefix",
            "--modes", "continuous,no-prefix-cache", "--num-requests", "4", "--turns", "2",
            "--system-len", "40", "--input-len", "2:6", "--output-len", "3:5",
            "--max-seqs", "4", "--page-size", "8", "--max-num-batched-tokens", "32",
            "--apis", "grpc,openai", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    modes = {x["mode"]: x for x in lines if x.get("api") == "grpc"}
    on, off = modes["continuous"], modes["no-prefix-cache"]
    # the same conversations over the OpenAI API: every turn completes, and the cached
    # prompt tokens it reports (usage.prompt_tokens_details) count as hits
    http = [x for x in lines if x.get("api") == "openai"]
    assert len(http) == 2 and all(x["completed"] == 8 and x["failed"] == 0 for x in http)
    assert {x["mode"]: x for x in http}["continuous"]["prefix_hit_rate"] > 0.4
    assert on["completed"] == off["completed"] == 8
    assert off["prefix_hit_rate"] == 0.0
    assert on["prefix_hit_rate"] > 0.4  # 40 shared tokens of ~50 in turn 1; more in turn 2
    assert set(on["ttft_ms_by_tag"]) == {"turn1", "turn2"} and on["peak_running"] >= 1
    assert any(x.get("comparison") == "prefix_cache_off_vs_on" for x in lines)


def test_each_api_pass_starts_from_an_empty_prefix_cache(tmp_path: Path) -> None:
    """The second API's pass must not find the first's prompts cached: that would flatter it."""
    bench = _load_bench()
    out = tmp_path / "bench.jsonl"
    rc = bench.main(
        [
            "--model-set", "d_model=64", "--model-set", "n_layers=2", "--model-set", "d_ff=128",
            "--model-set", "head_dim=16", "--model-set", "vocab_size=320",
            "--model-set", "max_seq_len=64", "--modes", "continuous", "--num-requests", "4",
            "--input-len", "20:30", "--output-len", "2:4", "--max-seqs", "4",
            "--page-size", "8", "--apis", "grpc,openai", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    passes = {x["api"]: x for x in lines if x.get("mode") == "continuous"}
    assert set(passes) == {"grpc", "openai"}
    # random prompts share no page with each other: every hit would be a replayed prompt
    for line in passes.values():
        assert line["completed"] == 4 and line["prefix_hit_rate"] == 0.0
