"""Training with the family switches: gradients reach the biases and q/k norms, a Qwen2
run exports to a directory transformers loads with the same logits, and checkpoints saved
before the switches existed still resume."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tandem.config import load_config
from tandem.model.bundle import model_from_tensors
from tandem.train.checkpoint import incompatible_fields
from tandem.train.config import TrainConfig
from tandem.train.export import ExportConfig, export, restore_params
from tandem.train.export import locate as locate_checkpoint
from tandem.train.loop import run
from tandem.train.mesh import make_mesh
from tests.train.test_export import PROBE, logits_of
from tests.train.test_train import _batches, _cfg, _train
from tests.train.train_helpers import SMALL

SWITCH_PARAMS = ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm")


def test_a_step_trains_the_switch_params(tmp_path):
    cfg = _cfg(tmp_path, "mesh.fsdp=1", "model.attention_bias=true", "model.qk_norm=true")
    mesh = make_mesh(cfg, devices=jax.devices()[:1])
    losses, params, _ = _train(cfg, mesh, _batches(cfg, 2))
    assert all(np.isfinite(losses))
    layers = params["layers"]
    for name in SWITCH_PARAMS:
        init = 0.0 if name.endswith("bias") else 1.0
        assert np.max(np.abs(np.asarray(layers[name]) - init)) > 0, name


def test_qwen2_run_exports_to_a_directory_transformers_loads(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    overrides = [
        *SMALL,
        "model.family=qwen2",
        "model.attention_bias=true",
        "steps=2",
        "checkpoint_every=2",
        "eval_every=0",
        "eval_batches=1",
        "async_checkpoint=false",
        f"run_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(TrainConfig, "tiny", overrides)
    run(cfg)
    out, report = export(
        ExportConfig(
            checkpoint=str(tmp_path / "run"),
            out=str(tmp_path / "hf"),
            dtype="float32",
            format="hf",
            eval_batches=0,
        )
    )
    assert report["validation"]["max_rel_error"] < 1e-4
    written = json.loads((out / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model(torch.tensor(PROBE)).logits.numpy()
    params = dict(restore_params(locate_checkpoint(tmp_path / "run"), cfg.model))
    assert np.max(np.abs(params["layers.q_bias"])) > 0  # trained away from zero
    trained = model_from_tensors(cfg.model, params)
    np.testing.assert_allclose(logits_of(trained, PROBE), expected, atol=1e-4, rtol=0)


def test_old_checkpoints_resume_and_switch_changes_are_refused():
    current = {"model": {"d_model": 64, "attention_bias": False, "qk_norm": False}}
    old = {"model": {"d_model": 64}}  # saved before the switches existed
    assert incompatible_fields(old, current) == []
    on = {"model": {"d_model": 64, "attention_bias": True, "qk_norm": False}}
    assert incompatible_fields(old, on) == [
        "model.attention_bias: False in the checkpoint, True now"
    ]
    assert incompatible_fields(on, {"model": {**on["model"], "qk_norm": True}}) == [
        "model.qk_norm: False in the checkpoint, True now"
    ]
