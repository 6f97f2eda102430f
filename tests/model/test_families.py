"""Model families next to Llama (Mistral, Qwen2, Qwen3): import -> logits parity with
transformers, write_hf_dir -> transformers reload parity, refusals that name the key, the
switches in every mode of the one Transformer, and bundles written before the switches."""

import json
import random
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from tandem.config import fingerprint, load_config
from tandem.model.bundle import Bundle, flat_params, model_from_tensors, write_bundle
from tandem.model.config import ModelConfig
from tandem.model.sharding import param_shardings
from tandem.model.tokenizer import Tokenizer
from tandem.model.transformer import Transformer, init_paged_cache
from tests.model.test_paged_step import (
    NUM_PAGES,
    PAGE_SIZE,
    assert_logits_close,
    full_logits,
    jitted_step,
    run_schedule,
    scenario,
)
from tests.model.test_transformer import SMALL, make, positions_for

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tandem.model.hf import (  # noqa: E402
    FAMILIES,
    HFImportError,
    config_from_hf,
    import_hf,
    write_hf_dir,
)

VOCAB = 300
CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
}


def hf_config(family, *, tied=False, layers=2, **extra):
    """A tiny transformers config of `family` (GQA; Qwen3 with head_dim decoupled from
    hidden_size / heads, as the real ones have)."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        bos_token_id=256,
        eos_token_id=257,
    )
    if family == "qwen3":
        kwargs["head_dim"] = 32  # != 64 / 4
    if family == "mistral":
        kwargs["sliding_window"] = None  # v0.3: full attention
    return getattr(transformers, CONFIG_CLASSES[family])(**{**kwargs, **extra})


def save_random(directory, family, *, seed=0, **config):
    """A random causal LM of `family` built locally (no download), saved with a tokenizer.
    transformers initialises norms to 1 and biases to 0, which would hide a bias or q/k
    norm that is ignored or misplaced; they are drawn at random too."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    Tokenizer.byte().save(directory)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


CASES = {
    "mistral-untied": dict(family="mistral"),
    "mistral-tied": dict(family="mistral", tied=True),
    "qwen2-tied": dict(family="qwen2", tied=True),
    "qwen2-untied": dict(family="qwen2"),
    "qwen2-unused-window": dict(family="qwen2", use_sliding_window=False, sliding_window=16),
    "qwen3-tied": dict(family="qwen3", tied=True),
    "qwen3-untied": dict(family="qwen3"),
    "llama-tied": dict(family="llama", tied=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_and_exports_back(tmp_path, case):
    spec = dict(CASES[case])
    family = spec.pop("family")
    hf_model = save_random(tmp_path / "hf", family, **spec)
    bundle = Bundle.load(import_hf(tmp_path / "hf", tmp_path / "bundle"))
    cfg = bundle.config
    assert cfg.family == family and cfg.tie_embeddings == spec.get("tied", False)
    assert (cfg.attention_bias, cfg.qk_norm) == (family == "qwen2", family == "qwen3")
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 40))
    got = bundle.logits(tokens)
    np.testing.assert_allclose(got, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)

    out = write_hf_dir(tmp_path / "back", cfg, bundle.tokenizer, bundle.tensors())
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == family
    assert written["architectures"] == [FAMILIES[family].architecture]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == FAMILIES[family].architecture
    np.testing.assert_allclose(hf_logits(reloaded, tokens), got, atol=1e-4, rtol=0)
    # and the exported directory holds exactly the original tensors
    original = dict(hf_model.state_dict())
    exported = dict(reloaded.state_dict())
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name].numpy(), tensor.numpy(), err_msg=name)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """One 1-layer checkpoint per family, for the refusal tests."""
    root = tmp_path_factory.mktemp("families")
    for family in CONFIG_CLASSES:
        save_random(root / family, family, layers=1)
    return root


