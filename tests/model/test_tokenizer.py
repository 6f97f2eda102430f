import random

import pytest

from tandem.model.tokenizer import IncrementalDetokenizer, Tokenizer, main

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
    assert tok.encode("a", add_bos=False) == [97]


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
        out = "".join(detok.push(i) for i in tok.encode(text, add_bos=False)) + detok.flush()
        assert out == text


def test_from_dir_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json: missing"):
        Tokenizer.from_dir(tmp_path)
    Tokenizer.byte().hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="cannot tell the bos/eos tokens"):
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
