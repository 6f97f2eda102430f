"""The C++ CPU decode attention: the CPU path with it equals the paged reference (every
row layout, GQA groups, head sizes that are and are not multiples of 8, a shared prefix),
reads nothing it should not, rejects a bad page table instead of reading it,
is what `auto` runs on CPU, and a failed build leaves the XLA path running."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem import kernels
from tandem.kernels import cpu_decode_attention
from tandem.kernels.bucketed_reference import ragged_paged_attention_blocked
from tandem.kernels.paged_reference import ragged_paged_attention_reference
from tandem.kernels.testing import paged_step, poison_unseen

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_decode_attention.available(),
    reason="the kernel runs on the CPU backend, once a C++ compiler has built it",
)

_reference = jax.jit(ragged_paged_attention_reference)
_native = jax.jit(lambda *step: ragged_paged_attention_blocked(*step, native_decode=True))


def _rows(page_size: int) -> list[tuple[int, int]]:
    """Decode rows of length 1, a page boundary and one past it, long and short, beside
    prompt chunks (on a cached prefix and fresh) and an idle row."""
    ps = page_size
    return [
        (1, 1), (1, ps), (1, ps + 1), (3, 2 * ps), (ps + 3, 3 * ps + 5), (19, 19),
        (0, 0), (1, 70), (1, 9 * ps + 7), (1, 2),
    ]  # fmt: skip


def _close(out: jax.Array, want: jax.Array) -> None:
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "head_dim", "page_size"),
    [(4, 2, 64, 16), (4, 2, 64, 64), (8, 8, 128, 16), (14, 2, 80, 64), (4, 1, 20, 8),
     (6, 2, 32, 128)],
    ids=lambda x: str(x),
)  # fmt: skip
def test_decode_rows_in_cpp_equal_the_reference(
    n_heads: int, n_kv: int, head_dim: int, page_size: int
) -> None:
    """Beside prompt chunks, with NaN in every page no row owns, in each table entry past
    a row's pages and in the slots past each row's length: a use of them would show as
    NaN."""
    shape = dict(n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, page_size=page_size)
    step = paged_step(5, _rows(page_size), **shape, dtype=jnp.float32)
    need = [-(-int(n) // page_size) for n in np.asarray(step.kv_lens)[: int(step.num_rows)]]
    _close(_native(*poison_unseen(step, need, stale_slots=True)), _reference(*step))


@pytest.mark.parametrize("shared", [2, 9])
def test_decode_rows_sharing_a_prefix_equal_the_reference(shared: int) -> None:
    """Rows whose tables start with the same pages (a prefix cached once), of different
    lengths, beside a prompt chunk over the same prefix."""
    ps = 32
    rows = [(1, shared * ps + 1 + 5 * i) for i in range(20)] + [(40, shared * ps + 40)]
    step = paged_step(6, rows, n_heads=4, n_kv=2, head_dim=64, page_size=ps, dtype=jnp.float32)
    table = np.array(step.page_indices)
    table[: len(rows), :shared] = table[0, :shared]
    step = step._replace(page_indices=jnp.asarray(table))
    _close(_native(*step), _reference(*step))


def _decode_call(table: list[list[int]], lengths: list[int]) -> jax.Array:
    pool = jnp.ones((2, 4, 8, 16), jnp.float32)  # [K, P, Ps, H]
    q = jnp.ones((len(lengths), 4, 16), jnp.float32)
    out = cpu_decode_attention.paged_decode_attention(
        q, pool, pool, jnp.asarray(table, jnp.int32), jnp.asarray(lengths, jnp.int32),
        sm_scale=0.25,
    )  # fmt: skip
    return out.block_until_ready()


def test_a_bad_table_is_an_error_not_a_read() -> None:
    assert float(_decode_call([[1, 2], [3, 0]], [16, 3]).sum()) > 0
    with pytest.raises(Exception, match="row 1 has page 4, outside the pool of 4"):
        _decode_call([[1, 2], [4, 0]], [16, 3])
    with pytest.raises(Exception, match="row 0 needs page-table columns past Pr"):
        _decode_call([[1, 2], [3, 0]], [17, 3])


def test_auto_on_cpu_runs_the_cpp_kernel_for_a_float32_cache() -> None:
    step = paged_step(7, _rows(16), n_heads=4, n_kv=2, head_dim=32, page_size=16, dtype=jnp.float32)

    def hlo(impl: str, pool_dtype: jnp.dtype) -> str:
        pools = (step.k_pages.astype(pool_dtype), step.v_pages.astype(pool_dtype))
        args = (step.q, *pools, *step[3:])
        return jax.jit(lambda *a: kernels.paged_attention(*a, impl=impl)).lower(*args).as_text()

    assert cpu_decode_attention.TARGET in hlo("auto", jnp.float32)
    assert cpu_decode_attention.TARGET not in hlo("reference", jnp.float32)
    assert cpu_decode_attention.TARGET not in hlo("auto", jnp.bfloat16)  # XLA's own path
    got = jax.jit(lambda *a: kernels.paged_attention(*a))(*step)
    _close(got, _reference(*step))


def _failing_compiler(tmp_path: Path) -> str:
    """A `c++` that answers --version and fails every build."""
    path = tmp_path / "fake-c++"
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "fake 1.0"; exit 0; fi\n'
        'echo "fatal: no space left" >&2; exit 1\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_failed_build_names_the_compiler_and_its_message(tmp_path: Path) -> None:
    with pytest.raises(cpu_decode_attention.BuildError, match="does not run"):
        cpu_decode_attention.build(str(tmp_path / "missing-c++"), tmp_path / "cache")
    with pytest.raises(cpu_decode_attention.BuildError, match="fatal: no space left"):
        cpu_decode_attention.build(_failing_compiler(tmp_path), tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # no half-written library left


def test_without_a_compiler_the_xla_path_runs_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "missing-c++"))
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert not cpu_decode_attention.load()
    assert "missing-c++" in caplog.text and "decode rows run in XLA" in caplog.text


def test_a_build_is_kept_and_reused(tmp_path: Path) -> None:
    compiler = cpu_decode_attention.find_compiler()
    assert compiler is not None
    first = cpu_decode_attention.build(compiler, tmp_path)
    made = first.stat().st_mtime_ns
    assert cpu_decode_attention.build(compiler, tmp_path) == first
    assert first.stat().st_mtime_ns == made and list(tmp_path.iterdir()) == [first]
