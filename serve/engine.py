"""The JAX engine: model.Transformer behind the Engine contract, with a slot KV cache.

Device state (`DecodeState`) holds the KV cache (L x [B, K, S, H]), per-slot lengths, the last
sampled token and each slot's sampling parameters; every function below is compiled
ahead of time at `warmup()` for fixed shapes:

  prefill[T]  one prompt padded to bucket T (powers of two) -> its K/V + first token row
  insert[T]   writes a bucket-T prefix into a slot (slot index is data, not a shape)
  generate[n] one decode step for the slots in use -> state + packed [B, C] int32 row per slot
  free        marks a slot empty

Where decode attention is the CPU reference, a step's cost grows with the rows it runs
(every matmul row and every slot's cache prefix is real work), so `generate` is compiled
for n = 4, 8, 16, ... up to B rows and each step runs the smallest n that holds the slots
in use: a 64-slot server with 3 requests in flight steps at the cost of 4 slots, and the
last long requests of a burst do not pay for the empty slots around them. The n rows are
the slots in use ordered by length, so the attention loop's groups of slots
(kernels/bucketed_reference.py) hold similar lengths and read little past them. Elsewhere (Pallas
on GPU: empty slots cost the kernel nothing, and matmuls of 4 or 64 rows cost the same
weight reads) there is one `generate` over all B slots in slot order.

They are `jax.stages.Compiled` executables, so a request *cannot* trigger a compile: a
shape that was not compiled at warm-up is an error, not a silent recompile.

With several devices the params are sharded tensor-parallel (model/sharding.py rules on a
(1, 1, tp) mesh over ("data", "fsdp", "tensor")) and the cache over kv heads when they
divide; tp = the largest divisor of the device count that divides heads, kv heads, d_ff
and vocab (or ServeConfig.tensor_parallel).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tandem import kernels
from tandem.model.config import ModelConfig
from tandem.model.sharding import MESH_AXES, param_shardings
from tandem.model.transformer import KVCache, Transformer, init_cache
from tandem.serve.config import ServeConfig
from tandem.serve.engine_api import (
    Engine,
    Prefix,
    StepOutput,
    TokenizerLike,
    bucket_for,
    pack_rows,
    prefill_buckets,
)
from tandem.serve.sampling import SamplingParams, logprobs_of, sample, split_seed

log = logging.getLogger(__name__)


class DecodeState(NamedTuple):
    cache: KVCache  # L x [B, K, S, H] each
    lengths: jax.Array  # [B] int32: positions cached = position of `tokens`
    tokens: jax.Array  # [B] int32: last sampled token, next decode input
    active: jax.Array  # [B] bool
    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    seeds: jax.Array  # [B, 2] uint32
    logprobs: jax.Array  # [B] bool: the request asked for logprobs


class _Slot(NamedTuple):
    """Per-request sampling vectors with a leading batch axis of 1 (host numpy)."""

    temperature: np.ndarray  # [1] float32
    top_k: np.ndarray  # [1] int32
    top_p: np.ndarray  # [1] float32
    seeds: np.ndarray  # [1, 2] uint32
    logprobs: np.ndarray  # [1] bool


def _slot_vectors(params: SamplingParams, seed: int) -> _Slot:
    return _Slot(
        np.asarray([params.temperature], np.float32),
        np.asarray([params.top_k], np.int32),
        np.asarray([params.top_p], np.float32),
        np.asarray([split_seed(seed)], np.uint32),
        np.asarray([params.logprobs > 0]),
    )


def _no_logprobs(rows: int, top_n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`logprobs_of`'s outputs, all zero."""
    return (
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, top_n), jnp.int32),
        jnp.zeros((rows, top_n), jnp.float32),
    )


def pick_tensor_parallel(cfg: ModelConfig, n_devices: int, requested: int = 0) -> int:
    """Devices on the `tensor` axis: `requested`, or the largest divisor of n_devices that
    divides every tensor-sharded dimension (so nothing falls back to replication)."""
    if requested:
        if requested > n_devices:
            raise ValueError(
                f"tensor_parallel={requested} is invalid: only {n_devices} devices are visible"
            )
        return requested
    for tp in range(n_devices, 0, -1):
        if n_devices % tp == 0 and all(
            d % tp == 0 for d in (cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size)
        ):
            return tp
    return 1


