import json
import random

import pytest

from tandem.model.tokenizer import IncrementalDetokenizer, Tokenizer, main
from tests.model.hf_tokenizers import FAMILIES, build_tokenizer_dir

TEXTS = ["plain ascii", "héllo wörld", "中文字符和 emoji 🎉🚀", "mixed\nlines\ttabs ✓", ""]


@pytest.fixture(scope="module")
def bpe():
    corpus = [t * 20 for t in TEXTS] + ["def f(x):\n    return x + 1\n" * 50]
    return Tokenizer.train_bpe(texts=corpus, vocab_size=320)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_and_ids_are_bytes(text):
    tok = Tokenizer.byte()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[1:] == list(text.encode())
    assert tok.decode(ids) == text


def test_special_tokens_follow_the_bytes():
    tok = Tokenizer.byte()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.encode("a", add_special_tokens=False) == [97]


def test_bpe_compresses_and_round_trips_through_disk(bpe, tmp_path):
    text = "def f(x):\n    return x + 1\n"
    assert len(bpe.encode(text)) < len(text.encode())
    bpe.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(text) == bpe.encode(text)
    assert (again.bos_id, again.eos_id) == (bpe.bos_id, bpe.eos_id)
    for t in TEXTS:
        assert again.decode(again.encode(t)) == t


@pytest.mark.parametrize("kind", ["byte", "bpe"])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_never_emits_broken_characters(kind, text, bpe):
    tok = Tokenizer.byte() if kind == "byte" else bpe
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in tok.encode(text)] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_special_tokens_show_only_when_not_skipped(tmp_path):
    """vLLM's skip_special_tokens: Mistral's `[TOOL_CALLS]` (a control token) reaches the
    text only when asked for, as the tokenizer's own decode writes it."""
    tok = Tokenizer.from_dir(build_tokenizer_dir("mistral", tmp_path))
    ids = tok.encode("Sure. [TOOL_CALLS] [{}] héllo", add_special_tokens=False)
    assert tok.hf.token_to_id("[TOOL_CALLS]") in ids
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        text = "".join(detok.push(i) for i in ids) + detok.flush()
        assert text == tok.hf.decode(ids, skip_special_tokens=skip)
        assert ("[TOOL_CALLS]" in text) is not skip


def test_multibyte_character_is_held_until_complete():
    tok = Tokenizer.byte()
    detok = IncrementalDetokenizer(tok)
    first, second, third = "世".encode()
    assert detok.push(first) == "" and detok.push(second) == ""
    assert detok.push(third) == "世"


def test_invalid_bytes_surface_as_replacement_at_flush():
    detok = IncrementalDetokenizer(Tokenizer.byte())
    assert detok.push(0xE4) == ""  # a lead byte that never completes
    assert detok.flush() == "\ufffd"


def test_random_streams_reassemble_exactly():
    tok = Tokenizer.byte()
    rng = random.Random(0)
    alphabet = "aé世🎉 \n"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        detok = IncrementalDetokenizer(tok)
        out = (
            "".join(detok.push(i) for i in tok.encode(text, add_special_tokens=False))
            + detok.flush()
        )
        assert out == text


def test_from_dir_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json: missing"):
        Tokenizer.from_dir(tmp_path)
    Tokenizer.byte().hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="cannot tell the eos token"):
        Tokenizer.from_dir(tmp_path)


def test_train_cli_writes_a_loadable_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = [f"the lazy dog {i} {i * 7919 % 1000:x} quick brown fox" for i in range(2000)]
    (corpus / "a.txt").write_text("\n".join(words))
    assert (
        main(
            ["train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")]
        )
        == 0
    )
    tok = Tokenizer.from_dir(tmp_path / "tok")
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    with pytest.raises(ValueError, match="allowed >= 259"):
        Tokenizer.train_bpe(texts=["x"], vocab_size=10)


# -- the model's own conventions, against transformers ------------------------------------

PROMPTS = [
    "Hello, how are you?",
    " leading space and  double  spaces",
    "Héllo 世界 🙂\n\nnew lines\ttabs",
    "<|im_start|>user\nhi<|im_end|> [INST] hi [/INST] <s>x</s> <|begin_of_text|>",
    "",
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    directory = build_tokenizer_dir(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, directory, transformers.AutoTokenizer.from_pretrained(directory)


def test_encode_is_autotokenizer(family):
    """BOS where the family's post-processor adds one (Llama 3, Mistral), none for Qwen."""
    name, directory, hf = family
    tok = Tokenizer.from_dir(directory)
    for text in PROMPTS:
        assert tok.encode(text) == hf(text)["input_ids"], (name, text)
        plain = hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, add_special_tokens=False) == plain, (name, text)
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    starts_with_bos = tok.encode("hi")[0] == tok.bos_id
    assert starts_with_bos == (name in ("llama3", "mistral"))
    assert (tok.bos_id is None) == name.startswith("qwen")


def test_streamed_text_is_transformers_decode(family):
    """Token by token, each family's text (SentencePiece spaces and byte fallback for
    Mistral, byte-level BPE for Llama 3 and Qwen, special tokens skipped) comes out as
    transformers decodes the whole sequence, never with a broken character."""
    name, directory, hf = family
    tok = Tokenizer.from_dir(directory)
    for text in PROMPTS:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.push(i) for i in ids] + [detok.flush()]
        assert "".join(deltas) == hf.decode(ids, skip_special_tokens=True), (name, text)
        assert all("\ufffd" not in d for d in deltas), (name, text)


