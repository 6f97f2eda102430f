"""Test-wide setup: 8 simulated CPU devices (set before jax initialises its backends), a
quick CPU code generator, and one persistent compilation cache for the run.

The tests' models are tiny, so most of a CPU test's time is XLA compiling, not running:
on a CPU-only install the backend's LLVM passes run at optimisation level 0 (the suite
takes about a fifth less time, docs/benchmarks.md; the programs are the same, only their
machine code is less tuned), in the tests' subprocesses too (tests/xla_flags.py).
Benchmarks, the demo and users' runs keep XLA's defaults.

Many tests build an engine or a model of the same shapes (several per module, and the
command-line tests' subprocesses, which inherit the variables): jax's persistent cache
lets each compile once per run. It lives in a new directory per run, so no run reads
another's executables.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        *(
            []  # an accelerator's plugin is installed: its compilers keep their defaults
            if importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu")
            else ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
        ),
    ]
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