class JaxEngine(Engine[DecodeState]):
    """Engine over a Transformer's params. Build with `from_bundle` or `from_model`."""

    def __init__(
        self,
        cfg: ModelConfig,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        tokenizer: TokenizerLike,
        serve_cfg: ServeConfig | None = None,
        *,
        mesh: Mesh | None = None,
        manifest: dict | None = None,
    ) -> None:
        scfg = (serve_cfg or ServeConfig()).resolve(cfg.max_seq_len)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's {cfg.vocab_size}"
            )
        self.cfg = cfg
        self.serve_cfg = scfg
        self.tokenizer = tokenizer
        self.max_slots = scfg.max_slots
        self.max_len = scfg.max_len
        self.max_prompt_len = scfg.max_prompt_len
        self.max_logprobs = scfg.max_logprobs
        self.mesh = mesh
        self.manifest = manifest
        self._buckets = prefill_buckets(self.max_prompt_len, scfg.min_prefill_bucket)
        self._select_slots = not kernels.runs_pallas(cfg.attention_impl) and (
            jax.default_backend() == "cpu"
        )
        self._decode_rows = (
            decode_row_counts(self.max_slots) if self._select_slots else (self.max_slots,)
        )
        self._slots_in_use: set[int] = set()  # from insert/free: sizes the next step
        # Serving holds each layer's weights as separate arrays (slicing them out of the
        # stacked [L, ...] params inside the step made XLA copy them on every call; see
        # model/transformer.py); the module keeps the rest (embedding, norms, head).
        model = nnx.merge(graphdef, params)
        layers = model.unstack_layers()
        del model.layers  # drop this module's references to the stacked copies
        self._graphdef, rest = nnx.split(model, nnx.Param)
        # Weights travel as (flat tuple of arrays, per-layer dicts): flattening an nnx.State
        # (Variable objects) on every call is host time on every decode step
        # (docs/benchmarks.md, "Measurements behind code choices").
        leaves, self._rest_treedef = jax.tree.flatten(rest)
        self._weights = (tuple(leaves), layers)
        self._cache_dtype = jnp.dtype(scfg.cache_dtype or cfg.dtype)
        self._compiled: dict[str, Any] = {}
        self.warmup_seconds: float | None = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: Transformer,
        tokenizer: TokenizerLike,
        serve_cfg: ServeConfig | None = None,
        *,
        devices: Sequence[jax.Device] | None = None,
        manifest: dict | None = None,
    ) -> JaxEngine:
        graphdef, params = nnx.split(model, nnx.Param)
        serve_cfg = serve_cfg or ServeConfig()
        mesh = cls._make_mesh(model.cfg, serve_cfg, devices)
        if mesh is not None:
            params = jax.device_put(params, param_shardings(params, mesh))
        return cls(model.cfg, graphdef, params, tokenizer, serve_cfg, mesh=mesh, manifest=manifest)

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        serve_cfg: ServeConfig | None = None,
        *,
        devices: Sequence[jax.Device] | None = None,
    ) -> JaxEngine:
        from tandem.model.bundle import Bundle, abstract_model

        bundle = Bundle.load(path)  # int8 bundles carry cfg.quantization="int8"; the model
        # then holds int8 weights + scales and dequantizes inside its einsums
        serve_cfg = serve_cfg or ServeConfig()
        mesh = cls._make_mesh(bundle.config, serve_cfg, devices)
        graphdef, _ = abstract_model(bundle.config)
        params = bundle.params(mesh)
        return cls(
            bundle.config, graphdef, params, bundle.tokenizer, serve_cfg,
            mesh=mesh, manifest=bundle.manifest,
        )  # fmt: skip

    @staticmethod
    def _make_mesh(
        cfg: ModelConfig, serve_cfg: ServeConfig, devices: Sequence[jax.Device] | None
    ) -> Mesh | None:
        devices = list(devices) if devices is not None else jax.devices()
        tp = pick_tensor_parallel(cfg, len(devices), serve_cfg.tensor_parallel)
        if tp == 1:
            return None
        return Mesh(np.asarray(devices[:tp]).reshape(1, 1, tp), MESH_AXES)

    # ---- shardings ------------------------------------------------------------------------

    def _sharding(self, spec: PartitionSpec) -> NamedSharding | None:
        return NamedSharding(self.mesh, spec) if self.mesh is not None else None

    def _cache_spec(self) -> PartitionSpec:
        assert self.mesh is not None
        tp = self.mesh.shape["tensor"]
        kv_axis = "tensor" if self.cfg.n_kv_heads % tp == 0 else None
        return PartitionSpec(None, kv_axis, None, None)  # [B, K, S, H]

    def _cache_shardings(self) -> KVCache | None:
        if self.mesh is None:
            return None
        layers = (self._sharding(self._cache_spec()),) * self.cfg.n_layers
        return KVCache(layers, layers)

    def _state_shardings(self) -> DecodeState | None:
        if self.mesh is None:
            return None
        rep = self._sharding(PartitionSpec())
        return DecodeState(self._cache_shardings(), rep, rep, rep, rep, rep, rep, rep, rep)

    # ---- the device functions (traced once per shape at warm-up) ----------------------

    def _model(self, weights) -> tuple[Transformer, tuple[dict[str, jax.Array], ...]]:
        leaves, layers = weights
        return nnx.merge(self._graphdef, jax.tree.unflatten(self._rest_treedef, leaves)), layers

    @property
    def layer_weights(self) -> tuple[dict[str, jax.Array], ...]:
        """The served per-layer weights (as placed on the devices)."""
        return self._weights[1]

    def _prefill_fn(self, weights, tokens, true_len, slot: _Slot):
        """tokens [1, T] right-padded; true_len [] int32 -> (KVCache L x [1,K,T,H], row [1, C])."""
        model, layers = self._model(weights)
        last, kv = model.prefill(tokens, layers, logits_at=true_len[None] - 1)  # [1, V]
        positions = true_len[None]  # [1] position of the token being sampled
        token = sample(last, slot.temperature, slot.top_k, slot.top_p, slot.seeds, positions)
        chosen, top_ids, top_lps = logprobs_of(last, token, self.max_logprobs)
        done = positions >= self.max_len
        kv = jax.tree.map(lambda x: x.astype(self._cache_dtype), kv)
        return kv, pack_rows(token, positions, done, chosen, top_ids, top_lps)

    def _insert_fn(self, state: DecodeState, kv: KVCache, slot, length, token, vec: _Slot):
        start = (slot, 0, 0, 0)  # [B, K, S, H]: the prefix lands at positions [0, T)
        cache = jax.tree.map(
            lambda layer, prefix: jax.lax.dynamic_update_slice(layer, prefix, start),
            state.cache,
            kv,
        )
        return DecodeState(
            cache=cache,
            lengths=state.lengths.at[slot].set(length),
            tokens=state.tokens.at[slot].set(token),
            active=state.active.at[slot].set(True),
            temperature=state.temperature.at[slot].set(vec.temperature[0]),
            top_k=state.top_k.at[slot].set(vec.top_k[0]),
            top_p=state.top_p.at[slot].set(vec.top_p[0]),
            seeds=state.seeds.at[slot].set(vec.seeds[0]),
            logprobs=state.logprobs.at[slot].set(vec.logprobs[0]),
        )

    def _generate_fn(self, weights, state: DecodeState, rows: int):
        """One decode step over `rows` slots: all B in slot order, or (`_select_slots`)
        the slots in use, shortest first, then free ones to fill `rows`."""
        model, layers = self._model(weights)
        if self._select_slots:
            in_use_first = jnp.where(state.active, state.lengths, jnp.iinfo(jnp.int32).max)
            order = jnp.argsort(in_use_first)[:rows].astype(jnp.int32)  # [n] cache rows

            def take(x):
                return x[order]

            def put(full, part):
                return full.at[order].set(part)
        else:
            order = None

            def take(x):
                return x

            def put(full, part):
                return part

        lengths = take(state.lengths)  # [n] positions of the tokens being decoded
        logits, cache = model.decode(take(state.tokens), state.cache, lengths, layers, order)
        lengths = lengths + take(state.active).astype(jnp.int32)  # [n] new token positions
        tokens = sample(
            logits, take(state.temperature), take(state.top_k), take(state.top_p),
            take(state.seeds), lengths,
        )  # fmt: skip
        # log-softmax and top-n over the vocabulary are a measurable part of a CPU step
        # (docs/benchmarks.md); most steps hold no request that asked for logprobs (their
        # row columns are then 0).
        chosen, top_ids, top_lps = jax.lax.cond(
            jnp.any(take(state.logprobs) & take(state.active)),
            lambda: logprobs_of(logits, tokens, self.max_logprobs),
            lambda: _no_logprobs(tokens.shape[0], self.max_logprobs),
        )
        done = lengths >= self.max_len
        packed = pack_rows(tokens, lengths, done, chosen, top_ids, top_lps)  # [n, C]
        out = put(jnp.zeros((self.max_slots, packed.shape[1]), packed.dtype), packed)
        new = state._replace(
            cache=cache, lengths=put(state.lengths, lengths), tokens=put(state.tokens, tokens)
        )
        return new, out

    def _free_fn(self, state: DecodeState, slot):
        return state._replace(
            active=state.active.at[slot].set(False), lengths=state.lengths.at[slot].set(0)
        )

    def _init_state_fn(self) -> DecodeState:
        b = self.max_slots
        cache = init_cache(self.cfg, b, self.max_len, self._cache_dtype)
        return DecodeState(
            cache=cache,
            lengths=jnp.zeros((b,), jnp.int32),
            tokens=jnp.zeros((b,), jnp.int32),
            active=jnp.zeros((b,), bool),
            temperature=jnp.zeros((b,), jnp.float32),
            top_k=jnp.zeros((b,), jnp.int32),
            top_p=jnp.ones((b,), jnp.float32),
            seeds=jnp.zeros((b, 2), jnp.uint32),
            logprobs=jnp.zeros((b,), bool),
        )

    # ---- compilation ------------------------------------------------------------------------

    def _compile(self) -> None:
        mesh_ctx = jax.set_mesh(self.mesh) if self.mesh is not None else _null()
        state_sh = self._state_shardings()
        kv_sh = self._cache_shardings()
        rep = self._sharding(PartitionSpec()) if self.mesh is not None else None

        def jit(fn, **kw):
            if self.mesh is None:
                kw = {k: v for k, v in kw.items() if k not in ("in_shardings", "out_shardings")}
            return jax.jit(fn, **kw)

        with mesh_ctx:
            init = jit(self._init_state_fn, out_shardings=state_sh).lower().compile()
            self._compiled["init_state"] = init
            state = init()
            vec = _slot_vectors(SamplingParams(), 0)
            scalar_i = np.int32(0)
            for t in self._buckets:
                tokens = np.zeros((1, t), np.int32)
                pre = jit(self._prefill_fn, out_shardings=(kv_sh, rep))
                self._compiled[f"prefill_{t}"] = pre.lower(
                    self._weights, tokens, np.int32(1), vec
                ).compile()
                kv_shape = jax.eval_shape(
                    self._prefill_fn, self._weights, tokens, np.int32(1), vec
                )[0]
                ins = jit(self._insert_fn, out_shardings=state_sh, donate_argnums=(0,))
                self._compiled[f"insert_{t}"] = ins.lower(
                    state, kv_shape_with(kv_shape, kv_sh), scalar_i, scalar_i, scalar_i, vec
                ).compile()
            gen = jit(
                self._generate_fn,
                out_shardings=(state_sh, rep),
                donate_argnums=(1,),
                static_argnums=(2,),
            )
            for rows in self._decode_rows:
                self._compiled[f"generate_{rows}"] = gen.lower(self._weights, state, rows).compile()
            free = jit(self._free_fn, out_shardings=state_sh, donate_argnums=(0,))
            self._compiled["free"] = free.lower(state, scalar_i).compile()

    def warmup(self) -> None:
        """Compiles every function for every bucket, then runs each once (so first-call
        costs such as allocation are paid here too)."""
        if self.warmup_seconds is not None:
            return
        t0 = time.perf_counter()
        self._compile()
        state = self.init_state()
        for t in self._buckets:
            prefix = self.prefill([0] * min(t, self.max_prompt_len), SamplingParams(), 0)
            state = self.insert(prefix, state, 0)
            state, _ = self.generate(state)
            state = self.free(state, 0)
        for rows in self._decode_rows:
            state, _ = self._compiled[f"generate_{rows}"](self._weights, state)
        jax.block_until_ready(state)
        self.warmup_seconds = time.perf_counter() - t0
        log.info(
            "engine warm: %d prefill buckets %s, decode steps of %s rows, %d slots x %d "
            "positions, tp=%d, %.1f s",
            len(self._buckets), self._buckets, self._decode_rows, self.max_slots, self.max_len,
            self.tensor_parallel, self.warmup_seconds,
        )  # fmt: skip

    def compiled_functions(self) -> dict[str, Any]:
        return dict(self._compiled)

    # ---- Engine API -----------------------------------------------------------------------------

    @property
    def tensor_parallel(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.shape["tensor"])

    def prefill_buckets(self) -> tuple[int, ...]:
        return self._buckets

    def _need_warm(self) -> None:
        if not self._compiled:
            raise RuntimeError("engine not warmed up: call warmup() first")

    def init_state(self) -> DecodeState:
        self._need_warm()
        self._slots_in_use.clear()
        return self._compiled["init_state"]()

    def prefill(self, tokens: Sequence[int], sampling: SamplingParams, seed: int) -> Prefix:
        self._need_warm()
        n = len(tokens)
        if not 1 <= n <= self.max_prompt_len:
            raise ValueError(f"prompt is invalid: {n} tokens outside [1, {self.max_prompt_len}]")
        bucket = bucket_for(n, self._buckets)
        padded = np.full((1, bucket), self.tokenizer.eos_id, np.int32)  # [1, T]
        padded[0, :n] = tokens
        vec = _slot_vectors(sampling, seed)
        kv, row = self._compiled[f"prefill_{bucket}"](self._weights, padded, np.int32(n), vec)
        first = StepOutput(np.asarray(row), self.max_logprobs)  # the one host transfer
        return Prefix(first=first, prompt_len=n, kv=(bucket, kv), extra=vec)

    def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState:
        bucket, kv = prefix.kv
        first = prefix.first.slot(0)
        self._slots_in_use.add(slot)
        return self._compiled[f"insert_{bucket}"](
            state, kv, np.int32(slot), np.int32(first.length), np.int32(first.token), prefix.extra
        )

    def generate(self, state: DecodeState) -> tuple[DecodeState, StepOutput]:
        in_use = len(self._slots_in_use)
        rows = next(n for n in self._decode_rows if n >= in_use)
        state, out = self._compiled[f"generate_{rows}"](self._weights, state)
        return state, StepOutput(out, self.max_logprobs)  # read later: one transfer per step

    def free(self, state: DecodeState, slot: int) -> DecodeState:
        self._slots_in_use.discard(slot)
        return self._compiled["free"](state, np.int32(slot))

    def info(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "manifest": {k: v for k, v in (self.manifest or {}).items() if k != "files"},
            "backend": jax.default_backend(),
            "tensor_parallel": self.tensor_parallel,
            "serve_config": dataclasses.asdict(self.serve_cfg),
        }


def decode_row_counts(max_slots: int) -> tuple[int, ...]:
    """Rows the decode step is compiled for: powers of two from 4 below max_slots, then
    max_slots (4, 8, 16, 32, 64 for 64 slots)."""
    counts = []
    rows = 4
    while rows < max_slots:
        counts.append(rows)
        rows *= 2
    return (*counts, max_slots)


def kv_shape_with(shape: KVCache, sharding: KVCache | None) -> KVCache:
    """ShapeDtypeStructs of a prefix's KV carrying the sharding it will arrive with."""
    if sharding is None:
        return shape
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape, sharding
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