def _byte_token(hf, byte: int) -> int:
    """The id of the token that is this one byte: SentencePiece's byte fallback
    (`<0xE0>`, Mistral) or byte-level BPE's printable stand-in (Llama 3, Qwen)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    for token in (f"<0x{byte:02X}>", bytes_to_unicode()[byte]):
        if token in hf.get_vocab():
            return hf.convert_tokens_to_ids(token)
    raise AssertionError(f"no single-byte token for {byte:#x}")


def test_invalid_bytes_stream_as_transformers_decodes(family):
    """A model repeating bytes that are not UTF-8 (lone lead bytes) between real
    characters: the text still comes out as transformers decodes the whole sequence, and
    the garbage is released as it streams (DecodeStream alone holds it all back, decoding
    the growing window again at each token), while a character split over tokens is
    never broken."""
    name, directory, hf = family
    tok = Tokenizer.from_dir(directory)
    lead, *chinese = [_byte_token(hf, b) for b in (0xE0, 0xE4, 0xB8, 0xAD)]  # 中 = E4 B8 AD
    words = hf("ok 世界 ok", add_special_tokens=False)["input_ids"]
    ids = [lead] * 30 + words + [lead] * 11 + words + [lead] * 13 + chinese
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "\ufffd" in "".join(deltas[:30]), name  # released before the stream ends
    deltas.append(detok.flush())
    assert "".join(deltas) == hf.decode(ids, skip_special_tokens=True), name


def test_a_byte_that_garbles_streamed_text_does_not_stop_the_stream(family):
    """Byte fallback (Mistral) shows every byte of a run that is not UTF-8 as U+FFFD, so
    a stray byte after 中 turns it into U+FFFD in transformers' decode of the whole
    sequence, after 中 was streamed (tokenizers' DecodeStream then raises "Invalid
    prefix"): the stream goes on, and what follows comes out."""
    name, directory, hf = family
    tok = Tokenizer.from_dir(directory)
    lead, *chinese = [_byte_token(hf, b) for b in (0xE0, 0xE4, 0xB8, 0xAD)]
    words = hf("ok then", add_special_tokens=False)["input_ids"]
    for tail, end in ((words, "ok then"), ([], "\ufffd")):  # the stream ends at the byte
        detok = IncrementalDetokenizer(tok)
        text = "".join(detok.push(i) for i in [*words, *chinese, lead, *tail]) + detok.flush()
        assert text.startswith("ok then中") and text.endswith(end), (name, text)


def test_stop_ids_are_eos_plus_generation_config(family):
    transformers = pytest.importorskip("transformers")
    name, directory, hf = family
    tok = Tokenizer.from_dir(directory)
    generation = transformers.GenerationConfig.from_pretrained(directory).eos_token_id
    generation = set(generation if isinstance(generation, list) else [generation])
    assert tok.stop_ids == generation | {hf.eos_token_id}
    if name == "llama3":
        names = {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"}
        assert tok.stop_ids == {tok.hf.token_to_id(t) for t in names}
    if name.startswith("qwen"):
        assert tok.stop_ids == {tok.hf.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}


def test_save_keeps_the_conventions(family, tmp_path):
    """A saved tokenizer (what a bundle and an HF export hold) is read back the same way by
    tandem and by transformers: BOS rule, special tokens, stop ids, chat template."""
    transformers = pytest.importorskip("transformers")
    _, directory, hf = family
    tok = Tokenizer.from_dir(directory)
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    hf_again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in PROMPTS:
        assert again.encode(text) == hf_again(text)["input_ids"] == hf(text)["input_ids"]
    assert (again.bos_id, again.eos_id, again.stop_ids) == (tok.bos_id, tok.eos_id, tok.stop_ids)
    assert again.special_tokens == tok.special_tokens
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    assert again.chat_template.templates == tok.chat_template.templates
    assert hf_again.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id
    assert set(generation if isinstance(generation, list) else [generation]) == tok.stop_ids


@pytest.mark.parametrize(
    "family_name, edit",
    [
        ("mistral", {"add_bos_token": False}),  # transformers 5 ignores it: tokenizer.json rules
        ("llama3", {"add_bos_token": False, "add_eos_token": True}),
        ("qwen2.5", {"add_bos_token": True}),
        ("qwen3", {"split_special_tokens": True}),
    ],
)
def test_tokenizer_config_flags_follow_transformers(family_name, edit, tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = build_tokenizer_dir(family_name, tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, **edit}))
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    tok = Tokenizer.from_dir(directory)
    for text in PROMPTS:
        assert tok.encode(text) == hf(text)["input_ids"], text


def test_tandem_tokenizers_add_bos_for_transformers_too(bpe, tmp_path):
    """tandem's own tokenizers start every text with <bos>; transformers and vLLM, reading
    the saved files, do the same."""
    transformers = pytest.importorskip("transformers")
    for kind, tok in (("byte", Tokenizer.byte()), ("bpe", bpe)):
        tok.save(tmp_path / kind)
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path / kind)
        for text in TEXTS:
            assert tok.encode(text)[0] == tok.bos_id
            assert tok.encode(text) == hf(text)["input_ids"], (kind, text)
        assert tok.stop_ids == {tok.eos_id} and tok.chat_template is None


@pytest.mark.parametrize(
    "generation, match",
    [
        ({"eos_token_id": "x"}, "eos_token_id='x' is invalid"),
        ({"eos_token_id": [2, 10**6]}, "1000000"),
    ],
)
def test_bad_stop_ids_are_refused(tmp_path, generation, match):
    directory = build_tokenizer_dir("qwen2.5", tmp_path)
    (directory / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_dir(directory)


def test_stop_ids_fall_back_to_config_json(tmp_path):
    directory = build_tokenizer_dir("qwen2.5", tmp_path)
    (directory / "generation_config.json").unlink()
    im_end = Tokenizer.from_dir(directory).eos_id
    (directory / "config.json").write_text(json.dumps({"eos_token_id": [im_end, 0]}))
    assert Tokenizer.from_dir(directory).stop_ids == {im_end, 0}
