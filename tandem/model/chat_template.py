"""The model's chat template: `messages` -> prompt text, rendered as transformers renders it.

One renderer for every place tandem turns a conversation into tokens (SFT data, the chat
API), so training and serving see the same text. It follows transformers'
`apply_chat_template` (`utils/chat_template_utils.py`, transformers 5):

- the template comes from the model directory: `chat_template.jinja` (plus named templates in
  `additional_chat_templates/*.jinja`) if present, else `chat_template` in
  tokenizer_config.json, a string or a list of `{"name", "template"}`; with several, the one
  named `default` is used, or `tool_use` when `tools` are passed and it exists;
- Jinja2's `ImmutableSandboxedEnvironment` (templates from the Hub are untrusted code) with
  `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension and the `{% generation %}`
  tag; `tojson` that does not escape HTML; `raise_exception`, `strftime_now`, a limited
  `dict` and a `namespace` that refuses underscore names;
- the variables: `messages` (each a mapping, keys whose value is None dropped, reasoning
  copied under `reasoning_content` and `thinking`), `tools` and `documents` (None unless
  given), `add_generation_prompt`, the tokenizer's named special tokens (`bos_token`,
  `eos_token`, ... those that are set) and any extra keyword (e.g. `enable_thinking`),
  every value rebuilt from plain JSON types first.

The rendered text already holds the special tokens the template writes (e.g. Llama 3's
`<|begin_of_text|>`), so it is tokenized WITHOUT adding special tokens again:
`tokenizer.encode(text, add_special_tokens=False)`, as transformers does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES: the names a template sees.
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Appended to the message to continue; where it is rendered, the prompt ends (transformers').
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Names a message's reasoning may come under; templates read the first (and gpt-oss `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers'
    assistant masks; it renders its body unchanged, so templates that use it work here."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
    sort_keys: bool = False,
) -> str:  # fmt: skip
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` in a template, without the class itself (no attribute games on it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace`, refusing underscore names (they reach CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template cannot store the underscore name {name!r} on a namespace"
            )


@lru_cache
def _compile(source: str) -> jinja2.Template:
    """Compiles once per template text (SFT renders thousands of conversations)."""
    return _environment().from_string(source)


def _parse(source: str, name: str = "") -> jinja2.Template:
    """`_compile`, a syntax error as a ValueError naming the template's line."""
    try:
        return _compile(source)
    except jinja2.TemplateSyntaxError as err:
        named = f" {name!r}" if name else ""
        raise ValueError(f"chat template{named} does not parse (line {err.lineno}): {err}") from err


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env


