"""Causal (segment-masked) grouped-query attention for training and prefill on TPU: jax's
Pallas TPU (Mosaic) splash attention, `jax.experimental.pallas.ops.tpu.splash_attention`,
behind `attention_reference`'s signature.

Used as MaxText uses it (layers/attention_op.py, `tpu_flash_attention`):
  * q, k, v go from tandem's [B, T, N, H] to splash's head-major [N, T, H] per batch row
    (the kernel is unbatched; `jax.vmap` over B adds a grid dimension);
  * the mask is static: a `CausalMask((T, T))` per query head, preprocessed on the host
    into block-sparsity tables when the call is traced (blocks above the diagonal are
    never visited); packed documents are `SegmentIds(q=seg, kv=seg)` of the row, and-ed
    with it inside the kernel;
  * GQA without repeating K/V: k and v keep their K heads and splash's MHA index maps send
    query head n to kv head n // G (forward and both backward kernels);
  * splash does not scale the scores, so q is multiplied by H^-0.5 first;
  * the backward is splash's own (a dQ kernel and a dK/dV kernel, no fused variant),
    block sizes equal to the forward's.

Block sizes: splash computes scores in tiles of whole 128-lane vregs, so T must be a
multiple of 128; the dispatcher takes the largest of 512 (MaxText's default), 256, 128
that divides T. In interpret mode it runs with `interpret=True`, as jax's own splash
tests do off TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from tandem.kernels.reference import attention_reference, attention_shape_reason

__all__ = [
    "BLOCK_SIZES",
    "attention_reference",
    "pick_block",
    "splash_attention",
    "unsupported_reason",
]

BLOCK_SIZES = (512, 256, 128)  # tried in order; splash's score tiles are whole 128 lanes
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def pick_block(seq: int) -> int | None:
    """The largest of BLOCK_SIZES dividing T, or None."""
    return next((b for b in BLOCK_SIZES if seq % b == 0), None)


def unsupported_reason(
    q_shape: tuple[int, ...],  # [B, T, N, H]
    kv_shape: tuple[int, ...],  # [B, T, K, H]
    dtypes: tuple[jnp.dtype, ...],
    block: int | None,
) -> str | None:
    """Why splash cannot take these shapes (None when it can)."""
    if reason := attention_shape_reason(q_shape, kv_shape):
        return reason
    _, seq, _, head_dim = q_shape
    names = [jnp.dtype(dt) for dt in dtypes]
    if any(dt not in _DTYPES for dt in names) or len(set(names)) != 1:
        return f"dtypes {[dt.name for dt in names]} (supported: all float32 or all bfloat16)"
    if head_dim % 64:
        return f"head_dim={head_dim} is not a multiple of 64"
    if block is None or seq % block or block % 128:
        return f"seq_len T={seq} is not a multiple of a block of {BLOCK_SIZES}"
    return None


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def splash_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    *,
    segment_ids: jax.Array | None = None,  # [B, T]
    block: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, T, N, H]
    """`attention_reference` (causal, optional segments, GQA, scale H^-0.5) computed by
    splash attention; differentiable through splash's backward kernels.

    Args:
      block: the query and key block of every kernel (forward, dQ, dK/dV); None picks
        `pick_block(T)`.
      interpret: run the kernels with the Pallas interpreter (CPU tests).
    """
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} differ")
    seq = q.shape[1] if q.ndim == 4 else 0
    block = pick_block(seq) if block is None else block
    reason = unsupported_reason(q.shape, k.shape, (q.dtype, k.dtype, v.dtype), block)
    if reason:
        raise ValueError(f"splash_attention: {reason}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(
            f"segment_ids has shape {segment_ids.shape}, expected [B, T]={q.shape[:2]}"
        )
    n_heads, head_dim = q.shape[2], q.shape[3]
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    mask = masks.MultiHeadMask([masks.CausalMask((seq, seq))] * n_heads)
    kernel = splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    scaled = (q * jnp.asarray(head_dim**-0.5, q.dtype)).swapaxes(1, 2)  # [B, N, T, H]
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, K, T, H]
    if segment_ids is None:
        out = jax.vmap(kernel)(scaled, k, v)
    else:
        seg = segment_ids.astype(jnp.int32)
        out = jax.vmap(kernel)(scaled, k, v, splash.SegmentIds(q=seg, kv=seg))
    return out.swapaxes(1, 2)  # [B, N, T, H] -> [B, T, N, H]
