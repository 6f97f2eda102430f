"""The sharded train step and the training run around it.

`Trainer` owns the compiled pieces: params and AdamW state laid out by the logical rules in
`tandem/model/sharding.py`, the batch over (data, fsdp), one `jax.jit` step with explicit in/out
shardings and the state donated. Gradient accumulation is a `lax.scan` over microbatches
inside that one step; compute dtype and remat come from the model config.

`run(cfg)` is the whole run, in the three parts MaxText's train.py also has:
`setup_run` (start-up checks, all before anything is compiled; data, tokenizer,
resume-or-init), `Evaluator` (held-out loss on fixed batches) and `train_loop` (the steps
with metrics / eval / checkpoints, and a final save on SIGTERM, i.e. preemption).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tandem.model import sharding as msharding
from tandem.model.loss import chunked_cross_entropy
from tandem.model.transformer import Transformer
from tandem.train import data as tdata
from tandem.train import init_from
from tandem.train.checkpoint import Checkpointer, incompatible_fields
from tandem.train.config import TrainConfig
from tandem.train.mesh import (
    batch_sharding,
    data_processes,
    local_rows,
    make_mesh,
    maybe_initialize_distributed,
    process_rows,
    to_global,
    validate_batch,
)
from tandem.train.metrics import MetricsWriter, Throughput, peak_flops
from tandem.train.sft import ExampleEncoder

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]  # tokens, targets, weights, segment_ids, positions: each [B, T]
BATCH_KEYS = ("tokens", "targets", "weights", "segment_ids", "positions")
NO_DECAY = ("norm", "bias")  # params whose name contains these get no weight decay


def _to_pure(state: Any) -> Any:
    return nnx.to_pure_dict(state)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to min_lr_ratio * learning_rate at
    `lr_decay_steps` (default: `steps`)."""
    horizon = cfg.lr_decay_steps or cfg.steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(horizon, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: TrainConfig, params: Any) -> optax.GradientTransformation:
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: not any(s in jax.tree_util.keystr(path) for s in NO_DECAY), params
    )
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        mask=mask,
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


def _opt_shardings(opt_abstract: Any, param_shard: Any, mesh: Mesh) -> Any:
    """Optimizer leaves that mirror a param (Adam's mu, nu) take its sharding; the rest
    (counts) are replicated. Matching is by the param's key path being a suffix."""
    by_path = {
        tuple(str(k) for k in path): s
        for path, s in jax.tree_util.tree_flatten_with_path(param_shard)[0]
    }
    rep = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = tuple(str(k) for k in path)
        for i in range(len(keys)):
            s = by_path.get(keys[i:])
            if s is not None and len(s.spec) <= len(leaf.shape):
                return s
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)


