"""Tokenizers: one class over HF `tokenizers`, plus UTF-8-safe incremental detokenization.

Every tandem tokenizer is a HF `tokenizers.Tokenizer`, so a bundle always holds a
standard `tokenizer.json` that transformers, vLLM or any HF-compatible tool can read:
- `Tokenizer.byte()`: byte-level BPE with *no merges*, ids 0..255 are the bytes, then
  <bos>, <eos>, <pad>. Needs no files; what tests and the first demo use.
- `Tokenizer.train_bpe(files, vocab_size)`: a byte-level BPE trained on a local corpus
  (`tandem tokenizer train`).
- `Tokenizer.from_dir(dir)`: any HF tokenizer directory (tokenizer.json +
  tokenizer_config.json naming the special tokens), e.g. Llama 3's.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
_REPLACEMENT = "\ufffd"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """A HF tokenizer plus the ids of the special tokens tandem needs."""

    def __init__(
        self, hf: HFTokenizer, *, bos_token: str, eos_token: str, pad_token: str | None = None
    ):
        self.hf = hf
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        ids = {
            name: hf.token_to_id(tok)
            for name, tok in (
                ("bos_token", bos_token),
                ("eos_token", eos_token),
                ("pad_token", self.pad_token),
            )
        }
        missing = [
            f"{name}={tok!r}"
            for (name, _), tok in zip(
                ids.items(), (bos_token, eos_token, self.pad_token), strict=True
            )
            if ids[name] is None
        ]
        if missing:
            raise ValueError(f"special tokens not in the vocabulary: {', '.join(missing)}")
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def byte(cls) -> Tokenizer:
        vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([BOS, EOS, PAD])
        return cls(hf, bos_token=BOS, eos_token=EOS, pad_token=PAD)

    @classmethod
    def train_bpe(
        cls,
        files: Sequence[str | Path] | None = None,
        vocab_size: int = 2048,
        *,
        texts: Iterable[str] | None = None,
    ) -> Tokenizer:
        """Trains a byte-level BPE on local files (or an iterator of texts)."""
        if vocab_size < 256 + 3:
            raise ValueError(
                f"vocab_size={vocab_size} is invalid: allowed >= 259 (bytes + specials)"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BOS, EOS, PAD],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        if texts is not None:
            hf.train_from_iterator(texts, trainer=trainer)
        else:
            paths = [str(p) for p in files or ()]
            for path in paths:
                if not Path(path).is_file():
                    raise ValueError(f"tokenizer training file {path!r} does not exist")
            if not paths:
                raise ValueError("train_bpe needs at least one file or `texts`")
            hf.train(paths, trainer=trainer)
        return cls(hf, bos_token=BOS, eos_token=EOS, pad_token=PAD)

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Reads tokenizer.json and the special-token names from tokenizer_config.json."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{path}: missing (a tandem or HF tokenizer directory needs it)")
        hf = HFTokenizer.from_file(str(path))
        special = _read_special_tokens(directory)
        if "bos_token" not in special or "eos_token" not in special:
            raise ValueError(
                f"{directory}: cannot tell the bos/eos tokens; add tokenizer_config.json with "
                '"bos_token" and "eos_token" (or config.json with bos_token_id/eos_token_id)'
            )
        return cls(hf, **special)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        config = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _read_special_tokens(directory: Path) -> dict[str, str]:
    """HF keeps special-token names in tokenizer_config.json (a string or an AddedToken
    dict) and sometimes only their ids in config.json."""
    special: dict[str, str] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
    model_config = directory / "config.json"
    if ("bos_token" not in special or "eos_token" not in special) and model_config.is_file():
        hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        ids = json.loads(model_config.read_text())
        for key in ("bos_token", "eos_token", "pad_token"):
            token_id = ids.get(f"{key}_id")
            if isinstance(token_id, list):
                token_id = token_id[0] if token_id else None
            if key not in special and isinstance(token_id, int):
                token = hf.id_to_token(token_id)
                if token is not None:
                    special[key] = token
    return special


class IncrementalDetokenizer:
    """Turns a token stream into text deltas that never split a character.

    Decodes a short window of recent tokens twice (before and after the new one) and
    emits only the difference, holding back while the window's text ends in U+FFFD, i.e.
    while a multi-byte character is still incomplete. Works for any HF tokenizer,
    byte-level or SentencePiece, because the window keeps the previous token as context.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text has been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        emitted = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) > len(emitted) and not text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(emitted) :]
        return ""

    def flush(self) -> str:
        """The held-back remainder at the end of a stream (invalid bytes show as U+FFFD)."""
        emitted = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :]


def main(argv: list[str] | None = None) -> int:
    """`tandem tokenizer train --input FILE... --vocab-size N --out DIR`."""
    parser = argparse.ArgumentParser(prog="tandem tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE tokenizer on local files")
    train.add_argument("--input", nargs="+", required=True, help="text files to train on")
    train.add_argument("--vocab-size", type=int, default=2048)
    train.add_argument("--out", required=True, help="directory for tokenizer.json")
    args = parser.parse_args(argv)
    files = []
    for item in args.input:
        path = Path(item)
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    tokenizer = Tokenizer.train_bpe(files, args.vocab_size)
    tokenizer.save(args.out)
    log.info("trained a %d-token BPE on %d files -> %s", tokenizer.vocab_size, len(files), args.out)
    return 0
