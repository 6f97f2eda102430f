"""INT8 weight-only quantization: accurate per channel, and a quantized bundle serves."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tandem.config import load_config
from tandem.model.bundle import Bundle, BundleError, flat_params, write_bundle
from tandem.model.config import ModelConfig
from tandem.model.quant import CONTRACTED_AXES, dequantize, quantize_int8, quantize_tensors
from tandem.model.tokenizer import Tokenizer
from tandem.model.transformer import Transformer


@pytest.mark.parametrize(
    "shape, axes",
    [((3, 64, 4, 16), (1,)), ((3, 4, 16, 64), (1, 2)), ((300, 64), (1,)), ((64, 300), (0,))],
)
def test_per_channel_int8_error_is_bounded_by_half_a_step(shape, axes):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    q, scale = quantize_int8(w, axes)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    assert scale.shape == tuple(d for i, d in enumerate(shape) if i not in axes)
    error = np.abs(dequantize(q, scale, axes) - w)
    assert np.all(error <= np.expand_dims(scale, axes) / 2 + 1e-7)


def test_zero_channel_does_not_divide_by_zero():
    q, scale = quantize_int8(np.zeros((4, 3), np.float32), (0,))
    assert np.all(q == 0) and np.all(np.isfinite(scale))


@pytest.mark.parametrize("tied", [True, False])
def test_int8_bundle_logits_track_the_float_model(tmp_path, tied):
    cfg = load_config(
        ModelConfig,
        "tiny",
        [
            "vocab_size=300",
            "d_model=64",
            "n_layers=2",
            "head_dim=16",
            "d_ff=128",
            f"tie_embeddings={str(tied).lower()}",
        ],
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tensors = quantize_tensors(flat_params(nnx.state(model, nnx.Param)))
    qcfg = dataclasses.replace(cfg, quantization="int8")
    path = write_bundle(
        tmp_path / "q", qcfg, Tokenizer.byte(), tensors, source={}, quantization="int8"
    )
    bundle = Bundle.load(path)
    stored = dict(bundle.tensors())
    assert stored["layers.wq"].dtype == np.int8 and stored["layers.wq_scale"].shape == (2, 4, 16)
    assert stored["layers.attn_norm"].dtype == np.float32
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 300)
    expected = model(tokens, jnp.broadcast_to(jnp.arange(16), tokens.shape))
    got = bundle.logits(np.asarray(tokens))
    # Documented tolerance (docs/export.md): int8 logits within 2% of the logit range.
    assert np.max(np.abs(got - expected)) < 0.02 * float(np.ptp(expected))
    assert np.mean(np.argmax(got, -1) == np.argmax(expected, -1)) > 0.9


def test_int8_config_rejects_float_tensors(tmp_path):
    cfg = load_config(
        ModelConfig,
        "tiny",
        [
            "vocab_size=260",
            "d_model=32",
            "n_layers=1",
            "head_dim=16",
            "d_ff=64",
            "quantization=int8",
        ],
    )
    float_model = Transformer(dataclasses.replace(cfg, quantization="none"), rngs=nnx.Rngs(0))
    with pytest.raises(BundleError, match="the int8 config needs int8"):
        write_bundle(
            tmp_path / "b",
            cfg,
            Tokenizer.byte(),
            flat_params(nnx.state(float_model, nnx.Param)),
            source={},
        )


def test_every_matrix_has_a_contraction_rule():
    switches = ["attention_bias=true", "qk_norm=true"]  # their biases and norms stay float
    cfg = load_config(ModelConfig, "tiny", ["tie_embeddings=false", *switches])
    names = {
        name
        for name, _ in flat_params(
            nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        )
    }
    assert {"layers.q_bias", "layers.q_norm"} <= names
    matrices = {n for n in names if "norm" not in n and "bias" not in n}
    assert matrices == set(CONTRACTED_AXES)
