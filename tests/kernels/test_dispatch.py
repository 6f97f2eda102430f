"""The dispatcher: impl selection per backend, fallbacks with one warning, and the model's
training forward and serving step giving the same answer through the kernels as through
the reference."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import get_args

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from tandem import kernels
from tandem.kernels import bucketed_reference, dispatch
from tandem.kernels.paged_reference import ragged_paged_attention_reference
from tandem.kernels.reference import attention_reference
from tandem.kernels.testing import packed_segment_ids, paged_step, prefill_inputs

ON_CPU = jax.default_backend() == "cpu"
_reference = jax.jit(attention_reference)
_paged_reference = jax.jit(ragged_paged_attention_reference)
_PAGED_ROWS = [(1, 20), (1, 1), (9, 30), (0, 0), (1, 47)]  # decode, a chunk, an idle row


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the warn-once memory empty."""
    monkeypatch.setattr(dispatch, "_warned", set())


def _uses_pallas(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def _fallback_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "falling back to the XLA reference" in r.getMessage()]


def test_impls_are_the_contract() -> None:
    assert get_args(kernels.AttentionImpl) == ("auto", "reference", "pallas", "pallas_interpret")


def test_unknown_impl_raises() -> None:
    step = paged_step(0, [(1, 3)], n_heads=2, n_kv=1, head_dim=16, page_size=16, dtype=jnp.float32)
    with pytest.raises(ValueError, match="attention_impl='triton'"):
        kernels.paged_attention(*step, impl="triton")
    q, k, v = prefill_inputs(0, 1, 16, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="is invalid: allowed"):
        kernels.attention(q, k, v, impl="flash")


@pytest.mark.skipif(not ON_CPU, reason="compiled pallas is allowed off CPU")
def test_compiled_pallas_on_cpu_raises_with_the_fix() -> None:
    q, k, v = prefill_inputs(0, 1, 16, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="'pallas_interpret'.*'reference'"):
        kernels.attention(q, k, v, impl="pallas")


@pytest.mark.skipif(not ON_CPU, reason="auto picks the kernel off CPU")
def test_auto_on_cpu_is_the_reference(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = prefill_inputs(1, 1, 32, 4, 2, 16, jnp.float32)
    assert not _uses_pallas(lambda *a: kernels.attention(*a, impl="auto"), q, k, v)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(kernels.attention)(q, k, v)), np.asarray(_reference(q, k, v))
    )
    assert not _fallback_records(caplog), "choosing the reference on CPU is not a fallback"


def test_interpret_runs_the_prefill_kernel() -> None:
    q, k, v = prefill_inputs(2, 2, 48, 4, 2, 32, jnp.float32)  # T=48: 16-wide tiles
    seg = packed_segment_ids(2, 2, 48)

    def run(q, k, v, seg):
        return kernels.attention(q, k, v, segment_ids=seg, impl="pallas_interpret")

    assert _uses_pallas(run, q, k, v, seg)
    np.testing.assert_allclose(
        np.asarray(jax.jit(run)(q, k, v, seg)),
        np.asarray(_reference(q, k, v, segment_ids=seg)),
        atol=2e-5,
        rtol=2e-5,
    )


def test_per_slot_buckets_grow_four_per_octave_past_512() -> None:
    sizes = bucketed_reference.per_slot_length_buckets(8192)
    assert sizes[:9] == (64, 128, 192, 256, 320, 384, 448, 512, 640)
    assert sizes[-1] == 8192 and list(sizes) == sorted(set(sizes))
    assert all(b / a <= 1.25 for a, b in itertools.pairwise(sizes[7:]))
    assert bucketed_reference.per_slot_length_buckets(100) == (64, 100)


def test_prefill_fallback_warns_once_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tandem.kernels.dispatch"):
        for seq in (8, 8, 24):  # two calls with one reason, then a second reason
            q, k, v = prefill_inputs(4, 1, seq, 2, 1, 16, jnp.float32)
            out = jax.jit(lambda q, k, v: kernels.attention(q, k, v, impl="pallas_interpret"))(
                q, k, v
            )  # a fresh jit: traced (and dispatched) every time
            np.testing.assert_array_equal(np.asarray(out), np.asarray(_reference(q, k, v)))
    messages = [r.getMessage() for r in _fallback_records(caplog)]
    assert len(messages) == 2, messages
    assert "T=8" in messages[0] and "T=24" in messages[1]


def _paged(impl: str):
    return jax.jit(lambda *step: kernels.paged_attention(*step, impl=impl))


