"""Test-wide setup: 8 simulated CPU devices (set before jax initialises its backends)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need an accelerator and `tpu` tests a TPU; elsewhere they are skipped,
    not failed."""
    backend = jax.default_backend()
    needs = {"gpu": backend in ("gpu", "tpu"), "tpu": backend == "tpu"}
    for item in items:
        for marker, available in needs.items():
            if item.get_closest_marker(marker) and not available:
                reason = f"needs a {marker.upper()} backend (run through the device tool)"
                item.add_marker(pytest.mark.skip(reason=reason))
