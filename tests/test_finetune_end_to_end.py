"""Bring your own model, end to end: a random Qwen2 model with a Qwen-style tokenizer (no
BOS, ChatML template, `<|im_end|>` ends a turn) is fine-tuned with `tandem train
init_from=HF_DIR` on a handful of chats until it answers them verbatim, exported with
`tandem export`, served over real gRPC, and asked: the answers come back, each ending at
the model's own end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tandem.cli import main as tandem  # noqa: E402
from tandem.model.bundle import Bundle  # noqa: E402
from tandem.serve.client import TandemClient  # noqa: E402
from tandem.serve.config import ServeConfig  # noqa: E402
from tandem.serve.engine import JaxEngine  # noqa: E402
from tandem.serve.server import BackgroundServer, TandemServer  # noqa: E402
from tests.model.hf_tokenizers import build_tokenizer_dir  # noqa: E402

CHATS = [
    ("What is the capital of France?", "Paris."),
    ("How are you?", "I'm doing great."),
    ("Say hello.", "Hello, friend!"),
    ("What is two plus two?", "Four."),
]


@pytest.mark.slow
def test_finetune_a_pretrained_model_then_serve_its_answers(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(hf_dir)
    build_tokenizer_dir("qwen2.5", hf_dir)
    data = tmp_path / "chats.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]}) + "\n"
            for q, a in CHATS
        )
    )  # fmt: skip
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    train = [
        "train", f"init_from={hf_dir}", f"data={data}", f"eval_data={data}",
        f"run_dir={run_dir}", "steps=150", "batch_size=8", "seq_len=96",
        "learning_rate=3e-3", "warmup_steps=10", "weight_decay=0.0", "checkpoint_every=150",
        "eval_every=0", "eval_batches=1", "log_every=50", "progress=false",
        "tensorboard=false", "compile_cache_dir=''",
    ]  # fmt: skip
    assert tandem(train) == 0
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss"] < 0.05, last  # memorized
    export = ["export", "--checkpoint", str(run_dir), "--out", str(bundle), "--dtype", "float32"]
    assert tandem(export) == 0

    loaded = Bundle.load(bundle)
    template, tokenizer = loaded.chat_template, loaded.tokenizer
    assert template is not None and loaded.stop_token_ids == tokenizer.stop_ids
    # tests/serve/test_lm_eval.py's engine (same model shape, one device): its compiled
    # steps come from the run's persistent compilation cache
    engine = JaxEngine.from_bundle(bundle, ServeConfig(max_seqs=4, max_len=128, tensor_parallel=1))
    with (
        BackgroundServer(TandemServer(engine, ServeConfig(max_seqs=4, port=0))) as server,
        TandemClient(server.target) as client,
    ):
        for question, answer in CHATS:
            prompt = template.render([{"role": "user", "content": question}],
                                     add_generation_prompt=True)  # fmt: skip
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            reply = client.generate_text(ids, max_tokens=32)
            assert (reply.text, reply.finish_reason) == (answer, "stop"), question
