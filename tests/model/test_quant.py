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
from tandem.model.quant import (
    CONTRACTED_AXES,
    dequantize,
    quantize_int8,
    quantize_tensors,
    scaled_matmul,
)
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


@pytest.mark.parametrize("quantized", [False, True])
def test_bfloat16_matmul_rounds_the_float32_sum_of_products(quantized):
    # A bfloat16 model's projection: the products of its bfloat16 operands summed in
    # float32 and rounded to bfloat16 (then scaled, when int8), as a GPU's bf16 GEMM does;
    # 768 products summed in bfloat16 would be several rounding steps off.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 768)), jnp.bfloat16)
    w = rng.normal(size=(768, 256)).astype(np.float32)
    if quantized:
        q, scale = quantize_int8(w, (0,))
        weight, scale = jnp.asarray(q), jnp.asarray(scale)
    else:
        weight, scale = jnp.asarray(w, jnp.bfloat16), None

    got = jax.jit(lambda x, w, s: scaled_matmul("btd,df->btf", x, w, s, jnp.bfloat16))(
        x, weight, scale
    )

    assert got.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float32) @ np.asarray(weight, np.float32)
    roundings = 1
    if quantized:
        exact = exact * np.asarray(scale.astype(jnp.bfloat16), np.float32)
        roundings = 2  # the product, then the product times the scale
    step = 2.0**-8  # bfloat16's relative rounding error (8 significant bits)
    error = np.abs(np.asarray(got, np.float32) - exact)
    assert np.all(error <= roundings * step * np.abs(exact) + 1e-3 * np.abs(exact).max())


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
