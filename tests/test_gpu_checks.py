"""scripts/gpu_checks.sh without a GPU: its stages, their order and arguments, and the time
budget, with a stand-in for python3 that records its calls; and benchmarks/step_bench.py
(its stage 4) on a tiny model, with a long prompt's chunk steps too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_checks.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  *"import jax, flax"*) echo "jax 0.11.2 flax 0.12.10 [CudaDevice(id=0)]" ;;
  *serve_bench.py*) echo '{"mode": "continuous", "tpot_ms": {"p50": 10.0}}' > "$OUT/serve_bench.jsonl" ;;
  *-m\\ pip*|*save_random_hf_llama*) ;;
  *) echo '{"bench": "fake"}' ;;
esac
"""


def _run(tmp_path: Path, budget_s: int) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), CALLS=str(calls))
    env["BUDGET_S"] = str(budget_s)
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    return done, calls.read_text().splitlines(), out


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_every_stage_runs_in_order_with_its_figures(tmp_path: Path) -> None:
    done, calls, out = _run(tmp_path, budget_s=570)
    assert done.returncode == 0, done.stderr
    assert calls[0].startswith("-m pip install") and "--no-deps" in calls[0]
    assert "--target /tmp/site ." in calls[0]  # tandem from the checkout, no dependencies
    stages = [
        "benchmarks/train_bench.py --presets llama3-1b",
        "-m pytest tests/kernels -m gpu",
        "benchmarks/serve_bench.py --bundle /tmp/b1b --hf-compare",
        "benchmarks/step_bench.py --bundle /tmp/b1b",
        "benchmarks/paged_bench.py --impl pallas",
    ]
    positions = [next(i for i, c in enumerate(calls) if c.startswith(s)) for s in stages]
    assert positions == sorted(positions)
    step = next(c for c in calls if c.startswith("benchmarks/step_bench.py"))
    assert f"--serve-jsonl {out}/serve_bench.jsonl" in step
    for name in ("versions.txt", "train_bench.jsonl", "gpu_tests.log", "serve_bench.jsonl",
                 "step_bench.jsonl", "paged_bench.jsonl"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "skipped.txt").exists()


def test_stages_past_the_budget_are_skipped_and_said_so(tmp_path: Path) -> None:
    done, calls, out = _run(tmp_path, budget_s=20)  # under the 30 s a stage needs
    assert done.returncode == 0, done.stderr
    assert not any("bench.py" in c or "pytest" in c for c in calls)
    assert len((out / "skipped.txt").read_text().splitlines()) == 5


def test_step_bench_reports_the_device_share_of_the_tpot(tmp_path: Path, capsys) -> None:
    from tandem.benchmarks import step_bench

    serve = tmp_path / "serve.jsonl"
    serve.write_text(
        json.dumps({"mode": "static", "tpot_ms": {"p50": 99.0}})
        + "\n"
        + json.dumps({"mode": "continuous", "tpot_ms": {"p50": 50.0}})
        + "\n"
    )
    assert step_bench.serve_tpot_p50_ms(serve) == 50.0
    args = ["--model-set", "d_model=64", "--model-set", "n_layers=2", "--model-set", "d_ff=128",
            "--slots", "4", "--max-len", "64", "--context", "16", "--iters", "3",
            "--serve-jsonl", str(serve)]  # fmt: skip
    assert step_bench.main(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["bench"] == "step" and line["slots"] == 4 and line["serve_tpot_p50_ms"] == 50.0
    assert 8 <= line["context_mean"] <= 24
    assert line["device_share_of_tpot"] == line["step_ms_median"] / 50.0
    assert line["tokens_per_s"] == 4 / (line["step_ms_median"] / 1e3)


def test_step_bench_times_a_long_prompts_chunks_by_where_they_start(capsys) -> None:
    from tandem.benchmarks import step_bench

    args = ["--model-set", "d_model=64", "--model-set", "n_layers=2", "--model-set", "d_ff=128",
            "--slots", "2", "--max-len", "64", "--context", "8", "--iters", "3",
            "--long-prompt", "40", "--max-num-batched-tokens", "8", "--band", "16"]  # fmt: skip
    assert step_bench.main(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the two decodes leave 6 of the 8 tokens: chunks start at 0, 6, ..., 36
    assert line["chunk_steps"] == 7 and line["max_num_batched_tokens"] == 8
    assert sorted(line["chunk_step_ms_by_start"]) == ["0", "16", "32"]
    assert line["prefill_ms"] >= line["slowest_chunk_step_ms"]
    assert line["slowest_chunk_step_ms"] >= max(line["chunk_step_ms_by_start"].values())
    assert line["decode_step_ms"] > 0
