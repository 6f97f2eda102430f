"""Chat templates render exactly as transformers' apply_chat_template, for four real templates."""

import json

import pytest

transformers = pytest.importorskip("transformers")

from tandem.model.chat_template import ChatTemplate, read_special_tokens  # noqa: E402
from tandem.model.tokenizer import Tokenizer  # noqa: E402
from tests.model.hf_tokenizers import FAMILIES, build_tokenizer_dir  # noqa: E402

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TURNS = [
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "Tell me a joke about Héllo 世界 🙂."},
]
CONVERSATIONS = {
    "one-user": TURNS[:1],
    "system-multi-turn": [SYSTEM, *TURNS],
    "ends-with-assistant": [SYSTEM, *TURNS[:2]],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_temperature",
        "description": "Get the current temperature at a location.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "City, Country"}},
            "required": ["location"],
        },
    },
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    directory = build_tokenizer_dir(request.param, tmp_path_factory.mktemp(request.param))
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    return request.param, directory, hf


def _hf_ids(hf, messages, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _conversation(family, name):
    messages = CONVERSATIONS[name]
    if family == "mistral" and messages[0]["role"] == "system":
        return messages[1:]  # this template revision has no system role
    return messages


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_matches_apply_chat_template(family, conversation, add_generation_prompt):
    name, directory, hf = family
    messages = _conversation(name, conversation)
    template = ChatTemplate.from_dir(directory)
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    want = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == want
    ids = Tokenizer.from_dir(directory).encode(text, add_special_tokens=False)
    assert ids == _hf_ids(hf, messages, add_generation_prompt=add_generation_prompt)


def test_continue_final_message_matches_apply_chat_template(family):
    """The prompt ends inside the last message, after its text (a partial answer the
    model goes on writing), as transformers cuts it; a trailing space the template trims
    is trimmed as there."""
    name, directory, hf = family
    template = ChatTemplate.from_dir(directory)
    for partial in ("The capital of France is", "Sure, here it is: ", ""):
        messages = [*_conversation(name, "system-multi-turn"), {"role": "assistant",
                    "content": partial}]  # fmt: skip
        text = template.render(messages, continue_final_message=True)
        want = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        assert text == want, (name, partial)
        assert text.rstrip().endswith(partial.rstrip())
    with pytest.raises(ValueError, match="continue_final_message is invalid with add_gen"):
        template.render(messages, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ValueError, match="no text content"):
        template.render([*messages[:-1], {"role": "assistant"}], continue_final_message=True)


def test_template_variables_tools_and_reasoning(family):
    """Tools (tojson, tool-call messages), extra variables and reasoning fields."""
    name, directory, hf = family
    template = ChatTemplate.from_dir(directory)
    call = {"function": {"name": "get_current_temperature", "arguments": {"location": "Paris"}}}
    cases = [
        dict(messages=TURNS[:1], tools=[TOOL], add_generation_prompt=True),
        dict(messages=TURNS[:1], add_generation_prompt=True, enable_thinking=False),
        dict(
            messages=[
                *TURNS[:1],
                {"role": "assistant", "content": "Sure.", "reasoning_content": "Think first."},
                {"role": "user", "content": "And now?"},
                {"role": "assistant", "content": "", "tool_calls": [{**call, "id": "abcdef123"}]},
            ],
            tools=[TOOL],
        ),
    ]
    for kw in cases:
        kw = dict(kw)
        messages = kw.pop("messages")
        assert template.render(messages, **kw) == hf.apply_chat_template(
            messages, tokenize=False, **kw
        ), (name, kw)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    directory = build_tokenizer_dir("llama3", tmp_path_factory.mktemp("llama3"))
    return directory, transformers.AutoTokenizer.from_pretrained(directory)


def _both(llama3, source, messages=TURNS, **kw):
    """(ours, transformers') rendering of `source`; an exception is returned, not raised."""
    directory, hf = llama3
    results = []
    for render in (
        lambda: ChatTemplate(source, read_special_tokens(directory)).render(messages, **kw),
        lambda: hf.apply_chat_template(messages, chat_template=source, tokenize=False, **kw),
    ):
        try:
            results.append(render())
        except Exception as err:
            results.append(err)
    return results


@pytest.mark.parametrize(
    "source",
    [
        "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
        "{{ strftime_now('%Y') }}|{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}",
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'assistant' %}"
        "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
        "{{ dict(a=1) | tojson }}{{ tools is none }}{{ documents is none }}",
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}{% endgeneration %}{% else %}  {{ m.content }}\n{% endif %}{% endfor %}",
        "{{ unk_token is defined }}{{ pad_token is defined }}{{ bos_token }}",
    ],
)
def test_environment_matches_transformers(llama3, source):
    """The sandbox's globals, filters, extensions and whitespace control are transformers'."""
    got, want = _both(llama3, source, add_generation_prompt=True)
    assert got == want