@pytest.mark.skipif(not ON_CPU, reason="auto picks the kernel off CPU")
def test_paged_auto_on_cpu_is_the_blocked_reference(caplog: pytest.LogCaptureFixture) -> None:
    step = paged_step(
        7, _PAGED_ROWS, n_heads=4, n_kv=2, head_dim=32, page_size=16, dtype=jnp.float32
    )
    assert not _uses_pallas(lambda *a: kernels.paged_attention(*a), *step)
    with pytest.raises(ValueError, match="pallas_interpret"):
        kernels.paged_attention(*step, impl="pallas")
    np.testing.assert_allclose(
        np.asarray(_paged("auto")(*step)), np.asarray(_paged_reference(*step)), atol=2e-5, rtol=2e-5
    )
    assert not _fallback_records(caplog)


@pytest.mark.skipif(not ON_CPU, reason="the CPU path's dtype handling")
def test_paged_auto_on_cpu_runs_in_bfloat16() -> None:
    """A bf16 model served on CPU: decode rows and prompt chunks (XLA's CPU dot has no
    bf16 x bf16 -> f32 for the chunk blocks' shapes; the path computes in f32)."""
    step = paged_step(
        3, _PAGED_ROWS, n_heads=4, n_kv=2, head_dim=32, page_size=16, dtype=jnp.bfloat16
    )
    got = np.asarray(_paged("auto")(*step), np.float32)
    want = np.asarray(_paged_reference(*step), np.float32)
    np.testing.assert_allclose(got, want, atol=3e-2, rtol=3e-2)


def test_interpret_runs_the_paged_kernel() -> None:
    step = paged_step(
        8, _PAGED_ROWS, n_heads=8, n_kv=2, head_dim=32, page_size=8, dtype=jnp.float32
    )
    assert _uses_pallas(lambda *a: kernels.paged_attention(*a, impl="pallas_interpret"), *step)
    np.testing.assert_allclose(
        np.asarray(_paged("pallas_interpret")(*step)),
        np.asarray(_paged_reference(*step)),
        atol=2e-5,
        rtol=2e-5,
    )


@pytest.mark.parametrize(
    ("shape", "reason"),
    [({"head_dim": 24}, "head_dim=24"), ({"n_heads": 2, "n_kv": 2, "head_dim": 8}, "head_dim=8")],
    ids=["head_dim-24", "head_dim-8"],
)
def test_paged_fallback_warns_once_and_is_exact(
    shape: dict, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    dims = {"n_heads": 4, "n_kv": 2, "head_dim": 32} | shape
    step = paged_step(9, _PAGED_ROWS, page_size=16, dtype=jnp.float32, **dims)
    with caplog.at_level(logging.WARNING, logger="tandem.kernels.dispatch"):
        assert not _uses_pallas(
            lambda *a: kernels.paged_attention(*a, impl="pallas_interpret"), *step
        )  # trace 1
        out = _paged("pallas_interpret")(*step)  # trace 2: still one warning
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(_paged_reference(*step)), atol=2e-5, rtol=2e-5
    )
    records = _fallback_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert reason in records[0].getMessage()


# --- the model's paths through the dispatcher ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_models():
    """One tiny model twice: same params, attention_impl reference vs pallas_interpret."""
    nnx = pytest.importorskip("flax.nnx")
    from tandem.model.config import ModelConfig
    from tandem.model.transformer import Transformer

    cfg = ModelConfig(
        vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        d_ff=128, max_seq_len=64, attention_impl="reference",
    )  # fmt: skip
    ref = Transformer(cfg, rngs=nnx.Rngs(0))
    ker = nnx.clone(ref)  # same params; only the attention impl differs
    ker.cfg = dataclasses.replace(cfg, attention_impl="pallas_interpret")
    return cfg, ref, ker