def _plain(value: Any) -> Any:
    """`value` rebuilt from JSON types only: the sandbox does not know which methods of
    other objects are dangerous, so a template never sees one (anything else becomes an
    inert `<TypeName>` placeholder, as in transformers)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages={type(messages).__name__} is invalid: allowed a list of "
            '{"role": ..., "content": ...} mappings'
        )
    if not messages:
        raise ValueError("messages=[] is invalid: allowed a conversation of at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{i}]={message!r} is invalid: allowed a mapping like "
                '{"role": "user", "content": "..."}'
            )
        plain = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((plain[k] for k in _REASONING_FIELDS if k in plain), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    return out


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(directory: str | Path) -> dict[str, str]:
    """The named special tokens (`bos_token`, ...) of tokenizer_config.json that are set,
    with special_tokens_map.json (the older file) filling in names the config lacks."""
    directory = Path(directory)
    found: dict[str, str] = {}
    for name in (TOKENIZER_CONFIG, "special_tokens_map.json"):
        data = read_json_object(directory / name)
        for key in SPECIAL_TOKEN_KEYS:
            if key not in found and key in data:
                token = _token_name(data[key])
                if token is not None:
                    found[key] = token
        if name == TOKENIZER_CONFIG and "added_tokens_decoder" in data:
            break  # transformers reads special_tokens_map.json only for older configs
    return found


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file of a model directory ({} if the file is absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, not {type(data).__name__}")
    return data


class ChatTemplate:
    """A model's chat template(s) plus the special-token names its templates may use."""

    def __init__(
        self, templates: str | Mapping[str, str], special_tokens: Mapping[str, str] | None = None
    ):
        if isinstance(templates, str):
            templates = {"default": templates}
        if not templates or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in templates.items()
        ):
            raise ValueError(
                f"chat_template={templates!r} is invalid: allowed a Jinja string or named strings"
            )
        self.templates: dict[str, str] = dict(templates)
        self.special_tokens: dict[str, str] = dict(special_tokens or {})

    def check_syntax(self) -> None:
        """Raises ValueError naming the template (and line) that does not parse."""
        for name, source in self.templates.items():
            _parse(source, name)

    # -- loading and saving --------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """The template of a HF model directory or a tandem bundle; None if it has none.

        Template files win over tokenizer_config.json's `chat_template`, as in transformers.
        """
        path = Path(path)
        templates: dict[str, str] = {}
        if (path / TEMPLATE_FILE).is_file():
            templates["default"] = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
        if (path / TEMPLATE_DIR).is_dir():
            for file in sorted((path / TEMPLATE_DIR).glob("*.jinja")):
                templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
        if not templates:
            value = read_json_object(path / TOKENIZER_CONFIG).get("chat_template")
            if value is not None:
                templates = cls._parse_config_value(value, path / TOKENIZER_CONFIG)
        if not templates:
            return None
        return cls(templates, read_special_tokens(path))

    @staticmethod
    def _parse_config_value(value: Any, where: Path) -> dict[str, str]:
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list) and all(
            isinstance(t, Mapping)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str)
            for t in value
        ):
            return {t["name"]: t["template"] for t in value}
        raise ValueError(
            f"{where}: chat_template={value!r:.80} is invalid: allowed a string or a list of "
            '{"name": ..., "template": ...}'
        )

    def config_value(self) -> str | list[dict[str, str]]:
        """`chat_template` as tokenizer_config.json stores it (what `from_dir` reads back)."""
        if list(self.templates) == ["default"]:
            return self.templates["default"]
        return [{"name": name, "template": t} for name, t in self.templates.items()]

    # -- rendering ----------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The Jinja text of the default template."""
        return self._select(tools=None)

    def _select(self, tools: Any) -> str:
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise ValueError(
            f"chat_template has no 'default' template; names: {sorted(self.templates)} "
            "(transformers would need the name passed explicitly)"
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (tokenize it with `add_special_tokens=False`).

        `tools` and `documents` are passed as in transformers; any other keyword is a
        template variable and overrides a special token of the same name. A template that
        does not parse, raises (`raise_exception`) or fails is a ValueError.
        `continue_final_message`: the text ends inside the last message, after its content
        (what the template writes after it, an end-of-turn, is cut), so the model goes on
        writing it: a partial answer to complete (transformers' option, found the same way:
        a marker after the content, cut where it is rendered).
        """
        tools = kwargs.pop("tools", None)
        documents = kwargs.pop("documents", None)
        chat = _messages(messages)
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError(
                    "continue_final_message is invalid with add_generation_prompt: the one "
                    "continues the last message, the other starts a new one"
                )
            final = chat[-1].get("content")
            if not isinstance(final, str):
                raise ValueError(
                    "continue_final_message is set but the final message has no text "
                    "content to continue"
                )
            chat[-1]["content"] = final + _CONTINUE_TAG
        template = _parse(self._select(tools))
        variables = _plain({**self.special_tokens, **kwargs})
        try:
            text = template.render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=bool(add_generation_prompt),
                **variables,
            )
        except Exception as err:  # the template is foreign code: any failure is its error
            raise ValueError(f"chat template failed: {type(err).__name__}: {err}") from err
        if not continue_final_message:
            return text
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ValueError(
                "continue_final_message is set but the chat template does not write the "
                "final message's content (it drops or changes it), so there is nothing to "
                "continue"
            )
        at = text.rindex(tag)
        if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return text[:at]
        return text[:at].rstrip()  # the template trimmed the content's trailing space
