"""What changes a row's logits before the sampler: logit_bias, min_tokens and the
presence / frequency / repetition penalties (vLLM v1's order: bias and min_tokens, then
penalties; temperature, min_p, top-k and top-p follow in tandem/serve/sampling.py).

Penalties need each row's token history. Rather than send the prompt and output ids from
the host on every step (vLLM builds padded [rows, len] tensors per step), the engine keeps
a device-resident *token-id pool* beside the paged KV cache: [P, Ps] int32, written in the
step at the same `slot_mapping` as the K/V, so every cached position remembers its token.
A row's history is then the pool gathered through its page table, masked by its kv_len,
with its prompt length (host-known, [Rb] int32) splitting prompt from output. This stays
correct wherever the K/V does: a prefix-cached page holds the same tokens by construction
(its hash chains its tokens), and a preempted request's recompute rewrites its positions.

Everything here sits behind a `jax.lax.cond` on "some row asked", so a step that uses none
of it costs a scatter of T token ids into the pool (always done: a later request may reuse
these pages through the prefix cache) and the small per-row inputs' transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tandem.serve.sampling import MAX_LOGIT_BIAS, MAX_MIN_TOKENS_STOP_IDS
from tandem.serve.scheduler import Request

_NEG_INF = -1e30  # as the sampler's: finite, so temperature and softmax stay NaN-free


class ProcessorInputs(NamedTuple):
    """Per-row inputs of one step, padded to Rb rows (numpy on the host). Padding values
    (penalty 0 / 0 / 1, id -1) do nothing."""

    prompt_lens: np.ndarray  # [Rb] int32: positions before this are the prompt
    presence: np.ndarray  # [Rb] float32
    frequency: np.ndarray  # [Rb] float32
    repetition: np.ndarray  # [Rb] float32
    bias_ids: np.ndarray  # [Rb, MAX_LOGIT_BIAS] int32, -1 = none
    bias_values: np.ndarray  # [Rb, MAX_LOGIT_BIAS] float32
    banned_ids: np.ndarray  # [Rb, S] int32: stop ids held off by min_tokens, -1 = none


def banned_width(num_model_stop_ids: int) -> int:
    """S: the model's stop ids plus a request's own (capped by SamplingParams)."""
    return num_model_stop_ids + MAX_MIN_TOKENS_STOP_IDS


def processor_inputs(requests: Sequence[Request], num_rows: int, banned: int) -> ProcessorInputs:
    """The plan rows' inputs, padded to `num_rows`; `banned` is S (`banned_width`)."""
    prompt_lens = np.zeros(num_rows, np.int32)
    presence = np.zeros(num_rows, np.float32)
    frequency = np.zeros(num_rows, np.float32)
    repetition = np.ones(num_rows, np.float32)
    bias_ids = np.full((num_rows, MAX_LOGIT_BIAS), -1, np.int32)
    bias_values = np.zeros((num_rows, MAX_LOGIT_BIAS), np.float32)
    banned_ids = np.full((num_rows, banned), -1, np.int32)
    for r, req in enumerate(requests):
        s = req.sampling
        if s.penalized:
            prompt_lens[r] = req.num_prompt_tokens
            presence[r] = s.presence_penalty
            frequency[r] = s.frequency_penalty
            repetition[r] = s.repetition_penalty
        if s.logit_bias:
            n = len(s.logit_bias)
            bias_ids[r, :n], bias_values[r, :n] = zip(*s.logit_bias, strict=True)
        # outputs before the one this step samples, those in flight included
        if req.sampled_output_index < s.min_tokens and req.stop_token_ids:
            ids = sorted(req.stop_token_ids)
            banned_ids[r, : len(ids)] = ids
    return ProcessorInputs(
        prompt_lens, presence, frequency, repetition, bias_ids, bias_values, banned_ids
    )


def write_token_ids(
    pool: jax.Array,  # [P, Ps] int32
    tokens: jax.Array,  # [T] int32
    slot_mapping: jax.Array,  # [T] int32: page * Ps + offset; -1 = padding
) -> jax.Array:  # [P, Ps]
    """Records the step's tokens at their cache slots (in place when the pool is donated)."""
    pages, page_size = pool.shape
    capacity = pages * page_size
    # -1 must not wrap around to the last slot: out of bounds, where mode="drop" drops it
    slots = jnp.where(slot_mapping >= 0, slot_mapping, capacity)  # [T]
    flat = pool.reshape(capacity).at[slots].set(tokens, mode="drop")  # [P * Ps]
    return flat.reshape(pages, page_size)