class Trainer:
    """Compiled tandem/train/eval steps for one config on one mesh. State is a dict pytree:
    params (pure dict), opt_state (optax), step (int32 []), rng (uint32 key data [2])."""

    def __init__(self, cfg: TrainConfig, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        mcfg = cfg.model
        abs_model = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
        self.graphdef, abs_params = nnx.split(abs_model, nnx.Param)
        self.param_shardings = _to_pure(msharding.param_shardings(abs_params, mesh))
        abs_pure = _to_pure(abs_params)
        self.tx = make_optimizer(cfg, abs_pure)
        abs_opt = jax.eval_shape(self.tx.init, abs_pure)
        rep = NamedSharding(mesh, PartitionSpec())
        self.state_shardings = {
            "params": self.param_shardings,
            "opt_state": _opt_shardings(abs_opt, self.param_shardings, mesh),
            "step": rep,
            "rng": rep,
        }
        abs_state = {
            "params": abs_pure,
            "opt_state": abs_opt,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        }
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abs_state,
            self.state_shardings,
        )
        self.batch_sharding = batch_sharding(mesh)
        self.schedule = learning_rate_schedule(cfg)
        B, T = cfg.batch_size, cfg.seq_len
        self.abstract_batch = {
            k: jax.ShapeDtypeStruct(
                (B, T), jnp.float32 if k == "weights" else jnp.int32, sharding=self.batch_sharding
            )
            for k in BATCH_KEYS
        }
        self._step_c = None
        self._eval_c = None

    # -- pure functions --------------------------------------------------------------

    def _init(self, rng: jax.Array) -> dict[str, Any]:
        model = Transformer(self.cfg.model, rngs=nnx.Rngs(params=jax.random.wrap_key_data(rng)))
        params = _to_pure(nnx.split(model, nnx.Param)[1])
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": rng,
        }

    def _loss_sums(self, params: Any, b: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Sum of the weighted per-token cross-entropies and of the weights. A bf16 model
        takes the vocabulary-chunked loss (tandem/model/loss.py): its [B, T, V] f32 logits and
        their f32 cotangent would dominate the step's memory and the head's backward."""
        model = nnx.merge(self.graphdef, params)
        mcfg = self.cfg.model
        if mcfg.dtype == "bfloat16" and mcfg.quantization == "none":
            x = model.hidden_states(b["tokens"], b["positions"], b["segment_ids"])  # [B, T, D]
            ce = chunked_cross_entropy(x, model.head_weight(), b["targets"])  # [B, T] f32
        else:
            logits = model(b["tokens"], b["positions"], b["segment_ids"])  # [B, T, V] f32
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])  # [B, T]
        return jnp.sum(ce * b["weights"]), jnp.sum(b["weights"])

    def _train_step(self, state: dict[str, Any], batch: dict[str, jax.Array]):
        A = self.cfg.grad_accum
        params = state["params"]
        grad_fn = jax.value_and_grad(self._loss_sums, has_aux=True)
        if A == 1:
            (loss_sum, w_sum), grads = grad_fn(params, batch)
        else:
            # [B, T] -> [B/A, A, T] -> [A, B/A, T]: microbatch a = rows a, a+A, ..., so each
            # microbatch stays evenly spread over the devices' contiguous row blocks.
            micro = jax.tree.map(  # [B, T] -> [A, B/A, T]
                lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch
            )
            micro = jax.lax.with_sharding_constraint(
                micro, NamedSharding(self.mesh, PartitionSpec(None, ("data", "fsdp")))
            )

            def accum(carry, mb):
                (ls, w), g = grad_fn(params, mb)
                gl, gw, gg = carry
                return (gl + ls, gw + w, jax.tree.map(jnp.add, gg, g)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zeros = jax.lax.with_sharding_constraint(zeros, self.param_shardings)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            (loss_sum, w_sum, grads), _ = jax.lax.scan(accum, init, micro)
        w = jnp.maximum(w_sum, 1.0)
        grads = jax.tree.map(lambda g, p: (g / w).astype(p.dtype), grads, params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new = {
            "params": params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        metrics = {
            "loss": loss_sum / w,
            "grad_norm": grad_norm,
            "lr": self.schedule(state["step"]),
            "loss_tokens": w_sum,  # targets counted in the loss (SFT: assistant tokens)
        }
        return new, metrics

    # -- compiled entry points -------------------------------------------------------

    def init_state(self, seed: int) -> dict[str, Any]:
        rng = jax.random.key_data(jax.random.key(seed))
        rep = NamedSharding(self.mesh, PartitionSpec())
        with jax.set_mesh(self.mesh):
            init = jax.jit(self._init, in_shardings=rep, out_shardings=self.state_shardings)
            return init(rng)

    def state_from_params(self, params: Any, seed: int) -> dict[str, Any]:
        """A step-0 state around given (already sharded) params: fresh AdamW moments."""
        rng = jax.random.key_data(jax.random.key(seed))
        rep = NamedSharding(self.mesh, PartitionSpec())

        def build(params: Any, rng: jax.Array) -> dict[str, Any]:
            return {
                "params": params,
                "opt_state": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32),
                "rng": rng,
            }

        with jax.set_mesh(self.mesh):
            init = jax.jit(
                build, in_shardings=(self.param_shardings, rep), out_shardings=self.state_shardings
            )
            return init(params, rng)

    def compile(self) -> None:
        """AOT-compiles the train and eval steps (so step timings exclude compilation)."""
        rep = NamedSharding(self.mesh, PartitionSpec())
        with jax.set_mesh(self.mesh):
            self._step_c = (
                jax.jit(
                    self._train_step,
                    in_shardings=(self.state_shardings, self.batch_sharding),
                    out_shardings=(self.state_shardings, rep),
                    donate_argnums=0,
                )
                .lower(self.abstract_state, self.abstract_batch)
                .compile()
            )

    def step_memory(self) -> dict[str, int]:
        """Bytes per device of the compiled train step, XLA's own accounting: arguments
        (state and batch), outputs, temporaries (activations kept for the backward,
        gradients, the loss's buffers) and generated code. Compiles if needed."""
        if self._step_c is None:
            self.compile()
        analysis = self._step_c.memory_analysis()
        return {
            "argument_bytes": analysis.argument_size_in_bytes,
            "output_bytes": analysis.output_size_in_bytes,
            "alias_bytes": analysis.alias_size_in_bytes,
            "temp_bytes": analysis.temp_size_in_bytes,
            "code_bytes": analysis.generated_code_size_in_bytes,
        }

    def step(self, state: dict[str, Any], batch: dict[str, jax.Array]):
        if self._step_c is None:
            self.compile()
        with jax.set_mesh(self.mesh):
            return self._step_c(state, batch)

    def eval_sums(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        if self._eval_c is None:
            rep = NamedSharding(self.mesh, PartitionSpec())
            with jax.set_mesh(self.mesh):
                self._eval_c = (
                    jax.jit(
                        self._loss_sums,
                        in_shardings=(self.param_shardings, self.batch_sharding),
                        out_shardings=(rep, rep),
                    )
                    .lower(self.abstract_state["params"], self.abstract_batch)
                    .compile()
                )
        with jax.set_mesh(self.mesh):
            return self._eval_c(params, batch)


# ------------------------------------------------------------------------- host helpers


def _scalar(x: jax.Array) -> float:
    return float(np.asarray(x.addressable_data(0)))


class _Preemption:
    """SIGTERM -> stop after the current step with a final checkpoint. Multi-process runs
    use JAX's preemption sync point instead (jax.distributed installs the notifier)."""

    def __init__(self) -> None:
        self.flag = False
        self.prev = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: finishing this step, saving a checkpoint, exiting")
        self.flag = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service not enabled
                return False
        return self.flag

    def close(self) -> None:
        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)


# ---------------------------------------------------------------------------------- run


def _barrier(name: str) -> Callable[[str], None] | None:
    if jax.process_count() == 1:
        return None
    return lambda tag: multihost_utils.sync_global_devices(f"{name}-{tag}")


@dataclasses.dataclass
class RunSetup:
    """What start-up hands the step loop: every check passed, the state restored or
    initialised, nothing compiled yet."""

    cfg: TrainConfig
    mesh: Mesh
    trainer: Trainer
    checkpointer: Checkpointer
    encoder: ExampleEncoder  # the model's tokenizer (+ chat template): record -> ids, mask
    train_source: tdata.DocumentSource
    eval_source: tdata.DocumentSource
    rows: list[int]  # the global batch rows this process feeds
    start: int  # the step `state` holds
    state: dict[str, Any]
    data_state: np.ndarray | None  # the data iterator's position (None = from the start)


def setup_run(cfg: TrainConfig) -> RunSetup:
    """Start-up: everything that can fail on a bad config fails here, before a compile."""
    maybe_initialize_distributed(cfg)
    mesh = make_mesh(cfg)
    validate_batch(cfg, mesh)
    train_src, eval_src = tdata.load_sources(
        cfg.data, cfg.eval_data, cfg.eval_holdout, cfg.text_key
    )
    run_dir = Path(cfg.run_dir)
    pretrained = init_from.locate(cfg.init_from) if cfg.init_from else None
    if pretrained is not None:
        init_from.check_model(cfg.model, pretrained.model)
        if jax.process_index() == 0:
            init_from.copy_tokenizer(pretrained, run_dir)
        if (barrier := _barrier("init-tokenizer")) is not None:
            barrier("copied")
    tok = tdata.build_tokenizer(
        str(run_dir / "tokenizer") if pretrained else cfg.tokenizer,  # init_from: its copy
        train_src,
        cfg.model.vocab_size,
        run_dir,
        is_primary=jax.process_index() == 0,
        barrier=_barrier("tok"),
    )
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tok.vocab_size} tokens (tokenizer={cfg.tokenizer!r}); raise model.vocab_size"
        )
    encoder = ExampleEncoder(tok)
    train_src = tdata.drop_unusable(train_src, encoder, cfg.seq_len)
    eval_src = tdata.drop_unusable(eval_src, encoder, cfg.seq_len)
    log.info(
        "mesh %s over %d devices, %d process(es), processes per data index %s; data %r / eval %r",
        dict(mesh.shape),
        jax.device_count(),
        jax.process_count(),
        data_processes(mesh),
        train_src,
        eval_src,
    )
    if cfg.compile_cache_dir:
        jax.config.update(
            "jax_compilation_cache_dir", str(Path(cfg.compile_cache_dir).expanduser())
        )
    trainer = Trainer(cfg, mesh)
    rows = process_rows(batch_sharding(mesh), cfg.batch_size)
    ckpt = Checkpointer(
        run_dir / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint
    )
    start, state, data_state = _resume_or_init(cfg, trainer, ckpt, rows, pretrained)
    return RunSetup(
        cfg, mesh, trainer, ckpt, encoder, train_src, eval_src, rows, start, state, data_state
    )


