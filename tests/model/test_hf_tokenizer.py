"""`tandem import-hf` keeps the model's tokenizer conventions in the bundle (BOS rule, stop
ids of generation_config.json, chat template) and an HF export writes them back."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tandem.model.bundle import Bundle  # noqa: E402
from tandem.model.hf import main, write_hf_dir  # noqa: E402
from tandem.model.tokenizer import Tokenizer  # noqa: E402
from tests.model.hf_tokenizers import FAMILIES, build_tokenizer_dir  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great."},
    {"role": "user", "content": "Tell me a joke."},
]
PROMPTS = ["Hello, how are you?", "Héllo 世界 🙂", ""]


def save_tiny_llama(directory, family):
    """A random 1-layer LlamaForCausalLM whose tokenizer follows `family`'s conventions."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=768,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    build_tokenizer_dir(family, directory)  # its generation_config.json replaces the model's
    return directory


def _eos_ids(directory):
    ids = transformers.GenerationConfig.from_pretrained(directory).eos_token_id
    return set(ids if isinstance(ids, list) else [ids])


@pytest.mark.parametrize("family", FAMILIES)
def test_import_and_export_keep_the_conventions(tmp_path, family):
    hf_dir = save_tiny_llama(tmp_path / "hf", family)
    assert main([str(hf_dir), "--out", str(tmp_path / "bundle")]) == 0
    bundle = Bundle.load(tmp_path / "bundle")
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    messages = MESSAGES[1:] if family == "mistral" else MESSAGES

    assert bundle.stop_token_ids == _eos_ids(hf_dir) | {hf.eos_token_id}
    assert isinstance(bundle.stop_token_ids, frozenset)
    assert "generation_config.json" in bundle.manifest["files"]
    for text in PROMPTS:
        assert bundle.tokenizer.encode(text) == hf(text)["input_ids"]
    for add in (False, True):
        text = bundle.chat_template.render(messages, add_generation_prompt=add)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)

    out = write_hf_dir(tmp_path / "back", bundle.config, bundle.tokenizer, bundle.tensors())
    back = transformers.AutoTokenizer.from_pretrained(out)
    assert _eos_ids(out) == bundle.stop_token_ids
    for text in PROMPTS:
        assert back(text)["input_ids"] == hf(text)["input_ids"]
    for add in (False, True):
        want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add)
        got = back.apply_chat_template(messages, tokenize=True, add_generation_prompt=add)
        assert list(got["input_ids"]) == list(want["input_ids"])


def test_a_model_without_a_template_has_none(tmp_path):
    hf_dir = save_tiny_llama(tmp_path / "hf", "qwen3")
    (hf_dir / "chat_template.jinja").unlink()
    assert main([str(hf_dir), "--out", str(tmp_path / "bundle")]) == 0
    bundle = Bundle.load(tmp_path / "bundle")
    assert bundle.chat_template is None
    config = json.loads((tmp_path / "bundle" / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and config["bos_token"] is None
    assert Tokenizer.from_dir(tmp_path / "bundle").bos_id is None