def test_model_step_kernel_path_matches_reference(tiny_models) -> None:
    """A serving step over a paged cache holding earlier tokens' K/V (random here): a
    decode row with no history, one three pages deep, a prompt chunk after cached
    tokens, padding tokens and a padding row. Same logits, same cache writes."""
    from tandem.model.transformer import StepMetadata, init_paged_cache

    cfg, ref, ker = tiny_models
    page_size, num_pages = 8, 12
    rng = np.random.default_rng(5)
    cache = jax.tree.map(
        lambda pool: jnp.asarray(rng.standard_normal(pool.shape, np.float32)),
        init_paged_cache(cfg, num_pages, page_size),
    )
    pages = [[4, 0, 0], [7, 2, 10], [5, 9, 0], [0, 0, 0]]  # the last row is padding
    positions = [0, 20, *range(9, 15)]  # [T] of the rows in use: 1 + 1 + 6 tokens
    rows = [0, 1, 2, 2, 2, 2, 2, 2]
    slots = [
        pages[r][p // page_size] * page_size + p % page_size
        for r, p in zip(rows, positions, strict=True)
    ]
    pad = 4
    meta = StepMetadata(
        slot_mapping=jnp.asarray(slots + [-1] * pad, jnp.int32),
        kv_lens=jnp.asarray([1, 21, 15, 0], jnp.int32),
        page_indices=jnp.asarray(pages, jnp.int32),
        cu_q_lens=jnp.asarray([0, 1, 2, 8, 8], jnp.int32),
        num_rows=jnp.asarray(3, jnp.int32),
    )
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, len(slots) + pad), jnp.int32)
    positions = jnp.asarray(positions + [0] * pad, jnp.int32)
    logits_at = jnp.asarray([0, 1, 7, 0], jnp.int32)
    args = (tokens, positions, cache, meta, logits_at)
    assert _uses_pallas(lambda *a: ker.step(*a)[0], *args)
    logits_ref, cache_ref = jax.jit(ref.step)(*args)
    logits_ker, cache_ker = jax.jit(ker.step)(*args)
    np.testing.assert_allclose(
        np.asarray(logits_ker)[:3], np.asarray(logits_ref)[:3], atol=1e-4, rtol=1e-4
    )
    for a, b in zip(jax.tree.leaves(cache_ker), jax.tree.leaves(cache_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_model_forward_kernel_path_matches_reference(tiny_models) -> None:
    _, ref, ker = tiny_models
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 64, (2, 32)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), tokens.shape)
    logits_ref = ref(tokens, positions)
    logits_ker = ker(tokens, positions)
    np.testing.assert_allclose(np.asarray(logits_ker), np.asarray(logits_ref), atol=1e-4, rtol=1e-4)


# --- the choice per backend (TPU: the Mosaic family) ---------------------------------------

_EXPECTED_MODES = {  # (backend, impl) -> (family, interpret) or None (reference) or "raises"
    ("cpu", "auto"): None,
    ("cpu", "reference"): None,
    ("cpu", "pallas"): "raises",
    ("cpu", "pallas_interpret"): ("triton", True),
    ("gpu", "auto"): ("triton", False),
    ("gpu", "reference"): None,
    ("gpu", "pallas"): ("triton", False),
    ("gpu", "pallas_interpret"): ("triton", True),
    ("tpu", "auto"): ("mosaic", False),
    ("tpu", "reference"): None,
    ("tpu", "pallas"): ("mosaic", False),
    ("tpu", "pallas_interpret"): ("mosaic", True),
}


