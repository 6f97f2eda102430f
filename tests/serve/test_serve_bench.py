"""benchmarks/serve_bench.py runs end to end on a tiny model and reports vLLM's metric set."""

from __future__ import annotations

import importlib
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
        ]
    )  # fmt: skip
    assert rc == 0
    modes = {x["mode"]: x for x in map(json.loads, out.read_text().splitlines()) if "mode" in x}
    offline = modes["offline"]
    assert offline["backend"] == "tandem-in-process"
    assert offline["completed"] == 10 and offline["failed"] == 0
    assert offline["total_output_tokens"] == modes["continuous"]["total_output_tokens"]
    assert offline["ttft_ms"]["p50"] > 0 and offline["tpot_ms"]["p50"] > 0


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(SystemExit):
        _load_bench().main(["--modes", "continuous,turbo"])