def edited_copy(hf_dirs, family, tmp_path, config_edit=None, tensor_edit=None):
    target = tmp_path / family
    shutil.copytree(hf_dirs / family, target)
    if config_edit:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    if tensor_edit:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(target / "model.safetensors")
        tensor_edit(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _set(**values):
    return lambda c: c.update(values)


def _drop(key):
    return lambda c: c.pop(key)


REFUSALS = {
    "mistral-window": ("mistral", _set(sliding_window=4096), None, "sliding_window=4096"),
    "mistral-window-default": (
        "mistral",
        _drop("sliding_window"),
        None,
        r"sliding_window=4096 is not supported \(supported: null \(the default when",
    ),
    "qwen2-window": ("qwen2", _set(use_sliding_window=True), None, "use_sliding_window=true"),
    "qwen3-layer-types": (
        "qwen3",
        _set(layer_types=["sliding_attention"]),
        None,
        r"layer_types=\[\"sliding_attention\"\] is not supported",
    ),
    "qwen3-bias": ("qwen3", _set(attention_bias=True), None, "attention_bias=true"),
    "llama-mlp-bias": ("llama", _set(mlp_bias=True), None, "mlp_bias=true"),
    "num-experts": ("qwen3", _set(num_experts=8), None, "num_experts=8"),
    "num-local-experts": ("mistral", _set(num_local_experts=8), None, "num_local_experts=8"),
    "moe-key": ("qwen2", _set(moe_intermediate_size=32), None, "moe_intermediate_size=32"),
    "unknown-model-type": (
        "qwen2",
        lambda c: c.update(model_type="qwen2_moe", architectures=None),
        None,
        r"model_type='qwen2_moe' is not supported \(supported: 'llama', 'mistral', 'qwen2'",
    ),
    "unknown-architecture": (
        "qwen3",
        _set(architectures=["Qwen3MoeForCausalLM"]),
        None,
        "architecture 'Qwen3MoeForCausalLM' is not supported",
    ),
    "not-a-causal-lm": (
        "qwen2",
        _set(architectures=["Qwen3ForCausalLM"]),
        None,
        "architecture 'Qwen3ForCausalLM' does not match model_type='qwen2'",
    ),
    "rope-type": (
        "qwen2",
        _set(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
        None,
        r"rope_type 'yarn' is not supported \(supported: 'default', 'llama3'\)",
    ),
    "rope-key": (
        "qwen3",
        _set(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
        None,
        "rope_parameters.partial_rotary_factor=0.5 is not supported",
    ),
    "rope-scaling-4x": (
        "mistral",
        lambda c: c.update(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2}),
        None,
        "rope_type 'linear' is not supported",
    ),
    "activation": ("qwen3", _set(hidden_act="gelu"), None, "hidden_act='gelu'"),
    "quantized": (
        "qwen2",
        _set(quantization_config={"quant_method": "awq", "bits": 4}),
        None,
        "quantization_config='awq' is not supported",
    ),
    "unmapped-tensor": (
        "qwen3",
        None,
        lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}),
        "tensor 'model.layers.0.self_attn.o_proj.bias' .* has no place in a 'qwen3' model",
    ),
    "missing-bias": (
        "qwen2",
        None,
        lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"),
        "missing tensor 'model.layers.0.self_attn.k_proj.bias'",
    ),
    "missing-q-norm": (
        "qwen3",
        None,
        lambda t: t.pop("model.layers.0.self_attn.q_norm.weight"),
        "missing tensor 'model.layers.0.self_attn.q_norm.weight'",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unmapped_configs_are_refused_naming_the_key(hf_dirs, tmp_path, case):
    family, config_edit, tensor_edit, message = REFUSALS[case]
    broken = edited_copy(hf_dirs, family, tmp_path, config_edit, tensor_edit)
    with pytest.raises(HFImportError, match=message):
        import_hf(broken, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists(), "a failed import must leave no bundle"


# config.json keys tandem reads that transformers fills in when absent (per family).
OPTIONAL_KEYS = (
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
)


def _read(config):
    try:
        return config_from_hf(config)
    except HFImportError as err:
        return type(err)


@pytest.mark.parametrize("family", list(CONFIG_CLASSES))
def test_absent_keys_mean_what_transformers_defaults_them_to(family):
    cls = getattr(transformers, CONFIG_CLASSES[family])
    # 32 heads of 8 dims, 8 kv heads: every family's defaults give a valid model here
    full = cls(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        sliding_window=None,
    ).to_dict()
    assert config_from_hf(full).family == family
    checked = 0
    for key in OPTIONAL_KEYS:
        if key not in full:
            continue
        stripped = {k: v for k, v in full.items() if k != key}
        theirs = cls.from_dict(stripped).to_dict()
        assert _read(stripped) == _read(theirs), key
        checked += 1
    assert checked >= 7


def test_switches_need_their_family_to_be_written_as_hf(tmp_path):
    cfg = load_config(ModelConfig, "tiny", ["qk_norm=true"])  # family llama
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"qk_norm=True is invalid: allowed False for "):
        write_hf_dir(tmp_path / "x", cfg, Tokenizer.byte(), flat_params(nnx.state(model)))
    both = load_config(ModelConfig, "tiny", ["family=qwen3", "qk_norm=true", "attention_bias=true"])
    with pytest.raises(ValueError, match=r"attention_bias=True .* \['qwen2'\]"):
        write_hf_dir(tmp_path / "y", both, Tokenizer.byte(), [])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# -- the switches in the one Transformer --------------------------------------------------

SWITCHES = ["attention_bias=true", "qk_norm=true"]


def randomized(model):
    """Draws the switch params (zero biases, unit norms at init) at random, so a test
    fails if one of them is ignored."""
    layers = model.layers
    key = jax.random.key(7)
    for name in ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm"):
        key, sub = jax.random.split(key)
        var = getattr(layers, name)
        value = var.get_value()
        var.set_value(value + 0.5 * jax.random.normal(sub, value.shape, value.dtype))
    return model


def test_switch_params_have_their_shapes_and_shardings():
    cfg, model = make(SWITCHES)
    params = nnx.state(model, nnx.Param)
    shapes = {name: value.shape for name, value in flat_params(params)}
    L, N, K, H = 2, 4, 2, 16
    assert shapes["layers.q_bias"] == (L, N, H)
    assert shapes["layers.k_bias"] == shapes["layers.v_bias"] == (L, K, H)
    assert shapes["layers.q_norm"] == shapes["layers.k_norm"] == (L, H)
    mesh = jax.make_mesh(
        (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    specs = param_shardings(params, mesh)["layers"]
    assert specs["q_bias"].get_value().spec == jax.P(None, "tensor", None)
    assert specs["k_bias"].get_value().spec == jax.P(None, "tensor", None)
    assert specs["q_norm"].get_value().spec == jax.P(None, None)
    n = cfg.n_layers * (cfg.head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads) + 2 * cfg.head_dim)
    assert cfg.num_params == load_config(ModelConfig, "tiny", SMALL).num_params + n
    assert cfg.num_params == sum(v.size for _, v in flat_params(params))


def test_switches_change_the_model_and_both_modes_agree():
    """Training forward and serving step (prompt chunks and decode rows over the paged
    cache, as in test_paged_step.py) give the same logits with the switches on."""
    cfg, model = make(SWITCHES)
    model = randomized(model)
    tokens = jax.random.randint(jax.random.key(1), (3, 14), 0, cfg.vocab_size)
    full = jax.jit(lambda t: model(t, positions_for(t)))(tokens)
    plain = load_config(ModelConfig, "tiny", SMALL)
    # the same weights without the switch params: different logits (the switches act)
    switch_params = {f"layers.{n}" for n in ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm")}
    params = dict(flat_params(nnx.state(model, nnx.Param)))
    base = model_from_tensors(plain, {k: v for k, v in params.items() if k not in switch_params})
    assert np.max(np.abs(base(tokens, positions_for(tokens)) - full)) > 0.1
    seqs, schedule = scenario(random.Random(0), cfg.vocab_size)
    graphdef, params = nnx.split(model, nnx.Param)
    cache = init_paged_cache(cfg, NUM_PAGES, PAGE_SIZE)
    got = run_schedule(jitted_step(graphdef), params, cache, seqs, schedule)
    want = [full_logits(model, seq.tokens) for seq in seqs]
    for i, pos, logits in got:
        assert_logits_close(logits, want[i][pos])


@pytest.mark.parametrize("impl", ["reference", "pallas_interpret"])
def test_switches_sharded_forward_equals_single_device(impl):
    cfg, model = make([*SWITCHES, f"attention_impl={impl}"])
    model = randomized(model)
    tokens = jax.random.randint(jax.random.key(5), (4, 16), 0, cfg.vocab_size)
    expected = model(tokens, positions_for(tokens))
    graphdef, params = nnx.split(model, nnx.Param)
    mesh = jax.make_mesh(
        (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    sharded = jax.device_put(params, param_shardings(params, mesh))

    @jax.jit
    def forward(params, tokens):
        return nnx.merge(graphdef, params)(tokens, positions_for(tokens))

    with jax.set_mesh(mesh):
        got = forward(sharded, tokens)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_int8_keeps_biases_and_norms_in_float(tmp_path):
    from tandem.model.quant import quantize_tensors

    cfg, model = make([*SWITCHES, "init_std=0.1"])
    model = randomized(model)
    tensors = quantize_tensors(flat_params(nnx.state(model, nnx.Param)))
    qcfg = load_config(ModelConfig, {**cfg.to_dict(), "quantization": "int8"})
    bundle = Bundle.load(
        write_bundle(
            tmp_path / "q", qcfg, Tokenizer.byte(), tensors, source={}, quantization="int8"
        )
    )
    stored = dict(bundle.tensors())
    for name in ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm"):
        assert stored[f"layers.{name}"].dtype == np.float32, name
        assert f"layers.{name}_scale" not in stored
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size))
    expected = np.asarray(model(tokens, positions_for(tokens)))
    got = bundle.logits(tokens)
    # docs/export.md's int8 tolerance
    assert np.max(np.abs(got - expected)) < 0.02 * float(np.ptp(expected))


# -- bundles written before the switches existed -----------------------------------------


def test_bundle_written_before_the_switches_still_loads(tmp_path):
    from tests.model.test_bundle import CFG, write

    model = Transformer(CFG, rngs=nnx.Rngs(0))
    path = write(model, tmp_path / "old")
    # Rewrite it as today's main wrote it: config.json without the new keys, the manifest's
    # hashes of that file and of that config.
    old_config = {
        k: v for k, v in CFG.to_dict().items() if k not in ("family", "attention_bias", "qk_norm")
    }
    (path / "config.json").write_text(json.dumps(old_config, indent=2) + "\n")
    manifest = json.loads((path / "manifest.json").read_text())
    import hashlib

    manifest["files"]["config.json"] = hashlib.sha256(
        (path / "config.json").read_bytes()
    ).hexdigest()
    manifest["config_sha256"] = fingerprint(old_config)
    (path / "manifest.json").write_text(json.dumps(manifest))
    bundle = Bundle.load(path)
    assert bundle.config == CFG and bundle.config.family == "llama"
    assert not bundle.config.attention_bias and not bundle.config.qk_norm
    tokens = np.array([[256, 1, 2, 3]], np.int32)
    np.testing.assert_allclose(
        bundle.logits(tokens), model(tokens, positions_for(tokens)), atol=1e-6
    )


def test_the_switches_count_in_the_fingerprint():
    base = load_config(ModelConfig, "tiny")
    assert base.fingerprint() == fingerprint(
        {
            k: v
            for k, v in base.to_dict().items()
            if k not in ("family", "attention_bias", "qk_norm")
        }
    )
    variants = [
        load_config(ModelConfig, "tiny", [o])
        for o in ("family=mistral", "attention_bias=true", "qk_norm=true")
    ]
    assert len({base.fingerprint(), *(v.fingerprint() for v in variants)}) == 4
