"""The tandem transformer: one Flax NNX definition used for training and serving.

Llama family: token embedding, RMSNorm, RoPE (optionally Llama-3 scaled), grouped-query
attention, SwiGLU MLP, tied or untied output projection; q/k/v projection biases (Qwen2)
and per-head q/k RMSNorm (Qwen3) are config switches. The layers are *stacked*: every
per-layer weight has a leading [L] axis and the forward pass is a `lax.scan` over it, so
compile time does not grow with depth and checkpoints, bundles and HF import share one
layout. A layer is split into `_attention_inputs` (norm, q/k/v, RoPE) and `_layer_output`
(o-projection, MLP); the two modes only differ in how attention is done in between:

  __call__  full causal (segment-masked) attention          -> logits          (training)
  step      K/V written into the paged cache, then paged attention over it: one ragged
            batch of decode rows and prompt chunks         -> logits, PagedKVCache (serving)

Training scans the stacked layers; serving unrolls them instead (what MaxText's unscanned
inference checkpoints are for). The cache is one array per layer, so a layer's K/V write
is an in-place update of a donated buffer that attention then reads directly, and the
serving engine passes each layer's weights as separate arrays (`unstack_layers`, the
`layers=` argument). Inside a scan, or when slicing layer i out of a stacked argument, XLA
copies the cache and weight slices on every step (on CPU they cost more than the rest of
a decode step: docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tandem import kernels
from tandem.model.config import ModelConfig
from tandem.model.quant import CONTRACTED_AXES, SCALE_SUFFIX, scaled_matmul
from tandem.model.sharding import (
    ATTENTION_AXES,
    BATCH,
    EMBED,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LAYERS,
    LENGTH,
    MLP,
    VOCAB,
    constrain,
)

_ACTIVATION = (BATCH, LENGTH, EMBED)


class PagedKVCache(NamedTuple):
    """The serving cache: per layer a pool of P pages of Ps positions (tuples of L), in
    the layout of tandem/kernels/paged_reference.py. Which page holds which sequence's tokens is
    the host's business (tandem/serve/kv_cache.py); `Transformer.step` is told where to write
    (`StepMetadata.slot_mapping`) and what each row reads (`page_indices`)."""

    k: tuple[jax.Array, ...]  # L x [K, P, Ps, H]
    v: tuple[jax.Array, ...]  # L x [K, P, Ps, H]


def init_paged_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> PagedKVCache:
    shape = (cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)  # [K, P, Ps, H]
    dtype = jnp.dtype(dtype or cfg.dtype)
    layers = range(cfg.n_layers)
    return PagedKVCache(
        tuple(jnp.zeros(shape, dtype) for _ in layers),
        tuple(jnp.zeros(shape, dtype) for _ in layers),
    )


class StepMetadata(NamedTuple):
    """Where one ragged step's T tokens (R rows packed row after row) write their K/V and
    what each row attends to: the arguments of `kernels.paged_attention` and
    `kernels.write_pages` (tandem/serve/scheduler.py's `SchedulerOutput` builds them)."""

    slot_mapping: jax.Array  # [T] int32: page * Ps + offset of each token; -1 = padding
    kv_lens: jax.Array  # [R] int32: the row's tokens in the cache, this step's included
    page_indices: jax.Array  # [R, W] int32: the row's page table (0 past its pages)
    cu_q_lens: jax.Array  # [R + 1] int32: row r's tokens are [cu_q_lens[r], cu_q_lens[r + 1])
    num_rows: jax.Array  # [] int32: rows in use; the rest are padding


def rope_frequencies(cfg: ModelConfig) -> jax.Array:  # [H/2]
    """Inverse frequencies, with Llama-3 scaling exactly as transformers computes it."""
    inv_freq = 1.0 / (
        cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim)
    )
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def _rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    angles = positions[..., None].astype(jnp.float32) * rope_frequencies(cfg)  # [B, T, H/2]
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half convention (transformers' Llama), so HF weights import unpermuted."""
    # x: [B, T, N, H]; cos, sin: [B, T, H/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed).astype(x.dtype)


def _param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    cfg: ModelConfig,
    *,
    std: float | None = None,
) -> nnx.Param:
    if cfg.quantization == "int8":  # filled from a bundle, never trained
        return nnx.Param(jnp.zeros(shape, jnp.int8), out_sharding=axes, eager_sharding=False)
    init = jax.nn.initializers.normal(cfg.init_std if std is None else std)
    value = init(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _scale(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> nnx.Param:
    """The per-output-channel scale of quantized matrix `name` (contracted axes dropped)."""
    keep = [i for i in range(len(shape)) if i not in CONTRACTED_AXES[name]]
    return nnx.Param(
        jnp.ones([shape[i] for i in keep], jnp.float32),
        out_sharding=tuple(axes[i] for i in keep),
        eager_sharding=False,
    )


def _ones(shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig) -> nnx.Param:
    value = jnp.ones(shape, jnp.dtype(cfg.param_dtype))
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _zeros(shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig) -> nnx.Param:
    """A bias: zero at init (HF's and MaxText's choice), never quantized."""
    value = jnp.zeros(shape, jnp.dtype(cfg.param_dtype))
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Layers(nnx.Module):
    """All decoder layers' weights, stacked along a leading [L] axis."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, D, N, K, H, F = (
            cfg.n_layers,
            cfg.d_model,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            cfg.d_ff,
        )
        out_std = cfg.init_std / math.sqrt(2 * L)  # residual-branch outputs, GPT-2 style
        self.attn_norm = _ones((L, D), (LAYERS, EMBED), cfg)
        self.wq = _param(rngs, (L, D, N, H), (LAYERS, EMBED, HEADS, HEAD_DIM), cfg)
        self.wk = _param(rngs, (L, D, K, H), (LAYERS, EMBED, KV_HEADS, HEAD_DIM), cfg)
        self.wv = _param(rngs, (L, D, K, H), (LAYERS, EMBED, KV_HEADS, HEAD_DIM), cfg)
        self.wo = _param(rngs, (L, N, H, D), (LAYERS, HEADS, HEAD_DIM, EMBED), cfg, std=out_std)
        self.mlp_norm = _ones((L, D), (LAYERS, EMBED), cfg)
        self.w_gate = _param(rngs, (L, D, F), (LAYERS, EMBED, MLP), cfg)
        self.w_up = _param(rngs, (L, D, F), (LAYERS, EMBED, MLP), cfg)
        self.w_down = _param(rngs, (L, F, D), (LAYERS, MLP, EMBED), cfg, std=out_std)
        if cfg.attention_bias:
            self.q_bias = _zeros((L, N, H), (LAYERS, HEADS, HEAD_DIM), cfg)
            self.k_bias = _zeros((L, K, H), (LAYERS, KV_HEADS, HEAD_DIM), cfg)
            self.v_bias = _zeros((L, K, H), (LAYERS, KV_HEADS, HEAD_DIM), cfg)
        if cfg.qk_norm:
            self.q_norm = _ones((L, H), (LAYERS, HEAD_DIM), cfg)
            self.k_norm = _ones((L, H), (LAYERS, HEAD_DIM), cfg)
        if cfg.quantization == "int8":
            for name in MATRICES:
                weight = getattr(self, name)
                scale = _scale(
                    f"layers.{name}",
                    weight.get_value().shape,
                    weight.get_metadata()["out_sharding"],
                )
                setattr(self, name + SCALE_SUFFIX, scale)

    def stacked(self) -> dict[str, jax.Array]:
        """The raw stacked arrays (scales included when quantized): the layer scan's `xs`."""
        return {
            name: var.get_value() for name, var in vars(self).items() if isinstance(var, nnx.Param)
        }


MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

LayerWeights = Mapping[str, jax.Array]  # one layer's weights: stacked names, [L] axis dropped


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), (VOCAB, EMBED), cfg)
        self.layers = Layers(cfg, rngs=rngs)
        self.final_norm = _ones((cfg.d_model,), (EMBED,), cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), (EMBED, VOCAB), cfg)
        if cfg.quantization == "int8":
            self.embed_scale = _scale("embed", (cfg.vocab_size, cfg.d_model), (VOCAB, EMBED))
            if not cfg.tie_embeddings:
                self.lm_head_scale = _scale(
                    "lm_head", (cfg.d_model, cfg.vocab_size), (EMBED, VOCAB)
                )

    # -- the two modes -----------------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32
        segment_ids: jax.Array | None = None,  # [B, T] int32
    ) -> jax.Array:  # [B, T, V] float32
        """Training forward: causal attention, masked to `segment_ids` when packing."""
        return self.logits(self._trunk(tokens, positions, segment_ids))

    def hidden_states(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32
        segment_ids: jax.Array | None = None,  # [B, T] int32
    ) -> jax.Array:  # [B, T, D] compute dtype
        """The training forward up to the LM head (final norm applied): with `head_weight`
        what `model.loss.chunked_cross_entropy` takes, so the loss never holds [B, T, V]
        f32 logits."""
        x = self._trunk(tokens, positions, segment_ids)
        return _rms_norm(x, self.final_norm.get_value(), self.cfg.norm_eps)

    def _trunk(self, tokens, positions, segment_ids):  # [B, T] -> [B, T, D], before the norm
        cfg = self.cfg
        cos, sin = _rope_tables(cfg, positions)

        def layer(x, p):
            q, k, v = _attention_inputs(cfg, x, p, cos, sin)
            out = _attention(cfg, q, k, v, segment_ids)
            return _layer_output(cfg, x, out, p), None

        x, _ = jax.lax.scan(_remat(cfg, layer), self._embed(tokens), self.layers.stacked())
        return x

    def step(
        self,
        tokens: jax.Array,  # [T] int32, the step's rows packed one after another
        positions: jax.Array,  # [T] int32
        cache: PagedKVCache,  # L x [K, P, Ps, H]
        meta: StepMetadata,
        logits_at: jax.Array,  # [R] int32: the token whose logits each row returns
        layers: Sequence[LayerWeights] | None = None,
    ) -> tuple[jax.Array, PagedKVCache]:  # [R, V] float32
        """One serving step over a ragged batch (`step_hidden`), with logits only for
        `logits_at`, one token per row (the LM head over all T tokens would cost as much as
        a layer)."""
        x, cache = self.step_hidden(tokens, positions, cache, meta, layers)
        return self.logits(jnp.take(x, logits_at, axis=0)[None])[0], cache

    def step_hidden(
        self,
        tokens: jax.Array,  # [T] int32, the step's rows packed one after another
        positions: jax.Array,  # [T] int32
        cache: PagedKVCache,  # L x [K, P, Ps, H]
        meta: StepMetadata,
        layers: Sequence[LayerWeights] | None = None,
    ) -> tuple[jax.Array, PagedKVCache]:  # [T, D]
        """The layers of one serving step: decode rows (one token) and prompt chunks
        (several) in one forward. Each layer writes the step's K/V into the page pools
        (`slot_mapping`), then every token attends to its row's cached positions up to its
        own (`kernels.paged_attention`), so a chunk sees the chunks before it and a prefix
        another sequence computed. Returns every token's last hidden state (before the
        final norm: `logits` applies it), for the caller to pick which tokens get logits.
        Donate `cache` under jit so the writes happen in place. `layers`: per-layer
        weights to use instead of this module's stacked ones (`unstack_layers`)."""
        cfg = self.cfg
        cos, sin = _rope_tables(cfg, positions[None])  # [1, T, H/2]
        x = self._embed(tokens[None])  # [1, T, D]
        new_k, new_v = [], []
        for p, k_pages, v_pages in zip(self._layer_weights(layers), *cache, strict=True):
            q, k, v = _attention_inputs(cfg, x, p, cos, sin)  # [1, T, N, H], [1, T, K, H]
            k_pages, v_pages = kernels.write_pages(k_pages, v_pages, k[0], v[0], meta.slot_mapping)
            out = kernels.paged_attention(
                q[0], k_pages, v_pages, meta.kv_lens, meta.page_indices, meta.cu_q_lens,
                meta.num_rows, impl=cfg.attention_impl, mesh_axes=ATTENTION_AXES,
            )  # fmt: skip  # [T, N, H]
            x = _layer_output(cfg, x, out[None], p)
            new_k.append(k_pages)
            new_v.append(v_pages)
        return x[0], PagedKVCache(tuple(new_k), tuple(new_v))

    def unstack_layers(self) -> tuple[dict[str, jax.Array], ...]:
        """Each layer's weights as separate arrays (copies when called outside jit), for
        the serving step's `layers=` argument."""
        return tuple(self._layer_weights(None))

    def _layer_weights(self, layers: Sequence[LayerWeights] | None) -> Sequence[LayerWeights]:
        if layers is not None:
            return layers
        stacked = self.layers.stacked()
        return [{name: w[i] for name, w in stacked.items()} for i in range(self.cfg.n_layers)]

    # -- shared pieces -----------------------------------------------------------------

    def _embed(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        # A gather from a vocab-sharded table makes XLA rematerialize it implicitly (with a
        # warning); gathering the vocab axis explicitly does the same work, visibly.
        table = constrain(self.embed.get_value(), (None, EMBED))
        x = jnp.take(table, tokens, axis=0).astype(self.cfg.dtype)
        if self.cfg.quantization == "int8":
            x = x * jnp.take(self.embed_scale.get_value(), tokens, axis=0)[..., None].astype(
                x.dtype
            )
        # The lookup's D keeps the table's `fsdp` sharding, so its rows can only be split over
        # the other batch axes. Saying so first makes the move to the activation layout an
        # explicit reshard; going there from the gather directly, XLA's partitioner
        # replicates the whole [B, T, D] on every device ("Involuntary full
        # rematerialization") when the batch and the embedding share `fsdp`.
        x = constrain(x, _ACTIVATION, last_dims_first=True)
        return constrain(x, _ACTIVATION)

    def head_weight(self) -> jax.Array:  # [D, V] compute dtype
        """The LM head's matrix (the embedding's transpose when tied), unscaled: an int8
        model's per-column scales are applied by `logits`."""
        if self.cfg.tie_embeddings:
            return self.embed.get_value().astype(self.cfg.dtype).T
        return self.lm_head.get_value().astype(self.cfg.dtype)

    def logits(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V] float32
        """The final norm and the LM head over last hidden states (`step_hidden`'s)."""
        cfg = self.cfg
        x = _rms_norm(x, self.final_norm.get_value(), cfg.norm_eps)
        logits = jnp.einsum(
            "btd,dv->btv", x, self.head_weight(), preferred_element_type=jnp.float32
        )
        if cfg.quantization == "int8":
            tied = cfg.tie_embeddings
            logits = logits * (self.embed_scale if tied else self.lm_head_scale).get_value()
        return constrain(logits, (BATCH, LENGTH, VOCAB))


def _attention(cfg: ModelConfig, q, k, v, segment_ids):
    """Causal attention over whole sequences (training)."""
    return kernels.attention(
        q, k, v, segment_ids=segment_ids, impl=cfg.attention_impl, mesh_axes=ATTENTION_AXES
    )


def _attention_inputs(cfg: ModelConfig, x, p, cos, sin):
    """Pre-norm, q/k/v projections (+ biases), per-head q/k norms, then RoPE for one
    layer, in transformers' order for Qwen2/Qwen3. x: [B, T, D]. Everything after this
    (the kernels, the KV cache) sees plain q, k, v, so the switches cost them nothing."""
    h = _rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q = _matmul(cfg, "btd,dnh->btnh", h, p, "wq")  # [B, T, N, H]
    k = _matmul(cfg, "btd,dkh->btkh", h, p, "wk")  # [B, T, K, H]
    v = _matmul(cfg, "btd,dkh->btkh", h, p, "wv")  # [B, T, K, H]
    if cfg.attention_bias:
        q = q + p["q_bias"].astype(q.dtype)  # [N, H] broadcast
        k = k + p["k_bias"].astype(k.dtype)  # [K, H]
        v = v + p["v_bias"].astype(v.dtype)
    if cfg.qk_norm:  # over H, one weight shared by all heads
        q = _rms_norm(q, p["q_norm"], cfg.norm_eps)
        k = _rms_norm(k, p["k_norm"], cfg.norm_eps)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


def _layer_output(cfg: ModelConfig, x, attn, p):
    """o-projection + residual, then the SwiGLU MLP + residual. attn: [B, T, N, H]."""
    x = x + _matmul(cfg, "btnh,nhd->btd", attn.astype(cfg.dtype), p, "wo")  # [B, T, D]
    h = _rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    gate = _matmul(cfg, "btd,df->btf", h, p, "w_gate")  # [B, T, F]
    up = _matmul(cfg, "btd,df->btf", h, p, "w_up")  # [B, T, F]
    x = x + _matmul(cfg, "btf,fd->btd", jax.nn.silu(gate) * up, p, "w_down")  # [B, T, D]
    return constrain(x, _ACTIVATION)


def _matmul(cfg: ModelConfig, equation: str, x, p, name: str):
    return scaled_matmul(equation, x, p[name], p.get(name + SCALE_SUFFIX), cfg.dtype)


def _remat(cfg: ModelConfig, fn):
    if cfg.remat == "none":
        return fn
    policy = (
        None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    )
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)
