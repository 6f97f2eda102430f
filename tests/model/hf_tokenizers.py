"""Hugging Face tokenizer directories of four model families, built locally (no download).

Each is a small BPE trained here with `tokenizers`, wired the way the family's real
tokenizer.json is (normalizer, pre-tokenizer, decoder, post-processor, special tokens) and
saved with the family's real tokenizer_config.json fields, its real chat template
(tests/data/chat_templates, see SOURCES.md there) and its generation_config.json stop ids:

- llama3: BOS `<|begin_of_text|>` added by the tokenizer.json post-processor, no
  `add_bos_token`; tokenizer EOS `<|eot_id|>`, generation_config ends on three ids.
- qwen2.5: no BOS token at all (`bos_token: null`), ChatML template, tokenizer EOS
  `<|im_end|>`, generation_config adds `<|endoftext|>`.
- qwen3: as qwen2.5 with an explicit `add_bos_token: false`, `<think>` tokens, and the
  template in chat_template.jinja (the newer file layout).
- mistral: SentencePiece-style BPE (Metaspace, byte fallback), `tokenizer_class:
  LlamaTokenizer` with `add_bos_token: true`, `[INST]` control tokens.

Token ids differ from the real models' (the vocabularies are tiny); what matters is that
transformers treats these directories exactly as it treats the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
TEMPLATE_FILES = {
    "llama3": "llama3.1.jinja",
    "qwen2.5": "qwen2.5.jinja",
    "qwen3": "qwen3.jinja",
    "mistral": "mistral-v0.3.jinja",
}
FAMILIES = tuple(TEMPLATE_FILES)

# The pre-tokenizer split patterns of the real tokenizer.json files.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "You are a helpful assistant. Answer the user's questions briefly and politely.",
    "Hello, how are you? I'm doing great. How can I help you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about tokenizers and templates, then explain why it is funny.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "Héllo wörld, naïve café — 世界 你好 🙂 tokens, bytes and merges.",
    "def greet(name):\n    return f'Hello, {name}!'\n\n\nprint(greet('world'))",
    "<think>\nThe user greets me.\n</think>\n\nHi there! I'm an assistant.",
] * 4


def _byte_level(split: str, *, nfc: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _sentencepiece_bpe(specials: list[str]) -> Tokenizer:
    """Mistral's layout: control tokens first, then the 256 byte-fallback pieces, then BPE."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(
        CORPUS, trainer=trainers.BpeTrainer(vocab_size=400, show_progress=False)
    )
    data = json.loads(trained.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in sorted(data["vocab"], key=data["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return tok


def _template_processing(bos: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def _added(tok: Tokenizer, special: list[str], plain: list[str] = ()) -> None:
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, Any]:
    return {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }


def build_tokenizer_dir(family: str, directory: str | Path) -> Path:
    """Writes tokenizer.json, tokenizer_config.json (+ chat_template.jinja for qwen3) and
    generation_config.json of `family` into `directory`; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if family not in TEMPLATE_FILES:
        raise ValueError(f"family={family!r} is invalid: allowed {FAMILIES}")
    template = (TEMPLATES / TEMPLATE_FILES[family]).read_text()
    config: dict[str, Any]
    if family == "llama3":
        tok = _byte_level(LLAMA3_SPLIT, nfc=False)
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
        specials += ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]
        specials += ["<|python_tag|>"]
        _added(tok, specials)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                _template_processing("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>")),
            ]
        )
        config = {
            "bos_token": "<|begin_of_text|>",
            "chat_template": template,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
        generation = {
            "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
            "do_sample": True,
            "eos_token_id": ids,
            "temperature": 0.6,
            "top_p": 0.9,
        }
    elif family in ("qwen2.5", "qwen3"):
        tok = _byte_level(QWEN_SPLIT, nfc=True)
        _added(
            tok,
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            ["<tool_call>", "</tool_call>"]
            + (["<think>", "</think>"] if family == "qwen3" else []),
        )
        tok.post_processor = processors.ByteLevel(trim_offsets=False, use_regex=False)
        config = {
            "add_prefix_space": False,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        if family == "qwen3":
            config["add_bos_token"] = False
            del config["chat_template"]
            (directory / "chat_template.jinja").write_text(template)
        endoftext = tok.token_to_id("<|endoftext|>")
        generation = {
            "bos_token_id": endoftext,
            "do_sample": True,
            "eos_token_id": [tok.token_to_id("<|im_end|>"), endoftext],
            "pad_token_id": endoftext,
            "temperature": 0.7,
            "top_p": 0.8,
        }
    else:  # mistral
        controls = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]"]
        controls += ["[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
        specials = ["<unk>", "<s>", "</s>", *controls]
        tok = _sentencepiece_bpe(specials)
        _added(tok, specials)
        tok.post_processor = _template_processing("<s>", tok.token_to_id("<s>"))
        config = {
            "add_bos_token": True,
            "add_eos_token": False,
            "additional_special_tokens": [],
            "bos_token": "<s>",
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": None,
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        }
        generation = {
            "bos_token_id": tok.token_to_id("<s>"),
            "eos_token_id": tok.token_to_id("</s>"),
        }
    tok.save(str(directory / "tokenizer.json"))
    config = {"added_tokens_decoder": _added_tokens_decoder(tok), **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory
