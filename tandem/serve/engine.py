"""The JAX engine: model.Transformer behind the step contract (tandem/serve/engine_api.py),
over a paged KV cache.

Device state is the cache alone (`DeviceCache`): per layer a pool of `num_pages` pages of
`page_size` positions (`PagedKVCache`, L x [K, P, Ps, H] for keys and for values), beside
it the token id of every cached position ([P, Ps], for the penalties:
tandem/serve/logits_processors.py) and the last step's sampled token per row ([max_seqs],
the inputs of a step planned before that one was committed: async scheduling), donated to
every step so its writes happen in place.
Everything else a step needs comes from the plan, as small host arrays: the rows' tokens,
positions, cache slots, page tables and sampling parameters, packed into one int32 buffer
(`PackedLayout`) so the call transfers one array.

One compiled function runs a plan (`Transformer.step` over the ragged rows, then the
per-row sampler and the packed output), compiled ahead of time at `warmup()` for every
token bucket `token_buckets(max_num_batched_tokens, max_seqs)`: a plan of T tokens runs in the
smallest bucket Tb >= T, with min(Tb, max_seqs) rows (a row has at least one token) and
page tables as wide as `max_len` needs. Padding tokens write nowhere (slot -1) and padding
rows read nothing (`num_rows`), so only the bucket decides the cost of the matmuls. They
are `jax.stages.Compiled` executables: a shape not compiled at warm-up is an error, never
a silent recompile.

Cache size (`kv_cache_tokens`, or `kv_cache_memory` GiB per device; 0 = derive it): on
an accelerator, KV_CACHE_MEMORY_FRACTION of the device memory still free once the weights
are placed (the rest is for the step's activations and XLA's workspace); on CPU, where
memory is the host's and shared, enough pages for `max_seqs` sequences of `max_len` (what
the slot engine reserved), capped at CPU_KV_CACHE_MEMORY_FRACTION of the host's available
memory.

With several devices the params are sharded tensor-parallel (tandem/model/sharding.py rules on a
(1, 1, tp) mesh over ("data", "fsdp", "tensor")) and the page pools over kv heads when
they divide; tp = the largest divisor of the device count that divides heads, kv heads,
d_ff and vocab (or ServeConfig.tensor_parallel).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tandem.config import require
from tandem.kernels.bucketed_reference import DECODE_GROUP, page_buckets
from tandem.model.config import ModelConfig
from tandem.model.sharding import MESH_AXES, param_shardings
from tandem.model.transformer import PagedKVCache, StepMetadata, Transformer, init_paged_cache
from tandem.serve.config import ServeConfig
from tandem.serve.engine_api import Engine, StepOutput, TokenizerLike, pack_rows, prompt_targets
from tandem.serve.kv_cache import pages_for
from tandem.serve.logits_processors import (
    ProcessorInputs,
    banned_width,
    process_logits,
    processor_inputs,
    write_token_ids,
)
from tandem.serve.sampling import (
    SamplingParams,
    logprobs_of,
    prompt_logprobs_of,
    sample,
    split_seed,
)
from tandem.serve.scheduler import Request, SchedulerOutput
from tandem.serve.structured import apply_bitmask, fill_bitmask

log = logging.getLogger(__name__)

KV_CACHE_MEMORY_FRACTION = 0.8  # of an accelerator's free memory after the weights
CPU_KV_CACHE_MEMORY_FRACTION = 0.25  # at most, of the host's available memory
# Tokens per page when ServeConfig.page_size 0: XLA's CPU gather pays per gathered page,
# so the CPU attention loop wants large pages, while a prefix-cache hit recomputes the
# partial page after the shared prefix: 64 served a mixed burst within 3 % of 128's
# throughput and a shared system prompt's first tokens 1.3x sooner (docs/benchmarks.md,
# "Serving engine v2"). The GPU kernel loads pages as its key tiles and wants them small.
PAGE_SIZE = {"cpu": 64}
DEFAULT_PAGE_SIZE = 16
# Tokens whose prompt logprobs one pass of the LM head computes: [block, V] float32 logits
# at a time (a step's whole [Tb, V] would be 2 GiB for 4096 tokens of a 128k vocabulary).
PROMPT_LOGPROBS_BLOCK = 256


def warmup_plans(
    tokens: int, rows: int, width: int, page_size: int, num_pages: int
) -> list[SchedulerOutput]:
    """Steps of at most `tokens` tokens and `rows` rows that write nothing (every slot -1)
    and together run each context-length branch of the CPU paged attention once (its
    decode groups and prompt-chunk blocks at every page-count bucket, `page_buckets`) and
    its common-prefix pass. XLA's CPU runtime sets a branch up the first time it runs
    (a few ms per layer, docs/benchmarks.md): unpaid at warm-up, that lands on the first
    requests to reach each length, as a stall of every stream in their step."""
    sizes = page_buckets(width, page_size)
    # (q_len, kv_len, shares its table with the plan's other rows): a decode group of
    # rows per size, and a 2-token chunk per size
    group = min(rows, DECODE_GROUP)
    unshared = [(1, s * page_size, False) for s in sizes for _ in range(group)]
    unshared += [(2, s * page_size, False) for s in sizes]
    capacity = rows // group * group  # whole groups per plan
    plans: list[list[tuple[int, int, bool]]] = [[]]
    for row in unshared:
        plan = plans[-1]
        if len(plan) == capacity or sum(q for q, _, _ in plan) + row[0] > tokens:
            plans.append(plan := [])
        plan.append(row)
    if rows >= 2 and width >= 2:  # two decode rows sharing their pages: the prefix pass
        plans.append([(1, (width - 1) * page_size + 1, True)] * 2)
    return [_write_nothing_plan(plan, width, num_pages) for plan in plans]


def _write_nothing_plan(
    rows: list[tuple[int, int, bool]], width: int, num_pages: int
) -> SchedulerOutput:
    q_lens = np.array([q for q, _, _ in rows], np.int32)
    kv_lens = np.array([kv for _, kv, _ in rows], np.int32)
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    # a row's own page (any page but the null one), repeated; shared rows all read page 1
    own = [1 + r % max(num_pages - 1, 1) for r in range(len(rows))]
    pages = [1 if shared else own[r] for r, (_, _, shared) in enumerate(rows)]
    positions = np.concatenate([np.arange(kv - q, kv) for q, kv, _ in rows]).astype(np.int32)
    params = SamplingParams(max_tokens=1)
    return SchedulerOutput(
        requests=tuple(Request(f"warmup-{r}", [0], params, seed=r) for r in range(len(rows))),
        token_ids=np.zeros(len(positions), np.int32),
        token_sources=np.full(len(positions), -1, np.int32),
        positions=positions,
        cu_q_lens=cu_q_lens,
        num_computed_tokens=kv_lens - q_lens,
        kv_lens=kv_lens,
        page_indices=np.repeat(np.array(pages, np.int32)[:, None], width, axis=1),
        slot_mapping=np.full(len(positions), -1, np.int32),
        sample=np.ones(len(rows), bool),
        preempted=(),
    )


class StepInputs(NamedTuple):
    """One plan padded to a bucket: Tb tokens, Rb rows (numpy on the host)."""

    tokens: np.ndarray  # [Tb] int32
    token_sources: np.ndarray  # [Tb] int32: -1, or the previous step's row whose sample
    # this token is (SchedulerOutput.token_sources)
    positions: np.ndarray  # [Tb] int32
    meta: StepMetadata  # slot_mapping [Tb], kv_lens [Rb], page_indices [Rb, W], ...
    logits_at: np.ndarray  # [Rb] int32: each row's last token
    temperature: np.ndarray  # [Rb] float32
    top_k: np.ndarray  # [Rb] int32
    top_p: np.ndarray  # [Rb] float32
    seeds: np.ndarray  # [Rb, 2] uint32
    logprobs: np.ndarray  # [Rb] bool: the row's request asked for logprobs
    constrained: np.ndarray  # [Rb] bool: the row's request has a grammar
    bitmask: np.ndarray  # [Rb, ceil(V / 32)] int32 allowed tokens (tandem/serve/structured.py)
    min_p: np.ndarray  # [Rb] float32
    processors: ProcessorInputs  # penalties, logit_bias, min_tokens
    prompt_targets: np.ndarray  # [Tb] int32: the prompt token after each token whose
    # request asked for prompt logprobs, else -1


class PackedLayout:
    """Where each array of a bucket's StepInputs lies in ONE int32 host buffer, the step's
    only host input. Each numpy argument is a transfer of its own, and each transfer
    releases and re-takes the GIL: while another thread runs Python (the API layer's
    event loop, streaming the last step's tokens) every re-take waits for that thread's
    turn to end, so the step's ~25 arrays stalled its launch far more than one buffer does
    (docs/benchmarks.md, "Serving engine v2"). Every field is 4-byte (int32, uint32,
    float32: bit-cast) or bool (as 0/1)."""

    def __init__(self, example: StepInputs) -> None:
        leaves, self.treedef = jax.tree.flatten(example)
        self.specs: list[tuple[int, tuple[int, ...], np.dtype]] = []  # (offset, shape, dtype)
        offset = 0
        for leaf in leaves:
            leaf = np.asarray(leaf)
            require(
                leaf.dtype == np.bool_ or leaf.dtype.itemsize == 4,
                "StepInputs",
                str(leaf.dtype),
                "4-byte or bool fields (they travel as int32)",
            )
            self.specs.append((offset, leaf.shape, leaf.dtype))
            offset += leaf.size
        self.size = offset

    def pack(self, inputs: StepInputs) -> np.ndarray:  # [size] int32
        parts = [
            np.asarray(leaf).reshape(-1).astype(np.int32)
            if spec[2] == np.bool_
            else np.asarray(leaf).reshape(-1).view(np.int32)
            for leaf, spec in zip(jax.tree.leaves(inputs), self.specs, strict=True)
        ]
        return np.concatenate(parts)

    def unpack(self, packed: jax.Array) -> StepInputs:  # traced, inside the step
        leaves = []
        for offset, shape, dtype in self.specs:
            part = packed[offset : offset + int(np.prod(shape, dtype=int))].reshape(shape)
            if dtype == np.bool_:
                part = part != 0
            elif dtype != np.int32:
                part = jax.lax.bitcast_convert_type(part, dtype)
            leaves.append(part)
        return jax.tree.unflatten(self.treedef, leaves)


class DeviceCache(NamedTuple):
    """The device state a step donates and returns."""

    kv: PagedKVCache
    token_ids: jax.Array  # [P, Ps] int32: the token at each cached position
    sampled: jax.Array  # [max_seqs] int32: the last step's token per row (async scheduling)


def default_page_size() -> int:
    """ServeConfig.page_size 0 means this, for the default backend."""
    return PAGE_SIZE.get(jax.default_backend(), DEFAULT_PAGE_SIZE)


def default_cache_dtype(cfg: ModelConfig) -> str:
    """ServeConfig.cache_dtype "" means this: the model's compute dtype, except float32 on
    CPU. There XLA converts a bfloat16 page pool to float32 whole around each layer's
    cache write and attention gathers, on every step (seen in the optimized HLO; a
    bfloat16 model served a burst 7x slower with a bfloat16 pool than with a float32 one,
    docs/benchmarks.md), while a float32 pool holds a bfloat16 model's keys and values
    exactly, at twice the bytes per token."""
    return "float32" if jax.default_backend() == "cpu" else cfg.dtype


def token_buckets(max_num_batched_tokens: int, max_seqs: int) -> tuple[int, ...]:
    """Token counts a step is compiled for (every bucket is a compiled executable).

    Steps fall in two kinds: decode-only ones, with as many tokens as running sequences
    (anywhere from 1 to max_seqs), and ones the scheduler fills to the budget with prompt
    chunks (only a prompt's last chunk lands in between). Up to max_seqs the buckets are
    those of vLLM's CUDA graph sizes, 8 apart to 32, then four per doubling (40, 48, 56,
    64, 80, ...): a decode step pads by at most a quarter of its tokens, where powers of
    two padded the mixed workload's long-tail steps (33-40 running) to 64 (measured in
    docs/benchmarks.md). Above max_seqs, powers of two up to max_num_batched_tokens (the
    last)."""
    buckets, size = set(), 8
    while size < max_seqs:
        buckets.add(size)
        size += max(8, 1 << (size.bit_length() - 3))  # a quarter of the octave, >= 8
    buckets.add(min(size, max_num_batched_tokens))  # the first that holds max_seqs rows
    size = 8
    while size < max_num_batched_tokens:
        buckets.add(size)
        size *= 2
    return tuple(sorted(buckets | {max_num_batched_tokens}))


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


def kv_bytes_per_token(cfg: ModelConfig, dtype: Any) -> int:
    """Bytes of K and V one cached position takes over all layers."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def _free_device_memory(devices: Sequence[jax.Device]) -> int | None:
    """Bytes still free on the fullest of `devices` (an accelerator's, after the weights),
    or None where the backend does not say (CPU)."""
    if "bytes_limit" not in (devices[0].memory_stats() or {}):
        return None
    return min(d.memory_stats()["bytes_limit"] - d.memory_stats()["bytes_in_use"] for d in devices)


def check_kv_cache_memory(
    tokens: int, per_token: int, devices: Sequence[jax.Device], field: str, value: Any
) -> None:
    """Rejects an asked-for pool that cannot be allocated (ValueError naming `field`):
    more than the device's free memory, or on CPU more than the host's physical memory,
    would end in an out-of-memory error at start-up instead."""
    limit = _free_device_memory(devices)
    what = "free device memory"
    if limit is None:
        limit, what = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory"
    require(
        tokens * per_token <= limit,
        field,
        value,
        f"a pool within the {limit / 2**30:.1f} GiB of {what}: at most {limit // per_token} "
        f"tokens of {per_token} bytes",
    )


def derive_kv_cache_tokens(
    cfg: ModelConfig, scfg: ServeConfig, dtype: Any, devices: Sequence[jax.Device], kv_shards: int
) -> int:
    """The pool size for kv_cache_tokens=0 (module docstring), in whole pages."""
    per_token = kv_bytes_per_token(cfg, dtype) // kv_shards  # on each device
    free = _free_device_memory(devices)
    if scfg.kv_cache_memory:
        tokens = int(scfg.kv_cache_memory * 2**30) // per_token
        check_kv_cache_memory(tokens, per_token, devices, "kv_cache_memory", scfg.kv_cache_memory)
        where = f"kv_cache_memory {scfg.kv_cache_memory} GiB per device"
    elif free is not None:
        tokens = int(KV_CACHE_MEMORY_FRACTION * free) // per_token
        where = f"{KV_CACHE_MEMORY_FRACTION:.0%} of {free / 2**30:.1f} GiB free device memory"
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        cap = int(CPU_KV_CACHE_MEMORY_FRACTION * available) // per_token
        pages = scfg.max_seqs * pages_for(scfg.max_len, scfg.page_size) + 1  # + the null page
        tokens = min(pages * scfg.page_size, cap)
        where = f"max_seqs x max_len, at most {CPU_KV_CACHE_MEMORY_FRACTION:.0%} of host memory"
    tokens -= tokens % scfg.page_size
    field, value = (
        ("kv_cache_memory", scfg.kv_cache_memory)
        if scfg.kv_cache_memory
        else ("kv_cache_tokens", 0)
    )
    require(
        tokens >= 2 * scfg.page_size,
        field,
        value,
        f"a larger size: only {tokens} tokens fit ({where}), fewer than 2 pages; lower "
        "max_len or use a smaller model",
    )
    log.info("KV cache: %d tokens (%s, %d bytes each)", tokens, where, per_token)
    return tokens


