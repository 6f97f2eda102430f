"""benchmarks/vllm_compare.py: vLLM serves the bundle's weights in its dtype; each pass
starts on a quiet host and on prompts no server has seen; a server's CPU time counts every
process of its group."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flax import nnx

from tandem.benchmarks.vllm_compare import (
    pass_seed,
    process_group_cpu_s,
    vllm_dtype,
    wait_for_quiet_host,
)
from tandem.config import load_config
from tandem.model.bundle import flat_params, write_bundle
from tandem.model.config import ModelConfig
from tandem.model.quant import quantize_tensors
from tandem.model.tokenizer import Tokenizer
from tandem.model.transformer import Transformer

needs_proc_stat = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat")
TINY = ["vocab_size=260", "d_model=32", "n_layers=1", "head_dim=16", "d_ff=64"]


def _bundle(path: Path, overrides: list[str]) -> Path:
    cfg = load_config(ModelConfig, "tiny", [*TINY, *overrides])
    model = Transformer(load_config(ModelConfig, "tiny", TINY), rngs=nnx.Rngs(0))
    tensors = flat_params(nnx.state(model, nnx.Param))
    quantization = None
    if cfg.quantization == "int8":
        tensors, quantization = quantize_tensors(tensors), "int8"
    return write_bundle(path, cfg, Tokenizer.byte(), tensors, source={}, quantization=quantization)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vllm_serves_the_bundle_in_its_dtype(tmp_path, dtype):
    bundle = _bundle(tmp_path / "b", [f"dtype={dtype}", f"param_dtype={dtype}"])
    assert vllm_dtype(bundle) == dtype


def test_a_quantized_bundle_is_refused_naming_the_field(tmp_path):
    bundle = _bundle(tmp_path / "q", ["quantization=int8"])
    with pytest.raises(SystemExit, match="quantization='int8'"):
        vllm_dtype(bundle)


@needs_proc_stat
def test_waits_while_another_process_keeps_a_core_busy() -> None:
    # what vLLM's worker does for a second after its last request (busy-polling)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        waited = wait_for_quiet_host(busy_cores=0.5, window_s=0.2, limit_s=1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert waited >= 1.0


@needs_proc_stat
def test_returns_after_one_window_once_the_host_is_below_the_bar() -> None:
    # a bar above every core the host has is met by any window
    waited = wait_for_quiet_host(busy_cores=(os.cpu_count() or 1) + 1, window_s=0.2, limit_s=5.0)
    assert waited < 1.0


def _own_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@needs_proc_stat
def test_a_servers_cpu_time_counts_every_process_of_its_group() -> None:
    # a leader in its own group with a busy child, as vLLM's API server and engine core
    spin = "import time\nt = time.time()\nwhile time.time() - t < 20: pass"
    code = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {spin!r}])\n{spin}"
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        time.sleep(2.0)
        group = process_group_cpu_s(leader.pid)
        own = _own_cpu_s(leader.pid)
    finally:
        os.killpg(leader.pid, 9)
        leader.wait()
    assert group is not None and group > own + 0.2  # the child's time is in it
    time.sleep(0.2)  # the kill lands; the child is a zombie until init reaps it: not counted
    assert process_group_cpu_s(leader.pid) is None  # no process left in the group


def test_every_pass_gets_prompts_no_server_has_seen() -> None:
    """tandem's second API runs on the same server right after its first: on the first's
    prompts it would hit their cached prefixes. vLLM's pass shares the first API's."""
    grid = [(i, j, rep, a) for i in range(10) for j in range(10) for rep in range(10)
            for a in range(2)]  # fmt: skip
    seeds = [pass_seed(7, *key) for key in grid]
    warm_ups = {7 + 1000 + i for i in range(10)}
    assert len(set(seeds)) == len(grid) and warm_ups.isdisjoint(seeds)
    assert pass_seed(7, 1, 2, 3, 0) == 7 + 100 + 20 + 3  # the recorded runs' seeds
    with pytest.raises(SystemExit, match="repeats"):
        pass_seed(7, 0, 0, 10, 0)
