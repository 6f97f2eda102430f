"""The vocabulary-chunked cross-entropy (tandem/model/loss.py) against optax's plain loss on full
logits: values and gradients in f32 (same math, other summation order) and in bf16 (the
backward's GEMMs in bf16); the model's `hidden_states` + `head_weight` path against its
logits; and the compiled memory: no [B, T, V] f32 buffer.

Tolerances. f32: 2e-5 relative (reassociated f32 sums). bf16 inputs: the forward's bf16 x
bf16 products are exact in f32, so values match the f32 loss of the same bf16 numbers to
2e-5; the backward rounds dz = g (softmax - onehot) to bf16 (relative 2^-9) before its
GEMMs, so gradients match to 1 % of their largest entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tandem.model.config import ModelConfig
from tandem.model.loss import chunked_cross_entropy, vocab_chunks
from tandem.model.transformer import Transformer


def _inputs(seed: int, batch: int, seq: int, d_model: int, vocab: int, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, seq, d_model)), dtype)  # [B, T, D]
    head = jnp.asarray(rng.standard_normal((d_model, vocab)) * 0.5, dtype)  # [D, V]
    targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    targets = targets.at[0, :2].set(jnp.asarray([0, vocab - 1]))  # the first and last ids
    cot = jnp.asarray(rng.standard_normal((batch, seq)), jnp.float32)  # d loss / d ce
    return x, head, targets, cot


def _plain(x, head, targets):
    """The spec: f32 logits of the same numbers, optax's cross-entropy."""
    logits = jnp.einsum("btd,dv->btv", x.astype(jnp.float32), head.astype(jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _value_and_grads(loss, x, head, targets, cot):
    def f(x, head):
        ce = loss(x, head, targets)
        return jnp.sum(ce * cot), ce

    (_, ce), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, head)
    return ce, grads


@pytest.mark.parametrize(
    ("vocab", "chunk"),
    [(103, 32), (96, 32), (50, 64), (257, 16)],
    ids=["padded", "exact", "one-chunk", "17-chunks"],
)
def test_f32_equals_plain_loss_and_grads(vocab: int, chunk: int) -> None:
    x, head, targets, cot = _inputs(0, 2, 16, 32, vocab, jnp.float32)
    n, width = vocab_chunks(vocab, chunk)
    assert n * width >= vocab > (n - 1) * width and n * width - vocab < n
    ce, grads = _value_and_grads(
        lambda x, h, t: chunked_cross_entropy(x, h, t, chunk=chunk), x, head, targets, cot
    )
    ce_ref, grads_ref = _value_and_grads(_plain, x, head, targets, cot)
    assert ce.dtype == jnp.float32 and ce.shape == targets.shape
    np.testing.assert_allclose(np.asarray(ce), np.asarray(ce_ref), rtol=2e-5, atol=2e-5)
    for name, g, r in zip(("dx", "dhead"), grads, grads_ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5, err_msg=name)


def test_bf16_matches_the_f32_loss_of_the_same_numbers() -> None:
    x, head, targets, cot = _inputs(1, 2, 32, 64, 1000, jnp.bfloat16)
    ce, grads = _value_and_grads(
        lambda x, h, t: chunked_cross_entropy(x, h, t, chunk=128), x, head, targets, cot
    )
    ce_ref, grads_ref = _value_and_grads(_plain, x, head, targets, cot)
    np.testing.assert_allclose(np.asarray(ce), np.asarray(ce_ref), rtol=2e-5, atol=2e-5)
    for name, g, r in zip(("dx", "dhead"), grads, grads_ref, strict=True):
        assert g.dtype == jnp.bfloat16  # cotangents in the primal's dtype
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        np.testing.assert_allclose(g, r, atol=1e-2 * np.abs(r).max(), rtol=0, err_msg=name)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_hidden_states_and_head_give_its_logits_loss(tied: bool) -> None:
    cfg = ModelConfig(
        vocab_size=200, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        d_ff=128, max_seq_len=32, tie_embeddings=tied, dtype="bfloat16",
    )  # fmt: skip
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 200, (2, 32)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))
    targets = jnp.roll(tokens, -1, axis=1)

    def chunked(params):
        model = nnx.merge(graphdef, params)
        x = model.hidden_states(tokens, positions)
        return chunked_cross_entropy(x, model.head_weight(), targets, chunk=64).mean()

    def plain(params):
        logits = nnx.merge(graphdef, params)(tokens, positions)  # [B, T, V] f32
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = jax.jit(jax.value_and_grad(chunked))(params)
    loss_ref, grads_ref = jax.jit(jax.value_and_grad(plain))(params)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=2e-5)
    for (path, g), r in zip(
        jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_ref), strict=True
    ):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        np.testing.assert_allclose(g, r, atol=2e-2 * np.abs(r).max(), rtol=0, err_msg=str(path))


