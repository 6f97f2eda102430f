"""Tokenizers: one class over HF `tokenizers`, plus UTF-8-safe incremental detokenization.

Every tandem tokenizer is a HF `tokenizers.Tokenizer`, so a bundle always holds a
standard `tokenizer.json` that transformers, vLLM or any HF-compatible tool can read:
- `Tokenizer.byte()`: byte-level BPE with *no merges*, ids 0..255 are the bytes, then
  <bos>, <eos>, <pad>. Needs no files; what tests and the first demo use.
- `Tokenizer.train_bpe(files, vocab_size)`: a byte-level BPE trained on a local corpus
  (`tandem tokenizer train`).
- `Tokenizer.from_dir(dir)`: any HF tokenizer directory (tokenizer.json +
  tokenizer_config.json naming the special tokens), e.g. Llama 3's or Qwen's.

The tokenizer is the model's: `encode(text)` gives exactly what transformers'
`AutoTokenizer.from_pretrained(dir)(text)["input_ids"]` gives. Whether a BOS (or anything
else) is added is decided by tokenizer.json's post-processor alone, which is what
transformers 5 runs: with a tokenizer.json it drops `add_bos_token` / `add_eos_token` from
tokenizer_config.json (`PreTrainedTokenizerBase._from_pretrained`), and vLLM encodes through
transformers. So Llama 3 and Mistral prompts start with their BOS (a `TemplateProcessing`
post-processor), Qwen's with none (no BOS token at all: `bos_token: null`). tandem's own
tokenizers (`byte`, `train_bpe`) carry a post-processor that adds <bos>, the convention
tandem pretrains with, so transformers and vLLM agree with tandem on them too.
`encode(text, add_special_tokens=False)` skips the post-processor: for text that already
holds its special tokens (a rendered chat template) and for SFT pieces.

The tokens that end generation (`stop_ids`) are the tokenizer's EOS plus every id in
generation_config.json's `eos_token_id` (an int or a list; config.json's when there is no
generation_config.json, as transformers' `generate` does): Llama 3 instruct ends turns with
`<|eot_id|>`, Qwen with `<|im_end|>` and `<|endoftext|>`. `chat_template` is the model's
`ChatTemplate`, if it has one. `save` writes all of it back (tokenizer.json,
tokenizer_config.json with the chat template, generation_config.json), so a bundle and an
exported HF directory keep the model's conventions.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tokenizers.decoders import DecodeStream

from tandem.model.chat_template import ChatTemplate, read_json_object, read_special_tokens

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
GENERATION_CONFIG = "generation_config.json"


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


def _with_bos(hf: HFTokenizer) -> HFTokenizer:
    """tandem's convention for its own tokenizers: every encoded text starts with <bos>
    (the same template transformers builds for `add_bos_token=True`)."""
    hf.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A:0",
        pair=f"{BOS} $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, hf.token_to_id(BOS))],
    )
    return hf


class Tokenizer:
    """A HF tokenizer plus what tandem needs of the model's conventions: the special-token
    ids, the ids that end generation, the chat template."""

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str,
        pad_token: str | None = None,
        stop_token_ids: Iterable[int] = (),
        chat_template: ChatTemplate | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ):
        self.hf = hf
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        # The named special tokens as tokenizer_config.json declares them (what a chat
        # template sees as `bos_token`, `unk_token`, ...); saved back unchanged.
        self.special_tokens = dict(
            special_tokens
            or {
                k: v
                for k, v in (
                    ("bos_token", bos_token),
                    ("eos_token", eos_token),
                    ("pad_token", pad_token),
                )
                if v is not None
            }
        )
        self.chat_template = chat_template
        names = {"eos_token": eos_token, "pad_token": self.pad_token}
        if bos_token is not None:
            names["bos_token"] = bos_token
        ids = {name: hf.token_to_id(tok) for name, tok in names.items()}
        missing = [f"{name}={names[name]!r}" for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"special tokens not in the vocabulary: {', '.join(missing)}")
        self.bos_id: int | None = ids.get("bos_token")
        self.eos_id: int = ids["eos_token"]
        self.pad_id: int = ids["pad_token"]
        for token_id in stop_token_ids:
            if (
                not isinstance(token_id, int)
                or isinstance(token_id, bool)
                or not (0 <= token_id < self.vocab_size)
            ):
                raise ValueError(
                    f"stop token id {token_id!r} is invalid: allowed integers in "
                    f"[0, {self.vocab_size}) (generation_config.json eos_token_id)"
                )
        self.stop_ids: frozenset[int] = frozenset({self.eos_id, *stop_token_ids})

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The model's tokenization of `text` (its post-processor adds BOS or not); with
        `add_special_tokens=False`, the text's own tokens only."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def byte(cls) -> Tokenizer:
        vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([BOS, EOS, PAD])
        return cls(_with_bos(hf), bos_token=BOS, eos_token=EOS, pad_token=PAD)

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
        return cls(_with_bos(hf), bos_token=BOS, eos_token=EOS, pad_token=PAD)

    @classmethod
    def tandem_bpe_from_dir(cls, directory: str | Path) -> Tokenizer:
        """A BPE that `train_bpe` trained and `save` wrote. One cached by a tandem older
        than the tokenizer conventions has no post-processor, yet was always used with a
        <bos> in front: it gets the post-processor that says so, so resuming such a run
        keeps training on the same tokens."""
        tokenizer = cls.from_dir(directory)
        if tokenizer.hf.post_processor is None and tokenizer.bos_token == BOS:
            log.info("%s: a BPE cached before tokenizer conventions: <bos> first", directory)
            _with_bos(tokenizer.hf)
        return tokenizer

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """A HF tokenizer directory (or a tandem bundle): tokenizer.json, the special-token
        names of tokenizer_config.json, generation_config.json's stop ids, the chat template."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{path}: missing (a tandem or HF tokenizer directory needs it)")
        hf = HFTokenizer.from_file(str(path))
        config = read_json_object(directory / "tokenizer_config.json")
        # transformers' `split_special_tokens`: special tokens in the text are split as text.
        hf.encode_special_tokens = bool(config.get("split_special_tokens", False))
        special = read_special_tokens(directory)
        names = {k: special.get(k) for k in ("bos_token", "eos_token", "pad_token")}
        model_config = read_json_object(directory / "config.json")
        for key in names:
            # A name tokenizer_config.json does not mention is looked up by its id in
            # config.json; one it sets to null (Qwen's `bos_token`) means "none".
            token_id = model_config.get(f"{key}_id")
            if isinstance(token_id, list):
                token_id = token_id[0] if token_id else None
            if names[key] is None and key not in config and isinstance(token_id, int):
                names[key] = hf.id_to_token(token_id)
        if names["eos_token"] is None:
            raise ValueError(
                f"{directory}: cannot tell the eos token; add tokenizer_config.json with "
                '"eos_token" (or config.json with eos_token_id)'
            )
        return cls(
            hf,
            **names,
            stop_token_ids=_stop_token_ids(directory),
            chat_template=ChatTemplate.from_dir(directory),
            special_tokens=special or None,
        )

    def save(self, directory: str | Path) -> None:
        """tokenizer.json, tokenizer_config.json (special tokens, chat template) and
        generation_config.json (the stop ids): what `from_dir` and transformers read."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {
            **self.special_tokens,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        if self.hf.encode_special_tokens:
            config["split_special_tokens"] = True
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template.config_value()
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        others = sorted(self.stop_ids - {self.eos_id})
        generation = {
            "bos_token_id": self.bos_id,
            "eos_token_id": [self.eos_id, *others] if others else self.eos_id,
        }
        (directory / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")


def _stop_token_ids(directory: Path) -> list[int]:
    """generation_config.json's `eos_token_id` (an int or a list), else config.json's."""
    path = directory / GENERATION_CONFIG
    if not path.is_file():
        path = directory / "config.json"
    value = read_json_object(path).get("eos_token_id")
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    for token_id in ids:
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise ValueError(
                f"{path}: eos_token_id={value!r} is invalid: allowed an integer "
                "or a list of integers"
            )
    return ids


MAX_HELD_TOKENS = 8  # valid text never holds this many: a character is at most 4 bytes


class IncrementalDetokenizer:
    """Turns a token stream into text deltas that never split a character.

    `tokenizers`' own `DecodeStream` (what vLLM's fast detokenizer uses) decodes a short
    window of recent tokens per step in Rust and releases text only once its last
    character is complete, for byte-level and SentencePiece tokenizers alike (about a third
    of the time per token of decoding the window twice in Python, docs/benchmarks.md).
    `flush` releases what is still held back when the stream ends. Special tokens show as
    text only without `skip_special_tokens` (vLLM's request parameter; a tool-call parser
    whose calls open with one needs them).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._prefix = 0  # first of the last emitted tokens: context for `flush`
        self._read = 0  # tokens whose text has been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        try:
            text = self._stream.step(self._tokenizer.hf, int(token_id))
        except Exception as err:  # tokenizers raises a bare Exception for this
            if not str(err).startswith("Invalid prefix"):
                raise
            # A byte-fallback tokenizer (Mistral's) shows every byte of a run that is not
            # UTF-8 as U+FFFD, so a stray byte can turn a character already streamed
            # into U+FFFD; text sent stays sent: the stream restarts after it, as
            # vLLM's detokenizer does (and `flush` decodes only what was not sent).
            self._prefix = self._read
            return self._restart(self._read)
        if text is not None:
            self._prefix, self._read = self._read, len(self._ids)
            return text
        if len(self._ids) - self._read >= MAX_HELD_TOKENS:
            return self._release_invalid()
        return ""

    def _release_invalid(self) -> str:
        """The text of a long held-back window, but for its last few tokens.

        `DecodeStream` holds every token back while its window's text ends in U+FFFD, and
        decodes the whole window again at each step: a run of bytes that are not UTF-8 (a
        model repeating a lone lead byte) made each token cost time in proportion to the
        run. A character still incomplete began in the last three tokens (none spans more
        than four bytes, each token brings at least one), so the window up to there is
        released where its text is a prefix of the whole window's (no character split at
        the cut), and the stream restarts after it."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        for cut in range(len(self._ids) - 3, self._read, -1):
            text = self._decode(self._ids[self._prefix : cut])
            if window.startswith(text) and text.startswith(emitted):
                self._prefix, self._read = self._read, cut
                return text[len(emitted) :] + self._restart(cut)
        return ""

    def _restart(self, start: int) -> str:
        """A new stream fed the tokens from `start` on; the text they release."""
        # A stream primed with tokens whose text ends in U+FFFD holds them back again, so
        # it is primed with a plain letter: context enough for a SentencePiece word's
        # leading space, and nothing a byte joins with.
        anchor = self._tokenizer.hf.encode("a", add_special_tokens=False).ids
        self._stream = DecodeStream(ids=anchor, skip_special_tokens=self._skip)
        released = ""
        for end in range(start + 1, len(self._ids) + 1):
            piece = self._stream.step(self._tokenizer.hf, self._ids[end - 1])
            if piece is not None:
                released += piece
                self._prefix, self._read = self._read, end
        return released

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def flush(self) -> str:
        """The held-back remainder at the end of a stream (invalid bytes show as U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
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