def _cache_key(manifest: dict | None, dtype: Any) -> bytes:
    """What besides the tokens decides the cached K/V: the weights (the bundle's file
    hashes; a model built in this process is its own) and the cache dtype."""
    files = json.dumps((manifest or {}).get("files"), sort_keys=True)
    return hashlib.sha256(f"{files}/{jnp.dtype(dtype).name}".encode()).digest()


class JaxEngine(Engine):
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
        scfg = (serve_cfg or ServeConfig()).resolve(cfg.max_seq_len, default_page_size())
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's {cfg.vocab_size}"
            )
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.manifest = manifest
        if scfg.cache_dtype == "bfloat16" and jax.default_backend() == "cpu":
            log.warning(
                "cache_dtype=bfloat16 on CPU: XLA converts the whole page pool to float32 "
                "around every cache write and attention, several times slower than "
                "float32 (the CPU default); see default_cache_dtype"
            )
        scfg = dataclasses.replace(scfg, cache_dtype=scfg.cache_dtype or default_cache_dtype(cfg))
        self._cache_dtype = jnp.dtype(scfg.cache_dtype)
        self.cache_key = _cache_key(manifest, self._cache_dtype)
        devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
        if not scfg.kv_cache_tokens:
            tokens = derive_kv_cache_tokens(
                cfg, scfg, self._cache_dtype, devices, self._kv_shards()
            )
            scfg = dataclasses.replace(scfg, kv_cache_tokens=tokens, kv_cache_memory=0.0)
        else:
            per_token = kv_bytes_per_token(cfg, self._cache_dtype) // self._kv_shards()
            check_kv_cache_memory(
                scfg.kv_cache_tokens, per_token, devices, "kv_cache_tokens", scfg.kv_cache_tokens
            )
        positions = (scfg.num_pages - 1) * scfg.page_size + 1  # the last token is not cached
        if positions < scfg.max_len:
            log.warning(
                "the KV cache holds %d positions, fewer than max_len %d: a request longer "
                "than that is rejected (raise kv_cache_tokens / kv_cache_memory or lower "
                "max_len)", positions, scfg.max_len,
            )  # fmt: skip
        if scfg.max_num_batched_tokens > scfg.max_step_tokens:
            log.info(
                "max_num_batched_tokens %d -> %d: no step holds more (max_seqs x max_len, "
                "the KV-cache pool)", scfg.max_num_batched_tokens, scfg.max_step_tokens,
            )  # fmt: skip
            scfg = dataclasses.replace(scfg, max_num_batched_tokens=scfg.max_step_tokens)
        self.serve_cfg = scfg
        self._buckets = token_buckets(scfg.max_num_batched_tokens, scfg.max_seqs)
        self._width = pages_for(scfg.max_len, scfg.page_size)  # page-table columns
        # Serving holds each layer's weights as separate arrays (slicing them out of the
        # stacked [L, ...] params inside the step made XLA copy them on every call; see
        # tandem/model/transformer.py); the module keeps the rest (embedding, norms, head).
        model = nnx.merge(graphdef, params)
        layers = model.unstack_layers()
        del model.layers  # drop this module's references to the stacked copies
        self._graphdef, rest = nnx.split(model, nnx.Param)
        # Weights travel as (flat tuple of arrays, per-layer dicts): flattening an nnx.State
        # (Variable objects) on every call is host time on every step.
        leaves, self._rest_treedef = jax.tree.flatten(rest)
        self._weights = (tuple(leaves), layers)
        self._compiled: dict[int, Any] = {}
        self._layouts: dict[int, PackedLayout] = {}
        self._open_masks: dict[int, np.ndarray] = {}  # rows -> an all-allowed bitmask
        self._banned = banned_width(len(tokenizer.stop_ids))  # min_tokens ids per row
        self._init_cache: Any = None
        self._cache: DeviceCache | None = None
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

    def _kv_shards(self) -> int:
        """Devices the page pools are split over (by kv head, when the heads divide)."""
        tp = self.tensor_parallel
        return tp if self.cfg.n_kv_heads % tp == 0 else 1

    def _cache_shardings(self) -> DeviceCache | None:
        if self.mesh is None:
            return None
        kv_axis = "tensor" if self._kv_shards() > 1 else None
        pool = NamedSharding(self.mesh, PartitionSpec(kv_axis, None, None, None))  # [K,P,Ps,H]
        layers = (pool,) * self.cfg.n_layers
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return DeviceCache(PagedKVCache(layers, layers), replicated, replicated)

    # ---- the device function (traced once per bucket at warm-up) ------------------------

    def _model(self, weights) -> tuple[Transformer, tuple[dict[str, jax.Array], ...]]:
        leaves, layers = weights
        return nnx.merge(self._graphdef, jax.tree.unflatten(self._rest_treedef, leaves)), layers

    @property
    def layer_weights(self) -> tuple[dict[str, jax.Array], ...]:
        """The served per-layer weights (as placed on the devices)."""
        return self._weights[1]

    def _step_fn(self, layout: PackedLayout, weights, cache: DeviceCache, buffer: jax.Array):
        """One plan (`buffer`: `layout.pack`ed) -> (cache, packed [Rb, C] int32, prompt rows
        [Tb, C] int32)."""
        x = layout.unpack(buffer)
        model, layers = self._model(weights)
        # tokens planned before the step that samples them finished: read on device
        inputs = jnp.where(
            x.token_sources >= 0, cache.sampled[jnp.maximum(x.token_sources, 0)], x.tokens
        )  # [Tb]
        hidden, kv = model.step_hidden(inputs, x.positions, cache.kv, x.meta, layers)  # [Tb, D]
        logits = model.logits(jnp.take(hidden, x.logits_at, axis=0)[None])[0]  # [Rb, V]
        token_ids = write_token_ids(cache.token_ids, inputs, x.meta.slot_mapping)
        positions = x.meta.kv_lens  # [Rb] where each row's next token sits
        adjusted = process_logits(
            logits, token_ids, x.meta.page_indices, positions, x.processors
        )  # [Rb, V]; logprobs below stay the model's own
        # Most steps hold no grammar row: the bitmask's unpacking over [Rb, V] is skipped.
        allowed = jax.lax.cond(
            jnp.any(x.constrained), lambda: apply_bitmask(adjusted, x.bitmask), lambda: adjusted
        )  # [Rb, V]
        tokens = sample(allowed, x.temperature, x.top_k, x.top_p, x.min_p, x.seeds, positions)
        cache = DeviceCache(kv, token_ids, cache.sampled.at[: tokens.shape[0]].set(tokens))
        # log-softmax and top-n over the vocabulary are a measurable part of a CPU step
        # (docs/benchmarks.md); most steps hold no request that asked for logprobs.
        rows = tokens.shape[0]
        asked = x.logprobs & (jnp.arange(rows) < x.meta.num_rows)
        chosen, top_ids, top_lps = jax.lax.cond(
            jnp.any(asked),
            lambda: logprobs_of(logits, tokens, self.max_logprobs),
            lambda: (
                jnp.zeros((rows,), jnp.float32),
                jnp.zeros((rows, self.max_logprobs), jnp.int32),
                jnp.zeros((rows, self.max_logprobs), jnp.float32),
            ),
        )
        # Every token's next prompt token scored for the requests that asked (the blocks
        # of tokens none asked for are skipped); read back only when a request asked.
        block = min(PROMPT_LOGPROBS_BLOCK, x.tokens.shape[0])
        lp, rank, ids, lps = prompt_logprobs_of(
            model.logits, hidden, x.prompt_targets, self.max_logprobs, block
        )
        packed = pack_rows(tokens, positions, chosen, top_ids, top_lps)
        return cache, packed, pack_rows(x.prompt_targets, rank, lp, ids, lps)

    def _init_cache_fn(self) -> DeviceCache:
        scfg = self.serve_cfg
        kv = init_paged_cache(self.cfg, scfg.num_pages, scfg.page_size, self._cache_dtype)
        token_ids = jnp.zeros((scfg.num_pages, scfg.page_size), jnp.int32)
        return DeviceCache(kv, token_ids, jnp.zeros((scfg.max_seqs,), jnp.int32))

    # ---- host side of a step -----------------------------------------------------------------

    def _bucket(self, num_tokens: int) -> int:
        for b in self._buckets:
            if num_tokens <= b:
                return b
        raise ValueError(
            f"plan of {num_tokens} tokens exceeds max_num_batched_tokens {self._buckets[-1]}"
        )

    def _rows(self, tokens_bucket: int) -> int:
        """The rows a bucket's step has: a row holds at least one token."""
        return min(tokens_bucket, self.max_seqs)

    def _inputs(self, plan: SchedulerOutput | None, tokens_bucket: int) -> StepInputs:
        """The plan padded to `tokens_bucket` (None: a step of padding only)."""
        t_pad = tokens_bucket
        r_pad = self._rows(t_pad)
        t, r = (plan.num_tokens, plan.num_rows) if plan is not None else (0, 0)
        tokens = np.zeros(t_pad, np.int32)
        sources = np.full(t_pad, -1, np.int32)
        positions = np.zeros(t_pad, np.int32)
        slots = np.full(t_pad, -1, np.int32)
        cu = np.full(r_pad + 1, t, np.int32)
        kv_lens = np.zeros(r_pad, np.int32)
        pages = np.zeros((r_pad, self._width), np.int32)
        temperature = np.zeros(r_pad, np.float32)
        top_k = np.zeros(r_pad, np.int32)
        top_p = np.ones(r_pad, np.float32)
        seeds = np.zeros((r_pad, 2), np.uint32)
        logprobs = np.zeros(r_pad, bool)
        bitmask = fill_bitmask(plan, r_pad, self.cfg.vocab_size) if plan is not None else None
        constrained = np.zeros(r_pad, bool)
        if bitmask is None:
            bitmask = self._open_mask(r_pad)
        else:
            constrained[:r] = [req.grammar is not None for req in plan.requests]
        min_p = np.zeros(r_pad, np.float32)
        targets = np.full(t_pad, -1, np.int32)
        if plan is not None:
            tokens[:t] = plan.token_ids
            sources[:t] = plan.token_sources
            positions[:t] = plan.positions
            slots[:t] = plan.slot_mapping
            cu[: r + 1] = plan.cu_q_lens
            kv_lens[:r] = plan.kv_lens
            pages[:r, : plan.page_indices.shape[1]] = plan.page_indices
            params = [(req.sampling, req.seed) for req in plan.requests]
            temperature[:r] = [s.temperature for s, _ in params]
            top_k[:r] = [s.top_k for s, _ in params]
            top_p[:r] = [s.top_p for s, _ in params]
            seeds[:r] = [split_seed(seed) for _, seed in params]
            logprobs[:r] = [s.logprobs > 0 for s, _ in params]
            min_p[:r] = [s.min_p for s, _ in params]
            for row, req in enumerate(plan.requests):
                if req.sampling.prompt_logprobs is not None:
                    prompt_targets(req.prompt_token_ids, plan, row, targets)
        requests = plan.requests if plan is not None else ()
        processors = processor_inputs(requests, r_pad, self._banned)
        logits_at = np.maximum(cu[1:] - 1, 0)  # [Rb] padding rows: token 0
        meta = StepMetadata(slots, kv_lens, pages, cu, np.int32(r))
        return StepInputs(
            tokens, sources, positions, meta, logits_at, temperature, top_k, top_p, seeds,
            logprobs, constrained, bitmask, min_p, processors, targets,
        )  # fmt: skip

    def _open_mask(self, rows: int) -> np.ndarray:  # [rows, W] int32, every token allowed
        mask = self._open_masks.get(rows)
        if mask is None:
            mask = np.full((rows, (self.cfg.vocab_size + 31) // 32), -1, np.int32)
            mask.flags.writeable = False
            self._open_masks[rows] = mask
        return mask

    # ---- compilation ------------------------------------------------------------------------

    def _compile(self) -> None:
        cache_sh = self._cache_shardings()
        rep = NamedSharding(self.mesh, PartitionSpec()) if self.mesh is not None else None

        def jit(fn, **kw):
            if self.mesh is None:
                kw = {k: v for k, v in kw.items() if k != "out_shardings"}
            return jax.jit(fn, **kw)

        with jax.set_mesh(self.mesh) if self.mesh is not None else _null():
            self._init_cache = jit(self._init_cache_fn, out_shardings=cache_sh).lower().compile()
            cache = jax.eval_shape(self._init_cache_fn)
            if cache_sh is not None:
                cache = jax.tree.map(
                    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                    cache,
                    cache_sh,
                )
            for bucket in self._buckets:
                layout = self._layouts[bucket] = PackedLayout(self._inputs(None, bucket))
                step = jit(
                    functools.partial(self._step_fn, layout),
                    out_shardings=(cache_sh, rep, rep),
                    donate_argnums=(1,),
                )
                buffer = jax.ShapeDtypeStruct((layout.size,), jnp.int32)
                self._compiled[bucket] = step.lower(self._weights, cache, buffer).compile()

    def warmup(self) -> None:
        """Compiles the step for every token bucket, then runs each on padding only and on
        `warmup_plans` (so first-call costs such as allocation and the CPU attention's
        lazily set-up branches are paid here, not by the first requests)."""
        if self.warmup_seconds is not None:
            return
        t0 = time.perf_counter()
        self._compile()
        self._cache = self._init_cache()
        scfg = self.serve_cfg
        for bucket in self._buckets:
            rows = self._rows(bucket)
            plans = [None, *warmup_plans(bucket, rows, self._width, scfg.page_size, scfg.num_pages)]
            for plan in plans:
                self._cache, out, _ = self._compiled[bucket](
                    self._weights, self._cache, self.packed_inputs(plan, bucket)
                )
                jax.block_until_ready(out)
        self.warmup_seconds = time.perf_counter() - t0
        log.info(
            "engine warm: steps of %s tokens, KV cache %d pages x %d tokens, %d seqs x %d "
            "positions, tp=%d, %.1f s",
            self._buckets, scfg.num_pages, scfg.page_size, scfg.max_seqs, scfg.max_len,
            self.tensor_parallel, self.warmup_seconds,
        )  # fmt: skip

    def compiled_functions(self) -> dict[int, Any]:
        """The step executable of each token bucket: (weights, cache, `packed_inputs`)."""
        return dict(self._compiled)

    def packed_inputs(self, plan: SchedulerOutput | None, tokens_bucket: int) -> np.ndarray:
        """The step's host input: the plan padded to the bucket, in its `PackedLayout`."""
        return self._layouts[tokens_bucket].pack(self._inputs(plan, tokens_bucket))

    # ---- Engine API -----------------------------------------------------------------------------

    @property
    def tensor_parallel(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.shape["tensor"])

    def token_buckets(self) -> tuple[int, ...]:
        return self._buckets

    def step(self, plan: SchedulerOutput) -> StepOutput:
        if self._cache is None:
            raise RuntimeError("engine not warmed up: call warmup() first")
        bucket = self._bucket(plan.num_tokens)
        require(
            plan.num_rows <= self._rows(bucket),
            "plan",
            f"<{plan.num_rows} rows>",
            f"at most max_seqs={self.max_seqs} rows",
        )
        inputs = self.packed_inputs(plan, bucket)
        self._cache, out, prompt = self._compiled[bucket](self._weights, self._cache, inputs)
        asked = any(r.sampling.prompt_logprobs is not None for r in plan.requests)
        return StepOutput(out, self.max_logprobs, prompt if asked else None)

    def reset(self) -> None:
        self._cache = None  # freed first: a pool sized to the device's memory fits once
        self._cache = self._init_cache()

    def info(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "manifest": {k: v for k, v in (self.manifest or {}).items() if k != "files"},
            "backend": jax.default_backend(),
            "tensor_parallel": self.tensor_parallel,
            "serve_config": dataclasses.asdict(self.serve_cfg),
        }


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
