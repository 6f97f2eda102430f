"""Supervised fine-tuning records -> token ids + a loss mask.

A `.jsonl` file holds records of one shape, detected from its first record:
  {"messages": [{"role": ..., "content": ...}, ...]}   rendered with the model's chat
      template (`tandem.model.chat_template`, as transformers' `apply_chat_template` does);
      the loss counts only the assistant turns (their text and the end-of-turn tokens the
      template puts after them);
  {"prompt": ..., "completion": ...}   prompt tokenized as the model's tokenizer does
      (its BOS, if any), then the completion and EOS; the loss counts the completion + EOS;
  {"text": ...} (the `text_key`)   every token counts, as in pretraining.

The assistant spans of a conversation are found from renderings of its prefixes: the text
for the first i messages with the generation prompt is a prefix of the whole text, and
turn i runs from there to the end of the text for the first i+1 messages (or, for a
template that renders a last turn specially, as Qwen3's does, to the end of the turn's
content in the whole text plus the end-of-turn text the template puts after it). A
template for which neither holds (one that rewrites earlier turns) cannot be masked
reliably: its records are skipped and counted, never trained on with a wrong mask.
Tokens are then labelled by their character offsets in the one tokenization of the whole
conversation, so the ids are exactly `apply_chat_template(..., tokenize=True)`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tandem.model.tokenizer import Tokenizer

RecordFormat = Literal["text", "messages", "prompt_completion"]


class SkipRecord(ValueError):
    """This record cannot be trained on; the message says why (logged as a count)."""


def record_format(path: Path, text_key: str) -> RecordFormat:
    """The shape of a .jsonl file's records, from its first non-empty line."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise ValueError(f"data: {path} holds no records")
    try:
        record = json.loads(first)
    except json.JSONDecodeError as err:
        raise ValueError(f"data: {path}: the first record is not JSON ({err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"data: {path}: records must be JSON objects, got {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if text_key in record:
        return "text"
    raise ValueError(
        f"data: {path}: records have keys {sorted(record)}; allowed shapes are "
        f'{{"messages": [...]}}, {{"prompt": ..., "completion": ...}} or {{"{text_key}": ...}}'
    )


def record_text(record: str | Mapping[str, Any]) -> str:
    """A record's text content (to train a BPE tokenizer on fine-tuning data)."""
    if isinstance(record, str):
        return record
    if "messages" in record:
        return "\n".join(str(m.get("content", "")) for m in record["messages"] or [])
    return f"{record.get('prompt', '')}{record.get('completion', '')}"


class ExampleEncoder:
    """Turns one record (a text or a JSON object) into (ids [n] int32, mask [n] bool);
    mask[i] says token i is a target the loss counts. Chats use the tokenizer's own
    template (`Tokenizer.chat_template`)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template

    def __call__(self, record: str | Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(record, str):
            ids = [*self.tokenizer.encode(record), self.tokenizer.eos_id]
            return _arrays(ids, [True] * len(ids))
        if "messages" in record:
            return self._conversation(record["messages"])
        return self._prompt_completion(record)

    def _prompt_completion(self, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise SkipRecord("prompt / completion are not both strings (completion non-empty)")
        head = self.tokenizer.encode(prompt)  # as the model's tokenizer does: its BOS, if any
        tail = self.tokenizer.encode(completion, add_special_tokens=False)
        tail.append(self.tokenizer.eos_id)
        return _arrays([*head, *tail], [False] * len(head) + [True] * len(tail))

    def _conversation(self, messages: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.chat_template is None:
            raise ValueError(
                'data: chat records ({"messages": ...}) need the model\'s chat template; '
                "this tokenizer has none (init_from a model whose tokenizer_config.json or "
                "chat_template.jinja holds one)"
            )
        if not isinstance(messages, Sequence) or not messages:
            raise SkipRecord("messages is not a non-empty list")
        try:
            text = self.chat_template.render(messages)
            spans = self._assistant_spans(messages, text)
        except SkipRecord:
            raise
        except Exception as err:  # a template error is the record's problem, not the run's
            raise SkipRecord(f"the chat template failed: {type(err).__name__}: {err}") from None
        if not spans:
            raise SkipRecord("no assistant turn")
        encoding = self.tokenizer.hf.encode(text, add_special_tokens=False)  # with offsets
        mask = [any(start <= begin < end for start, end in spans) for begin, _ in encoding.offsets]
        return _arrays(encoding.ids, mask)

    def _assistant_spans(self, messages: Sequence[Any], text: str) -> list[tuple[int, int]]:
        """[start, end) in `text` of each assistant turn: from the end of the generation
        prompt before it to the end of the end-of-turn text after it."""
        spans = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or message.get("role") != "assistant":
                continue
            before = self.chat_template.render(messages[:i], add_generation_prompt=True)
            upto = self.chat_template.render(messages[: i + 1])
            if not (text.startswith(before) and upto.startswith(before)):
                raise SkipRecord("the chat template rewrites earlier turns (not prefix-stable)")
            if text.startswith(upto):
                spans.append((len(before), len(upto)))
                continue
            # A template may render the last turn differently from the same turn followed
            # by others (Qwen3 gives the last one an empty <think></think>): the turn is
            # then its content where `text` has it, plus the end-of-turn text after it.
            content = message.get("content")
            found = text.find(content, len(before)) if isinstance(content, str) else -1
            tail = upto.rfind(content) if found >= 0 else -1
            end_of_turn = upto[tail + len(content) :] if tail >= 0 else ""
            if tail < 0 or not text.startswith(end_of_turn, found + len(content)):
                raise SkipRecord("the chat template renders a turn where it cannot be found")
            spans.append((len(before), found + len(content) + len(end_of_turn)))
        return spans


def _arrays(ids: Sequence[int], mask: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ids, np.int32), np.asarray(mask, bool)