def token_counts(
    pool: jax.Array,  # [P, Ps] int32
    page_indices: jax.Array,  # [R, W] int32
    kv_lens: jax.Array,  # [R] int32: the history is positions [0, kv_len)
    prompt_lens: jax.Array,  # [R] int32
    vocab: int,
) -> tuple[jax.Array, jax.Array]:  # [R, V] bool, [R, V] int32
    """(ids seen in the prompt, count of each id in the output) per row. The token being
    sampled sits at kv_len, so it is not history yet."""
    rows, width = page_indices.shape
    history = pool[page_indices].reshape(rows, width * pool.shape[1])  # [R, W * Ps]
    pos = jnp.arange(history.shape[1])[None, :]  # [1, W * Ps]
    valid = pos < kv_lens[:, None]  # [R, W * Ps]
    in_prompt = valid & (pos < prompt_lens[:, None])
    in_output = valid & ~in_prompt
    row = jnp.arange(rows)[:, None]  # [R, 1]
    # masked positions point out of bounds and are dropped
    prompt_ids = jnp.where(in_prompt, history, vocab)
    output_ids = jnp.where(in_output, history, vocab)
    seen = jnp.zeros((rows, vocab), bool).at[row, prompt_ids].set(True, mode="drop")
    counts = jnp.zeros((rows, vocab), jnp.int32).at[row, output_ids].add(1, mode="drop")
    return seen, counts


def apply_penalties(
    logits: jax.Array,  # [R, V] float32
    prompt_seen: jax.Array,  # [R, V] bool
    output_counts: jax.Array,  # [R, V] int32
    presence: jax.Array,  # [R] float32
    frequency: jax.Array,  # [R] float32
    repetition: jax.Array,  # [R] float32
) -> jax.Array:  # [R, V]
    """vLLM's `apply_penalties`: repetition (CTRL / HF style) over prompt and output, then
    frequency and presence over the output only."""
    in_output = output_counts > 0  # [R, V]
    rep = jnp.where(prompt_seen | in_output, repetition[:, None], 1.0)  # [R, V]
    logits = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency[:, None] * output_counts
    return logits - presence[:, None] * in_output


def add_at(
    logits: jax.Array,  # [R, V] float32
    ids: jax.Array,  # [R, M] int32, -1 = none
    values: jax.Array,  # [R, M] float32
) -> jax.Array:  # [R, V]
    """logits[r, ids[r, m]] += values[r, m] (entries with id -1 dropped)."""
    rows, vocab = logits.shape
    ids = jnp.where(ids >= 0, ids, vocab)
    return logits.at[jnp.arange(rows)[:, None], ids].add(values, mode="drop")


def process_logits(
    logits: jax.Array,  # [R, V] float32, the model's
    pool: jax.Array,  # [P, Ps] int32, this step's tokens already written
    page_indices: jax.Array,  # [R, W] int32
    kv_lens: jax.Array,  # [R] int32
    x: ProcessorInputs,
) -> jax.Array:  # [R, V] float32: what the sampler draws from
    """logit_bias and min_tokens, then the penalties, each skipped (cond) when no row uses it."""
    logits = logits.astype(jnp.float32)
    rows, vocab = logits.shape
    logits = jax.lax.cond(
        jnp.any(x.bias_ids >= 0),
        lambda lg: add_at(lg, x.bias_ids, x.bias_values),
        lambda lg: lg,
        logits,
    )
    banned = x.banned_ids  # min_tokens: the stop ids to -inf (a set, so not added)
    logits = jax.lax.cond(
        jnp.any(banned >= 0),
        lambda lg: lg.at[jnp.arange(rows)[:, None], jnp.where(banned >= 0, banned, vocab)].set(
            _NEG_INF, mode="drop"
        ),
        lambda lg: lg,
        logits,
    )
    penalized = (x.presence != 0) | (x.frequency != 0) | (x.repetition != 1)  # [R]

    def penalize(lg: jax.Array) -> jax.Array:
        seen, counts = token_counts(pool, page_indices, kv_lens, x.prompt_lens, vocab)
        return apply_penalties(lg, seen, counts, x.presence, x.frequency, x.repetition)

    return jax.lax.cond(jnp.any(penalized), penalize, lambda lg: lg, logits)
