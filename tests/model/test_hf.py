"""HF Llama import: logits match transformers; bad directories fail with a clear message."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tandem.model.bundle import Bundle  # noqa: E402
from tandem.model.hf import HFImportError, import_hf, main  # noqa: E402
from tandem.model.tokenizer import Tokenizer  # noqa: E402

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}


def save_random_llama(directory, *, heads=4, kv_heads=2, tied=False, rope=None, layers=2, seed=0):
    """A randomly initialised LlamaForCausalLM built locally (no download) + a tokenizer."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        bos_token_id=256,
        eos_token_id=257,
        rope_parameters=rope,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    Tokenizer.byte().save(directory)
    return model


CASES = {
    "mha": dict(heads=4, kv_heads=4),
    "gqa2-untied": dict(heads=4, kv_heads=2),
    "gqa4-tied": dict(heads=8, kv_heads=2, tied=True),
    "mqa-llama3-rope": dict(heads=4, kv_heads=1, rope=LLAMA3_ROPE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_imported_logits_match_transformers(tmp_path, case):
    hf_model = save_random_llama(tmp_path / "hf", **CASES[case])
    bundle = Bundle.load(import_hf(tmp_path / "hf", tmp_path / "bundle"))
    tokens = np.random.default_rng(0).integers(0, 300, (2, 48))
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)).logits.numpy()
    got = bundle.logits(tokens)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert bundle.config.tie_embeddings == CASES[case].get("tied", False)
    assert bundle.manifest["source"]["kind"] == "hf"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    save_random_llama(directory, layers=1)
    return directory


def broken_copy(hf_dir, tmp_path, edit_config=None, edit_tensors=None):
    target = tmp_path / "broken"
    shutil.copytree(hf_dir, target)
    if edit_config:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(target / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, target / "model.safetensors")
    return target


@pytest.mark.parametrize(
    ("config_edit", "tensor_edit", "message"),
    [
        (
            lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
            None,
            "architecture 'GPT2LMHeadModel' is not supported",
        ),
        (lambda c: c.update(attention_bias=True), None, "attention_bias=true is not supported"),
        (lambda c: c.update(hidden_act="gelu"), None, "hidden_act='gelu' is not supported"),
        (lambda c: c.pop("hidden_size"), None, "missing key 'hidden_size'"),
        (
            lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
            None,
            "rope_type 'yarn' is not supported",
        ),
        (lambda c: c.update(num_key_value_heads=3), None, "n_kv_heads=3 is invalid"),
        (
            None,
            lambda t: t.pop("model.layers.0.mlp.up_proj.weight"),
            "missing tensor 'model.layers.0.mlp.up_proj.weight'",
        ),
        (
            None,
            lambda t: t.update({"model.norm.weight": np.ones(3, np.float32)}),
            r"tensor 'model.norm.weight' has shape \(3,\), config.json implies \(64,\)",
        ),
        (
            lambda c: c.update(intermediate_size=128),
            None,
            r"tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight' has shape .* config.json "
            r"implies .*128",
        ),
    ],
    ids=[
        "architecture",
        "bias",
        "activation",
        "missing-key",
        "rope-type",
        "kv-heads",
        "missing-tensor",
        "wrong-shape",
        "config-disagrees",
    ],
)
def test_bad_hf_directories_fail_naming_the_problem(
    hf_dir, tmp_path, config_edit, tensor_edit, message
):
    broken = broken_copy(hf_dir, tmp_path, config_edit, tensor_edit)
    with pytest.raises(ValueError, match=message):
        import_hf(broken, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists(), "a failed import must leave no bundle"
    assert not list(tmp_path.glob(".bundle.tmp-*")), "nor a temporary directory"


def test_missing_files_are_named(hf_dir, tmp_path):
    with pytest.raises(HFImportError, match="config.json: missing"):
        import_hf(tmp_path, tmp_path / "bundle")
    no_weights = broken_copy(hf_dir, tmp_path)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(HFImportError, match="no model.safetensors"):
        import_hf(no_weights, tmp_path / "bundle")


def test_cli_imports_to_bfloat16(hf_dir, tmp_path):
    assert main([str(hf_dir), "--out", str(tmp_path / "b"), "--dtype", "bfloat16"]) == 0
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.config.param_dtype == "bfloat16" and bundle.manifest["dtype"] == "bfloat16"
    assert dict(bundle.tensors())["embed"].dtype.name == "bfloat16"


@pytest.mark.parametrize("case", ["gqa2-untied", "gqa4-tied", "mqa-llama3-rope"])
def test_hf_to_tandem_to_hf_is_lossless_and_loads_in_transformers(tmp_path, case):
    from safetensors.numpy import load_file

    from tandem.model.hf import write_hf_dir

    save_random_llama(tmp_path / "hf", **CASES[case])
    bundle = Bundle.load(import_hf(tmp_path / "hf", tmp_path / "bundle"))
    out = write_hf_dir(
        tmp_path / "back", bundle.config, bundle.tokenizer, bundle.tensors(), shard_bytes=20_000
    )  # several shards + index
    original = load_file(tmp_path / "hf" / "model.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    exported = {}
    for file in set(index.values()):
        exported.update(load_file(out / file))
    if CASES[case].get("tied"):
        original.pop("lm_head.weight", None)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(1).integers(0, 300, (1, 20))
    with torch.no_grad():
        expected = reloaded(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(bundle.logits(tokens), expected, atol=1e-4, rtol=0)
    again = Tokenizer.from_dir(out)
    assert (again.bos_id, again.eos_id) == (bundle.tokenizer.bos_id, bundle.tokenizer.eos_id)