def _resume_or_init(
    cfg: TrainConfig,
    trainer: Trainer,
    ckpt: Checkpointer,
    rows: list[int],
    pretrained: init_from.Pretrained | None,
) -> tuple[int, dict[str, Any], np.ndarray | None]:
    """The newest checkpoint of run_dir (refused if it is another run's), else step 0 from
    the pretrained weights, else from a random init."""
    latest = ckpt.latest_step()
    if latest is not None:
        saved_cfg = ckpt.saved_config(latest)
        bad = incompatible_fields(saved_cfg, cfg.to_dict()) if saved_cfg else []
        if bad:
            raise ValueError(
                f"run_dir={cfg.run_dir!r} holds checkpoints of a different run ("
                + "; ".join(bad)
                + "); use a new run_dir or the original settings"
            )
    row_sharding = batch_sharding(trainer.mesh)
    abstract = dict(
        trainer.abstract_state,
        data_state=jax.ShapeDtypeStruct((cfg.batch_size, 2), jnp.int32, sharding=row_sharding),
    )
    restored = ckpt.restore_latest(abstract)
    if restored is None and pretrained is not None:
        log.info("initialising from %s (%s)", pretrained.path, pretrained.kind)
        params = init_from.load_params(pretrained, cfg.model, trainer.param_shardings)
        return 0, trainer.state_from_params(params, cfg.seed), None
    if restored is None:
        return 0, trainer.init_state(cfg.seed), None
    start, full = restored
    data_state = local_rows(full.pop("data_state"), rows)
    log.info("resuming at step %d", start)
    return start, full, data_state


