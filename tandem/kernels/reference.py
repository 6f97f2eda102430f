"""Pure-JAX attention: the specification every kernel in this package is tested against.

These are also what runs on CPU in production (XLA fuses them well there). Shapes use the
letters from WORKSPACE.md: B batch (rows), T query length, S key length, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a fully masked row gives zeros instead of NaN


def attention_reference(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    *,
    segment_ids: jax.Array | None = None,  # [B, T] int32; tokens attend within a segment
    scale: float | None = None,
) -> jax.Array:  # [B, T, N, H]
    """Causal grouped-query attention over a full sequence (training forward and prefill).

    With `segment_ids`, a token attends only to earlier tokens of the same segment, so
    packed documents never see each other.
    """
    batch, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    qg = q.reshape(batch, seq, n_kv, n_heads // n_kv, head_dim)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale  # [B, K, G, T, S]
    mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None]  # [1, T, S]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, T, S]
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )  # [B, T, K, G, H]
    return out.reshape(batch, seq, n_heads, head_dim).astype(q.dtype)


def attention_shape_reason(
    q_shape: tuple[int, ...],  # [B, T, N, H]
    kv_shape: tuple[int, ...],  # [B, T, K, H]
) -> str | None:
    """Why q and k/v shapes break `attention_reference`'s contract (None when they keep it):
    the check every attention kernel makes before its own tile rules."""
    if len(q_shape) != 4 or len(kv_shape) != 4:
        return f"rank: q {q_shape} must be [B, T, N, H] and k/v {kv_shape} [B, T, K, H]"
    batch, seq, n_heads, head_dim = q_shape
    if (batch, seq, head_dim) != (kv_shape[0], kv_shape[1], kv_shape[3]):
        return f"q {q_shape} and k/v {kv_shape} disagree on B, T or H"
    n_kv = kv_shape[2]
    if n_kv == 0 or n_heads % n_kv:
        return f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}"
    return None
