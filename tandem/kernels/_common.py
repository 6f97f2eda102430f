"""Helpers shared by the Pallas kernels: block-size choice, shape rules, compiler params.

The shape rules are the Triton (GPU) lowering's: every tile a kernel loads must have
power-of-two dimensions, and `tl.dot` needs at least 16 rows/columns. The CPU tests run
the kernels in interpret mode under the *same* rules, so what passes here is what would
be compiled on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

MIN_TILE = 16  # smallest tile edge tl.dot accepts
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: no inf - inf = NaN
M_INIT = float(jnp.finfo(jnp.float32).min)  # running max before any key is seen
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pick_block(length: int, preferred: int) -> int | None:
    """Largest power of two <= `preferred` that divides `length` and is >= 16, else None.

    Lets a short or odd-sized sequence (48, 96, 384 ...) use a smaller tile instead of
    falling back to the reference.
    """
    block = 1 << (max(preferred, 1).bit_length() - 1)  # round preferred down to a power of 2
    while block >= MIN_TILE:
        if length % block == 0:
            return block
        block //= 2
    return None


def head_dim_reason(head_dim: int) -> str | None:
    if not is_pow2(head_dim) or head_dim < MIN_TILE:
        return f"head_dim={head_dim} is not a power of two >= {MIN_TILE}"
    return None


def dtype_reason(*dtypes: jnp.dtype) -> str | None:
    for dt in dtypes:
        if jnp.dtype(dt) not in SUPPORTED_DTYPES:
            return f"dtype={jnp.dtype(dt).name} (supported: float32, bfloat16, float16)"
    if len({jnp.dtype(dt) for dt in dtypes}) != 1:
        return f"mixed dtypes {[jnp.dtype(dt).name for dt in dtypes]}"
    return None


def compiler_params(num_warps: int, num_stages: int) -> plgpu.CompilerParams | None:
    """Triton launch parameters; None on TPU, where they would not apply."""
    if jax.default_backend() == "tpu":
        return None
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T with fp32 accumulation: [M, C] x [N, C] -> [M, N] (a tl.dot with trans_b)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b with fp32 accumulation: [M, C] x [C, N] -> [M, N]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a.T @ b with fp32 accumulation: [C, M] x [C, N] -> [M, N] (a tl.dot with trans_a)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
