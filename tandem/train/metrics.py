"""Training metrics: throughput, MFU, and the three sinks (console, JSONL, TensorBoard).

MFU = model FLOPs per token (from the config, `ModelConfig.flops_per_token`) x tokens/s,
divided by the peak FLOP/s of the devices in use. The peak comes from a table of dense
bf16 numbers for known GPU/TPU kinds, and is *measured* on CPU (a jitted matmul in the
run's compute dtype), because CPU peaks vary too much for a table. On CPU the simulated
devices of one process share the host's cores, so the CPU peak is per process, not per
device.

Only the primary process writes files; every process computes the same numbers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# Dense (no sparsity) peak TFLOP/s per device for bf16 matmuls, from vendor spec sheets.
# Matched as substrings of `device.device_kind`, lower-cased, first match wins.
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("gb200", 2500.0),
    ("b200", 2250.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM
    ("h800", 989.0),
    ("gh200", 989.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l4", 121.0),
    ("a10g", 125.0),
    ("a10", 125.0),
    ("v100", 125.0),
    ("tpu v6", 918.0),  # Trillium
    ("tpu7x", 2307.0),
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
    ("tpu v3", 123.0),
    ("tpu v2", 45.0),
)


def table_peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for key, tflops in PEAK_TFLOPS_BF16:
        if key in kind:
            return tflops * 1e12
    return None


def measure_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of one n x n x n matmul on the default device.

    bf16 inputs accumulate in f32 (`preferred_element_type`), which is what the model's
    einsums get from XLA on CPU and is ~2x faster there than a bf16-output dot.
    """
    dt = jnp.dtype(dtype)
    a = jnp.ones((n, n), dt)
    b = jnp.ones((n, n), dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(compute_dtype: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """Total peak FLOP/s of all devices in the run, and where the number came from."""
    dev = jax.devices()[0]
    if override_tflops > 0:
        return override_tflops * 1e12 * jax.device_count(), "config"
    if dev.platform == "cpu":
        per_process = measure_matmul_flops(compute_dtype)
        return per_process * jax.process_count(), f"measured cpu matmul ({compute_dtype})"
    per_device = table_peak_flops(dev.device_kind)
    if per_device is None:
        log.warning("no peak FLOP/s known for %r; measuring a matmul instead", dev.device_kind)
        return measure_matmul_flops("bfloat16", n=8192) * jax.device_count(), "measured matmul"
    return per_device * jax.device_count(), f"table bf16 ({dev.device_kind})"


class Throughput:
    """tokens/s, step time and MFU over the steps since the last call to `update`."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak
        self._t = time.perf_counter()

    def reset(self) -> None:
        self._t = time.perf_counter()

    def update(self, steps: int) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        self._t = now
        tps = steps * self.tokens_per_step / dt
        return {
            "step_time": dt / max(steps, 1),
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / self.peak if self.peak > 0 else 0.0,
        }


class MetricsWriter:
    """metrics.jsonl (one object per logged step) + TensorBoard + a rich progress bar."""

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        primary: bool,
        tensorboard: bool,
        progress: bool,
    ):
        self.primary = primary
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._progress = None
        if not primary:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )
            self._progress.start()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the restored step (they get re-logged), so
        the file reads as one uninterrupted run."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a kill -9
                continue
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if not self.primary:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record["step"])
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(
                        f"tandem/train/{k}" if not k.startswith("eval") else k, v, step
                    )
        if self._progress is not None:
            info = f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  mfu {record['mfu']:.1%}"
            self._progress.update(self._task, completed=step, info=info)
        else:
            log.info(
                "step %d loss %.4f tok/s %.0f mfu %.2f%%",
                step,
                record["loss"],
                record["tokens_per_s"],
                100 * record["mfu"],
            )

    def close(self) -> None:
        if not self.primary:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