def _pose_as(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    monkeypatch.setattr(dispatch, "_backend", lambda: backend)


@pytest.mark.parametrize(("backend", "impl"), list(_EXPECTED_MODES), ids=lambda x: x)
def test_kernel_mode_per_backend(backend: str, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _pose_as(monkeypatch, backend)
    expected = _EXPECTED_MODES[backend, impl]
    if expected == "raises":
        with pytest.raises(ValueError, match="pallas_interpret"):
            dispatch.kernel_mode(impl)
        return
    mode = dispatch.kernel_mode(impl)
    assert (mode and tuple(mode)) == expected


def _pallas_names(fn, *args) -> set[str]:
    """The names of the Pallas kernels `fn` traces to (splash's start with splash_mha)."""
    names = set()

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                names.add(str(eqn.params["name"]))
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jex_core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return {"splash_mha" if n.startswith("splash_mha") else n for n in names}


_TPU_PAGED_ROWS = [(1, 20), (1, 1), (9, 30), (0, 0), (1, 47), (17, 17)]


def test_tpu_interpret_runs_the_mosaic_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Posing as a TPU, `pallas_interpret` runs splash and the Mosaic paged kernel
    (interpreted on this CPU) and both equal the reference."""
    _pose_as(monkeypatch, "tpu")
    q, k, v = prefill_inputs(2, 2, 256, 4, 2, 64, jnp.float32)
    seg = packed_segment_ids(2, 2, 256)

    def run(q, k, v, seg):
        return kernels.attention(q, k, v, segment_ids=seg, impl="pallas_interpret")

    assert "splash_mha" in str(jax.make_jaxpr(run)(q, k, v, seg))
    np.testing.assert_allclose(
        np.asarray(jax.jit(run)(q, k, v, seg)),
        np.asarray(_reference(q, k, v, segment_ids=seg)),
        atol=2e-5,
        rtol=2e-5,
    )
    step = paged_step(
        8, _TPU_PAGED_ROWS, n_heads=8, n_kv=2, head_dim=128, page_size=16, dtype=jnp.float32
    )
    jaxpr = str(
        jax.make_jaxpr(lambda *a: kernels.paged_attention(*a, impl="pallas_interpret"))(*step)
    )
    assert "tpu_ragged_paged_attention" in jaxpr
    np.testing.assert_allclose(
        np.asarray(_paged("pallas_interpret")(*step)),
        np.asarray(_paged_reference(*step)),
        atol=2e-5,
        rtol=2e-5,
    )


@pytest.mark.parametrize("impl", ["auto", "pallas"])
def test_tpu_compiled_impls_pick_the_mosaic_kernels(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a TPU, `auto` and `pallas` trace to the Mosaic kernels (traced here, not run:
    a compiled Mosaic call needs the chip)."""
    _pose_as(monkeypatch, "tpu")
    q, k, v = prefill_inputs(1, 1, 128, 4, 2, 64, jnp.bfloat16)
    assert _pallas_names(lambda *a: kernels.attention(*a, impl=impl), q, k, v) == {"splash_mha"}
    step = paged_step(
        8, _TPU_PAGED_ROWS, n_heads=4, n_kv=2, head_dim=128, page_size=16, dtype=jnp.bfloat16
    )
    names = _pallas_names(lambda *a: kernels.paged_attention(*a, impl=impl), *step)
    assert names == {"tpu_ragged_paged_attention"}


def test_gpu_auto_picks_the_triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    _pose_as(monkeypatch, "gpu")
    q, k, v = prefill_inputs(1, 1, 128, 4, 2, 64, jnp.bfloat16)
    assert "splash_mha" not in str(jax.make_jaxpr(lambda *a: kernels.attention(*a))(q, k, v))
    assert _uses_pallas(lambda *a: kernels.attention(*a), q, k, v)
    step = paged_step(
        8, _TPU_PAGED_ROWS, n_heads=4, n_kv=2, head_dim=128, page_size=16, dtype=jnp.bfloat16
    )
    names = _pallas_names(lambda *a: kernels.paged_attention(*a), *step)
    assert names == {"ragged_paged_attention"}


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("prefill", "T=96"), ("paged", "head_dim=64")],
    ids=["splash-T96", "paged-H64"],
)
def test_tpu_fallback_warns_once_and_is_exact(
    kind: str, reason: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _pose_as(monkeypatch, "tpu")
    if kind == "prefill":
        args = prefill_inputs(4, 1, 96, 2, 1, 64, jnp.float32)
        run, ref = (lambda *a: kernels.attention(*a, impl="pallas")), _reference
    else:
        args = paged_step(9, _TPU_PAGED_ROWS, n_heads=4, n_kv=2, head_dim=64, page_size=16,
                          dtype=jnp.float32)  # fmt: skip
        run, ref = (lambda *a: kernels.paged_attention(*a, impl="pallas")), _paged_reference
    with caplog.at_level(logging.WARNING, logger="tandem.kernels.dispatch"):
        assert not _uses_pallas(run, *args)  # trace 1
        out = jax.jit(run)(*args)  # trace 2: still one warning
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref(*args)), atol=2e-5, rtol=2e-5)
    records = _fallback_records(caplog)
    assert len(records) == 1 and reason in records[0].getMessage()


def test_model_train_step_lowers_for_tpu_with_mosaic_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny model's loss and grads with attention_impl=pallas, posing as a TPU, exported
    for the TPU platform: the scanned layer holds splash's forward, dQ and dK/dV kernels."""
    nnx = pytest.importorskip("flax.nnx")
    from jax import export

    from tandem.model.config import ModelConfig
    from tandem.model.transformer import Transformer

    _pose_as(monkeypatch, "tpu")
    cfg = ModelConfig(
        vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
        d_ff=128, max_seq_len=128, dtype="bfloat16", attention_impl="pallas",
    )  # fmt: skip
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params, tokens, segment_ids):
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model(tokens, positions, segment_ids).astype(jnp.float32).mean()

    ids = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    exported = export.export(jax.jit(jax.grad(loss)), platforms=["tpu"])(params, ids, ids)
    assert exported.mlir_module().count("@tpu_custom_call") == 3
