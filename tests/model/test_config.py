import json

import pytest

from tandem.config import load_config
from tandem.model.config import ModelConfig, RopeScaling


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("tiny", 1e6, 5e6),
        ("small", 50e6, 150e6),
        ("llama3-1b", 1.1e9, 1.4e9),
        ("llama3-8b", 7.5e9, 8.5e9),
    ],
)
def test_presets_have_the_documented_size(name, low, high):
    assert low <= ModelConfig.preset(name).num_params <= high


def test_llama3_presets_match_the_published_shapes():
    cfg = ModelConfig.preset("llama3-8b")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (
        4096,
        32,
        32,
        8,
        14336,
    )
    assert cfg.rope_scaling == RopeScaling(factor=8.0)
    assert ModelConfig.preset("llama3-1b").tie_embeddings


def test_overrides_reach_nested_fields_and_coerce_types():
    cfg = load_config(
        ModelConfig,
        "tiny",
        ["d_model=128", "rope_scaling.factor=4", "tie_embeddings=false", "rope_theta=5e5"],
    )
    assert cfg.d_model == 128 and cfg.rope_theta == 500000.0 and not cfg.tie_embeddings
    assert cfg.rope_scaling == RopeScaling(factor=4.0)
    assert load_config(ModelConfig, "tiny", ["rope_scaling=null"]).rope_scaling is None


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_loads_from_files(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_text(
        json.dumps({"d_model": 96, "n_heads": 3, "n_kv_heads": 1, "head_dim": 32})
    )  # JSON is valid YAML too
    cfg = load_config(ModelConfig, path, ["n_layers=2"])
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers) == (96, 3, 2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("n_kv_heads=3", "n_kv_heads=3 is invalid: allowed a divisor of n_heads=4"),
        ("dtype=fp16", "dtype='fp16' is invalid: allowed one of ('float32', 'bfloat16')"),
        ("remat=sometimes", "remat='sometimes' is invalid"),
        ("attention_impl=cuda", "attention_impl='cuda' is invalid"),
        ("d_model=0", "d_model=0 is invalid: allowed a positive integer"),
        ("d_model=abc", "d_model='abc' is invalid: allowed an integer"),
        ("head_dim=15", "head_dim=15 is invalid: allowed an even number"),
        ("vocabsize=10", "unknown config key 'vocabsize' for ModelConfig: allowed keys are"),
        ("rope_scaling.factor=0.5", "rope_scaling.factor=0.5 is invalid: allowed >= 1"),
        ("rope_scaling.bogus=1", "unknown config key 'rope_scaling.bogus'"),
        ("tie_embeddings=maybe", "tie_embeddings='maybe' is invalid: allowed true or false"),
        ("d_model", "must look like key=value"),
    ],
    ids=lambda v: v if "=" in v or " " not in v else None,
)
def test_bad_values_name_the_field_and_the_allowed_values(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(ModelConfig, "tiny", [override])


def test_unknown_preset_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"preset='huge' is unknown: allowed \["):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(ModelConfig, tmp_path / "nope.yaml")


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = ModelConfig.preset("tiny")
    # Tied: the whole embedding is the output matmul; norms are not matmuls.
    matmul = cfg.num_params - 2 * cfg.n_layers * cfg.d_model - cfg.d_model
    attention = 6 * cfg.n_layers * 128 * cfg.n_heads * cfg.head_dim
    assert cfg.flops_per_token(128) == 6 * matmul + attention
