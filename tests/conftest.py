"""Test-wide setup: 8 simulated CPU devices (set before jax initialises its backends)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need an accelerator; on a CPU-only machine they are skipped, not failed."""
    if jax.default_backend() in ("gpu", "tpu"):
        return
    skip = pytest.mark.skip(reason="needs a GPU/TPU backend (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