def test_compiled_loss_holds_no_full_f32_logits() -> None:
    """value_and_grad of the chunked loss compiles without any [B, T, V] f32 buffer and
    with temporaries far below one; the plain loss, the control, needs several."""
    batch, seq, d_model, vocab = 2, 256, 32, 4096
    x, head, targets, _ = _inputs(3, batch, seq, d_model, vocab, jnp.bfloat16)
    full_f32 = batch * seq * vocab * 4  # 8 MiB

    def compiled(loss):
        fn = jax.jit(jax.value_and_grad(lambda x, h: loss(x, h, targets).sum(), argnums=(0, 1)))
        return fn.lower(x, head).compile()

    chunked = compiled(lambda x, h, t: chunked_cross_entropy(x, h, t, chunk=256))
    plain = compiled(
        lambda x, h, t: optax.softmax_cross_entropy_with_integer_labels(
            jnp.einsum("btd,dv->btv", x, h, preferred_element_type=jnp.float32), t
        )
    )
    shape = f"f32[{batch},{seq},{vocab}]"
    assert shape not in chunked.as_text() and shape in plain.as_text()
    chunked_temp = chunked.memory_analysis().temp_size_in_bytes
    plain_temp = plain.memory_analysis().temp_size_in_bytes
    assert chunked_temp < full_f32 / 2 < full_f32 <= plain_temp, (chunked_temp, plain_temp)


def test_bad_chunk_raises() -> None:
    with pytest.raises(ValueError, match="vocab chunk 0"):
        vocab_chunks(100, 0)


def test_tensor_sharded_head_is_never_gathered_whole() -> None:
    """On a (data 2, fsdp 2, tensor 2) mesh with the head's vocabulary split over `tensor`,
    every device computes its own columns of each strided chunk: no collective carries a
    whole chunk's (512) or the whole vocabulary's (4096) columns, and the loss equals the
    unsharded one."""
    import re

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)  # fmt: skip
    x, head, targets, cot = _inputs(4, 8, 16, 64, 4096, jnp.bfloat16)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    sharded = (
        jax.device_put(x, rows),
        jax.device_put(head, NamedSharding(mesh, P("fsdp", "tensor"))),
        jax.device_put(targets, rows),
    )

    def loss(x, head, targets):
        return jnp.sum(chunked_cross_entropy(x, head, targets, chunk=512) * cot)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with jax.set_mesh(mesh):
        hlo = step.lower(*sharded).compile().as_text()
        value, _ = step(*sharded)
    collectives = re.findall(r"= \S+\[([\d,]*)\]\S* (?:all-gather|all-reduce|all-to-all)\(", hlo)
    assert collectives, "the sharded loss communicates"
    dims = {int(d) for shape in collectives for d in shape.split(",") if d}
    assert not dims & {512, 4096}, collectives
    np.testing.assert_allclose(float(value), float(jax.jit(loss)(x, head, targets)), rtol=1e-5)
