"""The train step: sharding does not change the numbers, gradient accumulation equals one
big batch. (Loss goes down: tests/train/test_resume.py::test_loss_goes_down_on_tiny.)"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tandem.config import load_config
from tandem.model.tokenizer import Tokenizer
from tandem.train import data as tdata
from tandem.train.config import MeshConfig, TrainConfig
from tandem.train.loop import BATCH_KEYS, Trainer
from tandem.train.mesh import batch_sharding, make_mesh, process_rows, to_global
from tandem.train.sft import ExampleEncoder
from tests.train.train_helpers import SMALL


def _cfg(tmp_path, *overrides) -> TrainConfig:
    return load_config(TrainConfig, "tiny", [*SMALL, f"run_dir={tmp_path}", *overrides])


def _batches(cfg: TrainConfig, n: int):
    src, _ = tdata.load_sources("embedded", "", 20, "text")
    it = tdata.PackedBatches(
        src,
        ExampleEncoder(Tokenizer.byte()),
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        rows=range(cfg.batch_size),
        seed=0,
    )
    return [next(it) for _ in range(n)]


def _train(cfg: TrainConfig, mesh, host_batches):
    tr = Trainer(cfg, mesh)
    state = tr.init_state(cfg.seed)
    sh = batch_sharding(mesh)
    rows = process_rows(sh, cfg.batch_size)
    losses = []
    for b in host_batches:
        dev = {k: to_global(b[k], rows, sh, b[k].shape) for k in BATCH_KEYS}
        state, m = tr.step(state, dev)
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"]), state


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("single"), "mesh.fsdp=1")
    mesh = make_mesh(cfg, devices=jax.devices()[:1])
    batches = _batches(cfg, 3)
    return cfg, batches, _train(cfg, mesh, batches)


@pytest.mark.slow
def test_sharded_step_matches_single_device(single_device_run):
    cfg, batches, (losses1, params1, _) = single_device_run
    cfg8 = dataclasses.replace(cfg, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    mesh8 = make_mesh(cfg8)
    losses8, params8, state8 = _train(cfg8, mesh8, batches)
    # the params really are spread over the mesh
    wq = state8["params"]["layers"]["wq"]
    assert len(wq.sharding.device_set) == 8 and not wq.sharding.is_fully_replicated
    assert wq.addressable_shards[0].data.shape == (2, 32, 2, 16)  # [L, D/fsdp, N/tensor, H]
    np.testing.assert_allclose(losses8, losses1, rtol=2e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), params8, params1
    )


def test_grad_accumulation_matches_one_batch(single_device_run):
    cfg, batches, (losses1, params1, _) = single_device_run
    cfg2 = dataclasses.replace(cfg, grad_accum=4)
    mesh = make_mesh(cfg2, devices=jax.devices()[:1])
    losses2, params2, _ = _train(cfg2, mesh, batches)
    np.testing.assert_allclose(losses2, losses1, rtol=2e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), params2, params1
    )


def test_bf16_step_takes_the_chunked_loss(tmp_path) -> None:
    """With model.dtype=bfloat16 the train step's loss is the vocabulary-chunked one: its
    value equals the plain cross-entropy of the model's logits, and the step holds no
    [B, T, V] f32 logits (the f32 model's step, the control, does)."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    has_full_logits = {}
    for dtype in ("float32", "bfloat16"):
        # a vocabulary over model.loss.DEFAULT_VOCAB_CHUNK, so the loss has several chunks
        cfg = _cfg(
            tmp_path / dtype, "mesh.fsdp=2", f"model.dtype={dtype}", "model.vocab_size=20000"
        )
        mesh = make_mesh(cfg, devices=jax.devices()[:2])
        trainer = Trainer(cfg, mesh)
        hlo = jax.jit(trainer._train_step).lower(
            trainer.abstract_state, trainer.abstract_batch
        ).as_text()  # fmt: skip
        full = f"tensor<{cfg.batch_size}x{cfg.seq_len}x{cfg.model.vocab_size}xf32>"
        has_full_logits[dtype] = full in hlo
    assert has_full_logits == {"float32": True, "bfloat16": False}

    state = trainer.init_state(cfg.seed)  # the bf16 one
    batch = _batches(cfg, 1)[0]
    sh = batch_sharding(mesh)
    rows = process_rows(sh, cfg.batch_size)
    dev = {k: to_global(batch[k], rows, sh, batch[k].shape) for k in BATCH_KEYS}
    loss_sum, weight_sum = trainer.eval_sums(state["params"], dev)
    with jax.set_mesh(mesh):
        logits = nnx.merge(trainer.graphdef, state["params"])(
            dev["tokens"], dev["positions"], dev["segment_ids"]
        )  # [B, T, V] f32
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, dev["targets"])
    np.testing.assert_allclose(float(loss_sum), float(jnp.sum(ce * dev["weights"])), rtol=1e-5)
    assert float(weight_sum) == float(np.sum(batch["weights"]))
