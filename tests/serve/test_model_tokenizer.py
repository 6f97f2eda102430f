"""Serving with the model's own tokenizer conventions, against transformers over real gRPC.

A tiny random Llama-architecture model paired with a Qwen-style tokenizer (no BOS token,
`<|im_end|>` / `<|endoftext|>` stops from generation_config.json) goes through
`tandem import-hf`, `JaxEngine.from_bundle` and `TandemServer`: a prompt string is tokenized
exactly as `AutoTokenizer(prompt)` (no BOS), served greedy output equals transformers'
greedy `generate`, and every stop id of generation_config.json ends the stream.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tandem.model.bundle import Bundle  # noqa: E402
from tandem.model.hf import import_hf  # noqa: E402
from tandem.serve.client import TandemClient  # noqa: E402
from tandem.serve.config import ServeConfig  # noqa: E402
from tandem.serve.engine import JaxEngine  # noqa: E402
from tandem.serve.server import BackgroundServer, TandemServer  # noqa: E402
from tests.model.hf_tokenizers import build_tokenizer_dir  # noqa: E402

PROMPTS = ["Hello, how are you?", "The quick brown fox", "Héllo 世界 🙂", "x"]
NEW_TOKENS = 10
STOP_PROMPT = "What is the capital of France?"
STOP_AT = 3  # the stop token added to generation_config is the 4th greedy token of STOP_PROMPT


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    """transformers' forward, argmax, no stop token: the continuation to choose a stop from."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(AutoTokenizer, transformers model, client, stop id) around one served bundle."""
    root = tmp_path_factory.mktemp("qwen-style")
    hf_dir = root / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,  # a random model whose greedy output is not one token repeated
    )
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    build_tokenizer_dir("qwen2.5", hf_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()

    # A stop id the model really emits: a token of STOP_PROMPT's greedy continuation that
    # is new at position STOP_AT, added to generation_config.json's eos_token_id.
    continuation = _greedy(model, hf_tok(STOP_PROMPT)["input_ids"], STOP_AT + 1)
    stop = continuation[STOP_AT]
    assert stop not in continuation[:STOP_AT], continuation
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert stop not in generation["eos_token_id"]
    generation["eos_token_id"].append(stop)
    (hf_dir / "generation_config.json").write_text(json.dumps(generation))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()

    bundle_dir = import_hf(hf_dir, root / "bundle")
    assert Bundle.load(bundle_dir).tokenizer.bos_id is None
    cfg = ServeConfig(port=0, max_seqs=2, max_len=64, max_prompt_len=32, tensor_parallel=1)
    engine = JaxEngine.from_bundle(bundle_dir, cfg)
    engine.warmup()
    bg = BackgroundServer(TandemServer(engine, cfg)).start()
    client = TandemClient(bg.target)
    yield hf_tok, model, client, stop
    client.close()
    bg.stop(grace=2.0)


def _hf_generate(model, ids: list[int], **kw) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, **kw)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_served_greedy_equals_transformers_generate(served, prompt):
    hf_tok, model, client, _ = served
    ids = hf_tok(prompt)["input_ids"]
    assert hf_tok.bos_token_id is None and ids  # a no-BOS tokenizer
    chunks = list(client.generate(prompt, max_tokens=NEW_TOKENS, temperature=0.0))
    tokens = [t for c in chunks for t in c.token_ids]
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert client.tokenize(prompt, add_special_tokens=True) == ids
    assert tokens == _hf_generate(model, ids)


def test_generation_config_stop_ids_end_the_stream(served):
    hf_tok, model, client, stop = served
    ids = hf_tok(STOP_PROMPT)["input_ids"]
    info = client.model_info()
    assert not info.HasField("bos_id")
    assert stop in info.stop_token_ids
    assert set(info.stop_token_ids) == {*model.generation_config.eos_token_id, hf_tok.eos_token_id}

    chunks = list(client.generate(STOP_PROMPT, max_tokens=NEW_TOKENS, temperature=0.0))
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == _hf_generate(model, ids)  # transformers stops there too
    assert len(tokens) == STOP_AT + 1 and tokens[-1] == stop
    assert chunks[-1].finish_reason == "stop" and chunks[-1].matched_stop == str(stop)

    # ignore_eos ignores every stop id: the stream runs to max_tokens, through the stop, and
    # equals transformers' plain argmax decode.
    chunks = list(
        client.generate(STOP_PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    )
    tokens = [t for c in chunks for t in c.token_ids]
    assert chunks[-1].finish_reason == "length" and tokens[STOP_AT] == stop
    assert tokens == _greedy(model, ids, NEW_TOKENS)
