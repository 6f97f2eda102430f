"""A run trained with a model's own tokenizer directory (Qwen-style: no BOS, ChatML template,
two stop ids) exports bundles and HF directories that keep those conventions."""

import pytest

from tandem.config import load_config
from tandem.model.bundle import Bundle
from tandem.model.tokenizer import Tokenizer
from tandem.train.config import TrainConfig
from tandem.train.export import ExportConfig, export
from tandem.train.loop import run
from tests.model.hf_tokenizers import build_tokenizer_dir
from tests.train.train_helpers import SMALL

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, how are you?"},
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tok_dir = build_tokenizer_dir("qwen2.5", tmp_path_factory.mktemp("tok"))
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [*SMALL, f"tokenizer={tok_dir}", "model.vocab_size=408", "steps=2"]
    overrides += ["checkpoint_every=2", "eval_every=0", "eval_batches=1", "async_checkpoint=false"]
    run(load_config(TrainConfig, "tiny", [*overrides, f"run_dir={run_dir}"]))
    return tok_dir, run_dir


@pytest.mark.parametrize("fmt", ["tandem", "hf"])
def test_export_keeps_the_tokenizer_conventions(trained, tmp_path, fmt):
    tok_dir, run_dir = trained
    source = Tokenizer.from_dir(tok_dir)
    out, _ = export(
        ExportConfig(checkpoint=str(run_dir), out=str(tmp_path / fmt), format=fmt, eval_batches=0)
    )
    exported = Bundle.load(out).tokenizer if fmt == "tandem" else Tokenizer.from_dir(out)
    assert exported.bos_id is None and exported.stop_ids == source.stop_ids
    assert len(source.stop_ids) == 2
    for add in (False, True):
        want = source.chat_template.render(MESSAGES, add_generation_prompt=add)
        assert exported.chat_template.render(MESSAGES, add_generation_prompt=add) == want
    assert exported.encode("Hello, how are you?") == source.encode("Hello, how are you?")
    if fmt == "hf":
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoTokenizer.from_pretrained(out)
        assert hf("Hello")["input_ids"] == source.encode("Hello")
        ids = transformers.GenerationConfig.from_pretrained(out).eos_token_id
        assert set(ids) == source.stop_ids
