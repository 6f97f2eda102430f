"""Fine-tuning data: record shapes, loss masks through packing, skipped records, and a
mask that really removes masked targets from the gradient."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem.config import load_config
from tandem.model.tokenizer import Tokenizer
from tandem.train import data as tdata
from tandem.train.config import TrainConfig
from tandem.train.loop import Trainer
from tandem.train.mesh import make_mesh
from tandem.train.sft import ExampleEncoder, SkipRecord, record_format

from .train_helpers import SMALL, metrics, run_inprocess

TOK = Tokenizer.byte()
ENCODER = ExampleEncoder(TOK)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_completion_masks_the_prompt() -> None:
    ids, mask = ENCODER({"prompt": "Q: hi", "completion": " A: yo"})
    prompt = TOK.encode("Q: hi")
    assert ids.tolist() == [*prompt, *TOK.encode(" A: yo", add_special_tokens=False), TOK.eos_id]
    assert mask.tolist() == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
    ids, mask = ENCODER("plain text")
    assert mask.all() and ids[-1] == TOK.eos_id
    with pytest.raises(SkipRecord, match="completion"):
        ENCODER({"prompt": "Q", "completion": ""})
    with pytest.raises(ValueError, match="need the model's chat template"):
        ENCODER({"messages": [{"role": "user", "content": "hi"}]})


def test_record_shape_is_detected_per_file(tmp_path) -> None:
    assert record_format(write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}]), "text") == "text"
    pc = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}])
    assert record_format(pc, "text") == "prompt_completion"
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": []}])
    assert record_format(chat, "text") == "messages"
    with pytest.raises(ValueError, match=r"d.jsonl: records have keys \['question'\]"):
        record_format(write_jsonl(tmp_path / "d.jsonl", [{"question": "?"}]), "text")


def test_packing_keeps_whole_examples_their_mask_and_segments(tmp_path) -> None:
    records = [{"prompt": "p" * n, "completion": "c" * m} for n, m in [(5, 4), (3, 9), (8, 2)]]
    path = write_jsonl(tmp_path / "pc.jsonl", records * 4)
    source = tdata.DocumentSource(tdata._refs_for([path], "text", "data"), "text", "pc")
    T = 24
    batch = next(tdata.PackedBatches(source, ENCODER, seq_len=T, batch_size=1, rows=[0], seed=0))
    segs, weights, tokens = batch["segment_ids"][0], batch["weights"][0], batch["tokens"][0]
    pieces = [np.flatnonzero(segs == s) for s in np.unique(segs[segs > 0])]
    for where in pieces:  # each piece is one whole example: BOS first, EOS last
        assert tokens[where[0]] == TOK.bos_id and tokens[where[-1]] == TOK.eos_id
        completion = (tokens[where] == ord("c")).sum() + 1  # + EOS
        assert weights[where].sum() == completion  # targets = completion tokens + EOS
    padding = segs == 0
    assert padding.any() and not weights[padding].any()  # the row's tail did not fit a record


def test_unusable_records_are_skipped_and_counted(tmp_path, caplog) -> None:
    good = {"prompt": "p", "completion": "c"}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [good, {"prompt": "p", "completion": ""}] * 3)
    too_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 40, "completion": "c"}])
    source = tdata.DocumentSource(tdata._refs_for([mixed], "text", "data"), "text", "m")
    with caplog.at_level(logging.WARNING, logger="tandem.train.data"):
        kept = tdata.drop_unusable(source, ENCODER, seq_len=16)
    assert len(kept) == 3 and "mixed.jsonl: skipped 3 record(s)" in caplog.text
    source = tdata.DocumentSource(tdata._refs_for([too_long], "text", "data"), "text", "l")
    with pytest.raises(ValueError, match=r"long.jsonl has no usable record .*no loss token"):
        tdata.drop_unusable(source, ENCODER, seq_len=16)


def test_masked_targets_contribute_no_gradient() -> None:
    cfg = load_config(TrainConfig, "tiny", [*SMALL, "batch_size=8", "seq_len=16"])
    trainer = Trainer(cfg, make_mesh(cfg))
    params = trainer.init_state(0)["params"]
    rng = np.random.default_rng(0)
    shape = (cfg.batch_size, cfg.seq_len)
    batch = {
        "tokens": rng.integers(0, 259, shape),
        "targets": rng.integers(0, 259, shape),
        "weights": (rng.random(shape) < 0.5).astype(np.float32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(cfg.seq_len), shape),
    }
    grad = jax.jit(jax.grad(lambda p, b: trainer._loss_sums(p, b)[0]))

    def grads_of(b: dict) -> list[np.ndarray]:
        b = {k: jnp.asarray(v, jnp.float32 if k == "weights" else jnp.int32) for k, v in b.items()}
        return [np.asarray(g) for g in jax.tree.leaves(grad(params, b))]

    other_targets = np.where(batch["weights"] > 0, batch["targets"], rng.integers(0, 259, shape))
    for a, b in zip(grads_of(batch), grads_of({**batch, "targets": other_targets}), strict=True):
        np.testing.assert_array_equal(a, b)  # what lies under the mask changes nothing
    masked = grads_of({**batch, "weights": np.zeros(shape, np.float32)})
    assert all(not g.any() for g in masked)


def test_metrics_report_loss_tokens_per_step(tmp_path) -> None:
    records = [{"prompt": f"question {i}?", "completion": f" answer {i}."} for i in range(40)]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    run_inprocess(tmp_path / "run", f"data={data}", "steps=2", "seq_len=32", "log_every=1")
    rows = metrics(tmp_path / "run")
    source, _ = tdata.load_sources(str(data), None, 20, "text")
    batches = tdata.PackedBatches(source, ENCODER, seq_len=32, batch_size=8, rows=range(8), seed=0)
    for row in rows:
        assert row["loss_tokens"] == next(batches)["weights"].sum() > 0


CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great."},
    {"role": "user", "content": "How can I help you today?"},
    {"role": "assistant", "content": "Answer the questions politely."},
]


@pytest.mark.parametrize("family", ["llama3", "qwen2.5", "qwen3", "mistral"])
def test_chat_ids_and_mask_match_transformers(family, tmp_path) -> None:
    """Token ids are apply_chat_template's; the mask covers exactly what transformers'
    renderings add for each assistant turn (prompt ids with the generation prompt vs
    the ids up to and including the turn)."""
    transformers = pytest.importorskip("transformers")
    from tests.model.hf_tokenizers import build_tokenizer_dir

    directory = build_tokenizer_dir(family, tmp_path / family)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    messages = CHAT[1:] if family == "mistral" else CHAT  # its v0.3 template drops a system

    def hf_ids(msgs: list[dict], prompt: bool = False) -> list[int]:
        out = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    ids, mask = ExampleEncoder(Tokenizer.from_dir(directory))({"messages": messages})
    assert ids.tolist() == hf_ids(messages)
    if family == "qwen3":  # renders the last turn with an empty think block, others without
        assert hf.decode(ids[mask]) == (
            "I'm doing great.<|im_end|>\n"
            "<think>\n\n</think>\n\nAnswer the questions politely.<|im_end|>\n"
        )
        return
    expected = np.zeros(len(ids), bool)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            expected[len(hf_ids(messages[:i], prompt=True)) : len(hf_ids(messages[: i + 1]))] = 1
    assert mask.tolist() == expected.tolist()
    answers = hf.decode(ids[mask])
    assert "I'm doing great." in answers and "Answer the questions politely." in answers
    assert "Hello" not in answers and "help you" not in answers


def test_a_chat_without_an_assistant_turn_is_skipped(tmp_path) -> None:
    from tests.model.hf_tokenizers import build_tokenizer_dir

    encoder = ExampleEncoder(Tokenizer.from_dir(build_tokenizer_dir("qwen2.5", tmp_path / "q")))
    with pytest.raises(SkipRecord, match="no assistant turn"):
        encoder({"messages": CHAT[:2]})
    with pytest.raises(SkipRecord, match="the chat template failed"):
        encoder({"messages": [{"role": "user", "content": 3}, {"wrong": True}]})