class Evaluator:
    """Loss and perplexity on a fixed set of held-out batches (the same at every eval)."""

    def __init__(self, setup: RunSetup, put: Callable[[Batch], dict[str, jax.Array]]):
        cfg = setup.cfg
        batches = tdata.PackedBatches(
            setup.eval_source,
            setup.encoder,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            rows=setup.rows,
            seed=cfg.seed + 1,
        )
        self.trainer = setup.trainer
        self.batches = [put(next(batches)) for _ in range(cfg.eval_batches)]

    def __call__(self, params: Any) -> dict[str, float]:
        sums = [self.trainer.eval_sums(params, b) for b in self.batches]
        loss = sum(_scalar(s[0]) for s in sums) / max(sum(_scalar(s[1]) for s in sums), 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}


def train_loop(setup: RunSetup) -> dict[str, Any]:
    """Steps from `setup.start` to `cfg.steps`: metrics, evals, checkpoints, and a final
    checkpoint on preemption. Returns the run summary."""
    cfg, trainer, ckpt, rows = setup.cfg, setup.trainer, setup.checkpointer, setup.rows
    B, T = cfg.batch_size, cfg.seq_len
    row_sharding = batch_sharding(setup.mesh)

    def put(b: Batch) -> dict[str, jax.Array]:
        return {k: to_global(b[k], rows, row_sharding, (B, T)) for k in BATCH_KEYS}

    batches = tdata.PackedBatches(
        setup.train_source,
        setup.encoder,
        seq_len=T,
        batch_size=B,
        rows=rows,
        seed=cfg.seed,
        state=setup.data_state,
    )
    evaluate = Evaluator(setup, put)
    peak, peak_src = peak_flops(cfg.model.dtype, cfg.peak_tflops)
    log.info("peak %.3g FLOP/s (%s)", peak, peak_src)
    thr = Throughput(cfg.tokens_per_step, cfg.model.flops_per_token(T), peak)
    writer = MetricsWriter(
        Path(cfg.run_dir),
        total_steps=cfg.steps,
        start_step=setup.start,
        primary=jax.process_index() == 0,
        tensorboard=cfg.tensorboard,
        progress=cfg.progress,
    )
    feed = tdata.Prefetch(batches, cfg.prefetch)
    preempt = _Preemption()
    state, start = setup.state, setup.start
    last_loss, step, preempted, saved = float("nan"), start, False, start
    try:
        thr.reset()
        since = 0
        for step in range(start + 1, cfg.steps + 1):
            host_batch, dstate = next(feed)
            state, m = trainer.step(state, put(host_batch))
            since += 1
            is_last = step == cfg.steps
            do_eval = (cfg.eval_every and step % cfg.eval_every == 0) or is_last
            if step % cfg.log_every == 0 or is_last or do_eval:
                rec = {"step": step, **{k: _scalar(v) for k, v in m.items()}}
                rec.update(thr.update(since))
                since = 0
                rec["tokens"] = step * cfg.tokens_per_step
                last_loss = rec["loss"]
                if do_eval:
                    rec.update(evaluate(state["params"]))
                    thr.reset()
                writer.write(rec)
            preempted = preempt.reached(step)
            if step % cfg.checkpoint_every == 0 or is_last or preempted:
                full = dict(state, data_state=to_global(dstate, rows, row_sharding, (B, 2)))
                ckpt.save(step, full, cfg.to_dict())
                saved = step
                thr.reset()
            if preempted:
                log.warning("preempted: saved step %d, exiting", step)
                break
    finally:
        feed.close()
        preempt.close()
        ckpt.close()
        writer.close()
    return {
        "step": step,
        "loss": last_loss,
        "preempted": preempted,
        "saved_step": saved,
        "resumed_from": start,
    }


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Trains per `cfg`; returns a summary (final step, last loss, whether preempted)."""
    setup = setup_run(cfg)
    if setup.start >= cfg.steps:
        log.info(
            "run_dir %s already holds step %d >= steps=%d: nothing to do",
            cfg.run_dir,
            setup.start,
            cfg.steps,
        )
        setup.checkpointer.close()
        return {
            "step": setup.start,
            "loss": float("nan"),
            "preempted": False,
            "saved_step": setup.start,
            "resumed_from": setup.start,
        }
    t0 = time.perf_counter()
    setup.trainer.compile()
    log.info("compiled the train step in %.1f s", time.perf_counter() - t0)
    return train_loop(setup)