@pytest.mark.parametrize(
    "source, match",
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for m in messages %}{{ m.role }", "does not parse"),
        ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "chat template failed"),
        ("{% set ns = namespace() %}{% set ns._x = 1 %}", "underscore"),
        ("{{ messages[0].content + messages }}", "chat template failed"),
    ],
)
def test_template_errors_are_value_errors(llama3, source, match):
    got, want = _both(llama3, source)
    assert isinstance(got, ValueError) and isinstance(want, Exception)
    with pytest.raises(ValueError, match=match):
        ChatTemplate(source).render(TURNS)


@pytest.mark.parametrize(
    "messages, match",
    [([], "at least one message"), (["hi"], r"messages\[0\]"), ("hi", "list of")],
)
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        ChatTemplate("{{ messages }}").render(messages)


def test_message_normalisation_and_block_whitespace(llama3):
    """Indented block tags are stripped (lstrip_blocks, trim_blocks); reasoning given under any
    of its names reaches the template as `reasoning_content` and `thinking`."""
    source = (
        "{% for m in messages %}\n    {% if m.role == 'assistant' %}\n"
        "[{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.reasoning }}]\n    {% endif %}\n"
        "{% endfor %}"
    )
    messages = [
        TURNS[0],
        {"role": "assistant", "content": "a", "reasoning": "R1"},
        {"role": "assistant", "content": "b", "thinking": "R2"},
        {"role": "assistant", "content": "c", "reasoning_content": "R3"},
    ]
    got, want = _both(llama3, source, messages)
    assert got == want == "[R1|R1|R1]\n[R2|R2|]\n[R3|R3|]\n"


def test_none_values_are_dropped_as_in_transformers(llama3):
    source = (
        "{% for m in messages %}{{ m.content is defined }}{{ m.tool_calls is defined }}{% endfor %}"
    )
    messages = [{"role": "assistant", "content": None, "tool_calls": None}]
    got, want = _both(llama3, source, messages)
    assert got == want == "FalseFalse"


def test_where_the_template_comes_from(tmp_path, llama3):
    """chat_template.jinja beats tokenizer_config.json; named templates pick `tool_use` when
    tools are passed; a directory without a template has none."""
    directory, _ = llama3
    assert ChatTemplate.from_dir(tmp_path) is None
    config = json.loads((directory / "tokenizer_config.json").read_text())
    named = [
        {"name": "default", "template": "D{{ tools is none }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    for layout in ("config-list", "files", "file-beats-config"):
        d = tmp_path / layout
        d.mkdir()
        (d / "tokenizer.json").write_text((directory / "tokenizer.json").read_text())
        cfg = dict(config, chat_template=named if layout == "config-list" else "C")
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        if layout != "config-list":
            (d / "chat_template.jinja").write_text("D{{ tools is none }}")
        if layout == "files":
            (d / "additional_chat_templates").mkdir()
            (d / "additional_chat_templates" / "tool_use.jinja").write_text("T{{ tools | length }}")
        hf = transformers.AutoTokenizer.from_pretrained(d)
        ours = ChatTemplate.from_dir(d)
        for tools in (None, [TOOL]):
            want = hf.apply_chat_template(TURNS, tools=tools, tokenize=False)
            assert ours.render(TURNS, tools=tools) == want, (layout, tools)
        again = ChatTemplate(
            ChatTemplate._parse_config_value(ours.config_value(), d), ours.special_tokens
        )
        assert again.templates == ours.templates


def test_invalid_config_value(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ValueError, match="chat_template=3 is invalid"):
        ChatTemplate.from_dir(tmp_path)
