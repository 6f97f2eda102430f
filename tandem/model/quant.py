"""INT8 weight-only quantization: per-output-channel symmetric scales beside the weights.

Each matrix `W` is stored as `int8 q` plus a float32 `scale` per output channel, with
`W ≈ q * scale`. Because the scale is per *output* channel it commutes with the
contraction, so the model computes `einsum(x, q.astype(dtype)) * scale`: the int8->bf16
convert is the matmul's operand producer (XLA fuses it where the backend allows) and no
dequantized copy of the weight is ever materialised as a param.

Norms stay in the param dtype; the embedding table is quantized per vocabulary row, which
serves both the lookup (row * scale) and the tied output projection (logit * scale).

qwix (the field's JAX quantization library) was tried first (qwix 0.1.8,
`quantize_model(model, PtqProvider(int8 weight rule), ...)` on this Transformer): it swaps
every param for a `WithAux` wrapper, which the embedding lookup (`jnp.take`) rejects, and
its quantized layout is qwix's own rather than the bundle's. These forty lines keep the
one model definition and a bundle any tool can read (plain int8 + float32 tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Quantization = Literal["none", "int8"]

# tensor name -> axes of the stored tensor that the matmul contracts over
CONTRACTED_AXES: dict[str, tuple[int, ...]] = {
    "embed": (1,),
    "lm_head": (0,),
    "layers.wq": (1,),
    "layers.wk": (1,),
    "layers.wv": (1,),
    "layers.wo": (1, 2),
    "layers.w_gate": (1,),
    "layers.w_up": (1,),
    "layers.w_down": (1,),
}
SCALE_SUFFIX = "_scale"


def quantize_int8(weight: np.ndarray, contracted: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: returns (q, scale) with the contracted axes
    removed from `scale` (the shape that broadcasts against the matmul's output)."""
    w = np.asarray(weight, dtype=np.float32)
    amax = np.max(np.abs(w), axis=contracted, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, np.squeeze(scale, axis=contracted)


def dequantize(q: np.ndarray, scale: np.ndarray, contracted: tuple[int, ...]) -> np.ndarray:
    return q.astype(np.float32) * np.expand_dims(scale, contracted)


def quantize_tensors(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Streams (name, array) pairs, replacing each matrix by its int8 values and scales."""
    for name, array in tensors:
        if name in CONTRACTED_AXES:
            q, scale = quantize_int8(np.asarray(array), CONTRACTED_AXES[name])
            yield name, q
            yield name + SCALE_SUFFIX, scale
        else:
            yield name, array


def scaled_matmul(equation: str, x, weight, scale, dtype):
    """einsum(x, weight) in `dtype`, times the per-output-channel scale when quantized.

    On CPU the product is asked for in float32 and rounded to `dtype` after: XLA's CPU
    compiler runs a bfloat16 dot with a bfloat16 result slower than the float32 one, and
    a bfloat16 dot with a float32 result on the CPU's bfloat16 dot instructions (on an
    AVX512-BF16 CPU a bfloat16 model then serves faster than before and than in float32,
    its logits as close to a float32 run's as before: docs/benchmarks.md). GPUs and TPUs
    accumulate a bfloat16 dot in float32 either way; there the dot keeps its `dtype`
    result. For float32 models nothing changes."""
    accumulate = jnp.float32 if jax.default_backend() == "cpu" else None
    y = jnp.einsum(equation, x, weight.astype(dtype), preferred_element_type=accumulate)
    y = y.astype(dtype)
    return y if scale is None else y * scale.astype(dtype)
