"""Test-wide setup: 8 simulated CPU devices (set before jax initialises its backends), and
one persistent compilation cache for the run.

Many tests build an engine or a model of the same shapes (several per module, and the
command-line tests' subprocesses, which inherit the variable): jax's persistent cache
lets each compile once per run. It lives in a new directory per run, so no run reads
another's executables.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="tandem-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

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
