"""Next-token cross-entropy through the LM head without the [B, T, V] f32 logits.

The plain loss asks the head for f32 logits ([B, T, V]: 8.4 GB for `llama3-1b` at 8 x 2048
tokens and a 128k vocabulary) and differentiates through them, so the backward runs the
head's two GEMMs against an f32 cotangent of the same size: on an H100 the largest item
of a train step after attention (docs/benchmarks.md). `chunked_cross_entropy` walks the
vocabulary in chunks instead (Levanter's blockwise cross-entropy, MaxText's vocabulary
tiling): per chunk one bf16 GEMM with f32 accumulation, a running log-sum-exp and the
target's logit picked out, so at most one [B, T, c] f32 chunk is alive. The backward is a
`custom_vjp` that recomputes each chunk's logits from the saved log-sum-exp, forms
dz = g (softmax - onehot) in f32, rounds it to the compute dtype, and runs dx += dz W_c^T
and dW_c = x^T dz as bf16 GEMMs with f32 accumulation.

The chunks are strided, chunk j = vocabulary columns {j, j + n, j + 2n, ...} (a
[D, V] -> [D, c, n] reshape): the contiguous column blocks the mesh splits the vocabulary
into stay whole inside every chunk, so on a `tensor`-sharded head each device computes
its columns of every chunk and only [B, T] maxima and sums cross devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_VOCAB_CHUNK = 8192  # llama3's 128,256 -> 16 chunks of 8,016
_MASKED = -1e30  # finite: a padded column's exp underflows to 0, never inf - inf


def vocab_chunks(vocab: int, chunk: int) -> tuple[int, int]:
    """(n, c): n = ceil(V / chunk) chunks of c = ceil(V / n) columns; n * c - V < n
    columns of padding."""
    if chunk < 1:
        raise ValueError(f"vocab chunk {chunk} must be >= 1")
    n = -(-vocab // chunk)
    return n, -(-vocab // n)


def chunked_cross_entropy(
    x: jax.Array,  # [B, T, D] final-normed hidden states, compute dtype
    head: jax.Array,  # [D, V] output projection, compute dtype
    targets: jax.Array,  # [B, T] int32
    *,
    chunk: int = DEFAULT_VOCAB_CHUNK,
) -> jax.Array:  # [B, T] float32: logsumexp(x W) - (x W)[target]
    """`optax.softmax_cross_entropy_with_integer_labels(x @ head, targets)` with f32
    logits never materialized beyond one vocabulary chunk (see the module docstring)."""
    d_model, vocab = head.shape
    n, width = vocab_chunks(vocab, chunk)
    padded = jnp.pad(head, ((0, 0), (0, n * width - vocab)))  # [D, n * c]
    w = padded.reshape(d_model, width, n).transpose(2, 0, 1)  # [n, D, c]: chunk j = cols j::n
    return _cross_entropy(x, w, targets.astype(jnp.int32), vocab)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_entropy(x, w, targets, vocab: int):
    return _forward(x, w, targets, vocab)[0]


def _column(targets: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Each target's chunk (t mod n) and column within it (t div n)."""
    return targets % n, targets // n


def _logits(x: jax.Array, w_j: jax.Array, j: jax.Array, n: int, vocab: int) -> jax.Array:
    """Chunk j's logits [B, T, c] in f32; the padding columns (vocab id >= V) masked."""
    z = jnp.einsum("btd,dc->btc", x, w_j, preferred_element_type=jnp.float32)
    ids = jnp.arange(w_j.shape[-1]) * n + j  # [c] vocabulary id of each column
    return jnp.where(ids < vocab, z, _MASKED)


def _is_target(targets: jax.Array, j: jax.Array, n: int, width: int) -> jax.Array:
    """[B, T, c] one-hot of each target inside chunk j (all False when it is elsewhere)."""
    chunk_of, column = _column(targets, n)
    return (chunk_of == j)[..., None] & (jnp.arange(width) == column[..., None])


def _forward(x, w, targets, vocab: int):
    n, _, width = w.shape

    def body(carry, inputs):
        m, s, target_logit = carry  # [B, T] f32 each
        j, w_j = inputs
        z = _logits(x, w_j, j, n, vocab)  # [B, T, c]
        m_next = jnp.maximum(m, z.max(axis=-1))
        s = s * jnp.exp(m - m_next) + jnp.exp(z - m_next[..., None]).sum(axis=-1)
        target_logit += jnp.where(_is_target(targets, j, n, width), z, 0.0).sum(axis=-1)
        return (m_next, s, target_logit), None

    shape = targets.shape
    init = (
        jnp.full(shape, _MASKED, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape, jnp.float32),
    )
    (m, s, target_logit), _ = jax.lax.scan(body, init, (jnp.arange(n), w))
    lse = m + jnp.log(s)  # [B, T]
    return lse - target_logit, (x, w, targets, lse)


def _backward(vocab: int, residuals, g):  # g: [B, T] f32 cotangent of the loss
    x, w, targets, lse = residuals
    n, _, width = w.shape

    def body(dx, inputs):
        j, w_j = inputs
        probs = jnp.exp(_logits(x, w_j, j, n, vocab) - lse[..., None])  # [B, T, c]
        dz = g[..., None] * (probs - _is_target(targets, j, n, width))  # f32
        dz = dz.astype(x.dtype)  # the two GEMMs below in the compute dtype, f32 accumulation
        dx = dx + jnp.einsum("btc,dc->btd", dz, w_j, preferred_element_type=jnp.float32)
        dw_j = jnp.einsum("btd,btc->dc", x, dz, preferred_element_type=jnp.float32)
        return dx, dw_j.astype(w.dtype)

    dx, dw = jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (jnp.arange(n), w))
    return dx.astype(x.dtype), dw, None


_cross_entropy.defvjp(_forward, _backward)
