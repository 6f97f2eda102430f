"""Helpers for the training tests: a model far smaller than `tiny`, in-process and
subprocess runs, and reading metrics.jsonl.

tests/conftest.py (lead-owned) sets 8 simulated CPU devices before jax is imported; the
setdefault calls below only matter when this directory is run on its own without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.xla_flags import on_devices

REPO = Path(__file__).resolve().parents[2]

# ~0.2 M params; byte tokenizer (259 ids) in a 264-row embedding (divisible by the mesh).
SMALL = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=16",
    "model.d_ff=128",
    "model.vocab_size=264",
    "seq_len=64",
    "batch_size=8",
    "tokenizer=byte",
    "progress=false",
    "tensorboard=false",
    "peak_tflops=1.0",
    "warmup_steps=5",
    "compile_cache_dir=''",  # no process-wide persistent cache in the pytest process
]


def run_inprocess(run_dir: Path, *overrides: str) -> dict:
    from tandem.config import load_config
    from tandem.train.config import TrainConfig
    from tandem.train.loop import run

    cfg = load_config(TrainConfig, "tiny", [*SMALL, f"run_dir={run_dir}", *overrides])
    return run(cfg)


def spawn(
    run_dir: Path, *overrides: str, devices: int = 8, env: dict | None = None, log_name: str = "log"
) -> subprocess.Popen:
    """`python -m tandem.train tiny <SMALL> ...` in a fresh interpreter with `devices` CPU
    devices."""
    args = ["tiny", *SMALL, *overrides]
    return spawn_cli(run_dir, args, devices=devices, env=env, log_name=log_name)


def spawn_cli(
    run_dir: Path,
    args: list[str],
    *,
    devices: int,
    env: dict | None = None,
    log_name: str = "log",
    entry: tuple[str, ...] = ("-m", "tandem.train"),
) -> subprocess.Popen:
    """`python -m tandem.train ARGS run_dir=RUN_DIR` (or `python ENTRY ...`) in a fresh
    interpreter, on `devices` CPU devices (and the test run's other XLA flags)."""
    e = dict(os.environ)
    e.update(
        {
            "XLA_FLAGS": on_devices(devices),
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(REPO),
        }
    )
    e.update(env or {})
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(run_dir).parent / f"{Path(run_dir).name}.{log_name}.txt", "w")  # noqa: SIM115
    cmd = [sys.executable, *entry, *args, f"run_dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT)


def read_log(run_dir: Path, log_name: str = "log") -> str:
    return (Path(run_dir).parent / f"{Path(run_dir).name}.{log_name}.txt").read_text()


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by kill -9
            out.append(json.loads(line))
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
