"""Decode attention over the paged KV cache on CPU, in C++ (cpu_decode_attention.cc), called
through XLA's FFI.

Why a native kernel: XLA's CPU backend can only gather (copy) a row's pages before it
attends over them, at 4-5 GB/s inside a serving step, and decode attention is most of that
step's time; the C++ kernel reads each page where it lies, as vLLM's CPU attention does
(docs/benchmarks.md, "decode attention in C++ on CPU"). Prompt chunks stay in XLA: they reuse
each page across many queries, where XLA's GEMMs win.

The source is built on first use with the machine's C++ compiler (`$CXX`, else `c++`,
`g++` or `clang++`) against the FFI headers jaxlib ships, for this CPU (`-march=native`),
into a cache directory (`$TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem` or
`~/.cache/tandem`) under a name keyed by everything the binary depends on, so a changed
source, jaxlib, compiler or CPU builds anew. Without a compiler, or if the build fails,
`available()` logs why once and returns False, and the XLA path runs instead: the same
results, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode_attention.cc")
TARGET = "tandem_cpu_decode_attention"  # the FFI target's name
_SYMBOL = "TandemCpuDecodeAttention"  # the handler's symbol in the library
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_loading = threading.Lock()  # two threads tracing at once build and register once


class BuildError(RuntimeError):
    """The kernel could not be built or loaded; the message says why."""


def cache_dir() -> Path:
    """Where built libraries are kept (see the module docstring)."""
    if explicit := os.environ.get("TANDEM_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tandem"


def find_compiler() -> str | None:
    """`$CXX`, else the first of c++ / g++ / clang++ on PATH."""
    if explicit := os.environ.get("CXX"):
        return explicit
    return next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), where Linux tells them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def build(compiler: str, directory: Path) -> Path:
    """The built library's path, building it into `directory` unless it is already there.
    BuildError with the compiler's own message when that fails."""
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"C++ compiler {compiler!r} does not run: {e}") from e
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__, compiler, version, " ".join(_FLAGS)):
        key.update(part if isinstance(part, bytes) else part.encode())
    key.update(f"{platform.machine()} {_cpu_flags()}".encode())
    library = directory / f"cpu_decode_attention-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load a
    # half-written file.
    fd, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
    os.close(fd)
    include = jax.ffi.include_dir()
    command = [compiler, *_FLAGS, "-isystem", include, str(SOURCE), "-o", partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise BuildError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
        os.chmod(partial, 0o755)  # mkstemp's 0600 would keep others sharing the directory out
        os.replace(partial, library)
    except subprocess.SubprocessError as e:
        raise BuildError(f"{' '.join(command)}: {e}") from e
    finally:
        Path(partial).unlink(missing_ok=True)
    return library


def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA: `load()` once per
    process."""
    with _loading:
        return _load_once()


@functools.cache
def _load_once() -> bool:
    return load()


def load() -> bool:
    """Builds (unless cached), loads and registers the kernel; False, with a warning that
    says why, when it cannot."""
    compiler = find_compiler()
    try:
        if compiler is None:
            raise BuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
        library = ctypes.cdll.LoadLibrary(str(build(compiler, cache_dir())))
        handler = jax.ffi.pycapsule(getattr(library, _SYMBOL))
        jax.ffi.register_ffi_target(TARGET, handler, platform="cpu")
    except (BuildError, OSError) as e:
        logger.warning(
            "native CPU decode attention unavailable, decode rows run in XLA (slower): %s", e
        )
        return False
    return True


def paged_decode_attention(
    q: jax.Array,  # [R, N, H] one query token per row
    k_pages: jax.Array,  # [K, P, Ps, H] float32
    v_pages: jax.Array,  # [K, P, Ps, H] float32
    page_indices: jax.Array,  # [R, Pr] int32
    lengths: jax.Array,  # [R] int32: positions each row attends to (0: none, zeros out)
    *,
    sm_scale: float,
) -> jax.Array:  # [R, N, H] float32
    """Row r's queries attend to its first `lengths[r]` positions. A page index outside
    the pool or a length past the table is an error at run time, never a read out of
    bounds. RuntimeError when the kernel is not `available()` (the dispatcher asks first
    and runs XLA's path instead)."""
    if not available():
        raise RuntimeError("the native CPU decode attention could not be built (logged why)")
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32),
        k_pages,
        v_pages,
        page_indices.astype(jnp.int32),
        lengths.astype(jnp.int32),
        scale=np.float32(sm_scale),
    )
