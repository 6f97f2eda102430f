"""benchmarks/vllm_compare.py: each pass starts on a quiet host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.benchmarks.vllm_compare import wait_for_quiet_host

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat")


def test_waits_while_another_process_keeps_a_core_busy() -> None:
    # what vLLM's worker does for a second after its last request (busy-polling)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        waited = wait_for_quiet_host(busy_cores=0.5, window_s=0.2, limit_s=1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert waited >= 1.0


def test_returns_after_one_window_once_the_host_is_below_the_bar() -> None:
    # a bar above every core the host has is met by any window
    waited = wait_for_quiet_host(busy_cores=(os.cpu_count() or 1) + 1, window_s=0.2, limit_s=5.0)
    assert waited < 1.0
