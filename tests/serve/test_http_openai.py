"""The OpenAI-compatible HTTP API over real sockets on 127.0.0.1, driven by the official
`openai` client (and raw HTTP where the client cannot send the request), with the fake
engine behind it: completions, chat, streaming, n, logprobs, errors, disconnects."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tandem.model.tokenizer import Tokenizer
from tandem.serve import openai_protocol
from tandem.serve.config import ServeConfig
from tests.model.hf_tokenizers import TEMPLATES, build_tokenizer_dir

MAX_PROMPT = 64  # FakeEngine default max_prompt_len
MAX_LEN = 128
CFG = ServeConfig(max_seqs=4, max_queue=16, max_prompt_len=MAX_PROMPT, http_port=0)
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, how are you?"},
]


def _url(bg, path: str) -> str:
    return bg.base_url.removesuffix("/v1") + path


def _post(bg, path: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        _url(bg, path), data=data, headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def _get(bg, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(_url(bg, path), timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _client(bg, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=bg.base_url, api_key=kw.pop("api_key", "none"),
                         max_retries=0, timeout=30, **kw)  # fmt: skip


def _assembled(chunks) -> tuple[str | None, list[tuple[str, str]], str]:
    """A streamed choice as the SDK assembles it (its ChatCompletionStreamState): the
    content (None for none: the first chunk's "" as vLLM's), the calls' (name, arguments),
    the finish reason."""
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    (choice,) = state.get_final_completion().choices
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
    return choice.message.content or None, calls, choice.finish_reason


def _wait(cond, limit: float = 5.0) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def _idle(bg) -> bool:
    orch = bg.server.orch
    return _wait(lambda: orch.active_slots == 0 and orch.queue_depth == 0)


@pytest.fixture
def server(make_fake_server):
    return make_fake_server(cfg=CFG, metrics=True)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> tuple[Tokenizer, Path]:
    """A Qwen2.5-style tokenizer (ChatML template, no BOS, two stop ids) and its directory."""
    path = build_tokenizer_dir("qwen2.5", tmp_path_factory.mktemp("qwen"))
    return Tokenizer.from_dir(path), path


# ---- completions ----------------------------------------------------------------------


def test_completions_text_usage_stop_and_batches(server, tokenizer) -> None:
    client = _client(server)
    (card,) = client.models.list().data
    assert (card.id, card.owned_by, card.model_extra["max_model_len"]) == ("tandem", "tandem", 128)
    assert client.models.retrieve("tandem") == card
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    r = client.completions.create(model="tandem", prompt="héllo STOP world", stop="STOP")
    (choice,) = r.choices
    assert (choice.text, choice.finish_reason, choice.index) == ("héllo ", "stop", 0)
    assert r.object == "text_completion" and r.model == "tandem" and r.id.startswith("cmpl-")
    prompt_tokens = len(tokenizer.encode("héllo STOP world"))
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == len(
        tokenizer.encode("héllo STOP", add_special_tokens=False)
    )
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    r = client.completions.create(model="tandem", prompt="abcdef", max_tokens=3)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("abc", "length")
    assert r.usage.completion_tokens == 3
    # the model's own stop: the echo ends with <eos>, which is never text
    r = client.completions.create(model="tandem", prompt="xyz")
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("xyz", "stop")
    # ignore_eos (vLLM extension): runs through <eos> to max_tokens
    r = client.completions.create(prompt="xy", model="tandem", max_tokens=5,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    # token-id prompts, and batches of texts or of id lists: choices in prompt order
    ids = tokenizer.encode("ids!", add_special_tokens=False)
    assert client.completions.create(model="tandem", prompt=ids).choices[0].text == "ids!"
    r = client.completions.create(model="tandem", prompt=["one", "two", "three"])
    assert [c.text for c in r.choices] == ["one", "two", "three"]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in ["one", "two", "three"])
    r = client.completions.create(model="tandem", prompt=[ids, ids[:2]])
    assert [c.text for c in r.choices] == ["ids!", "id"]
    assert _idle(server)


def test_completions_stream_matches_unary_with_usage(server) -> None:
    client = _client(server)
    prompt = "stream me, then stop here STOP never"
    kw = {"model": "tandem", "prompt": prompt, "stop": ["STOP"], "max_tokens": 64}
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.usage is None for c in chunks)
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    # the same prompt again: the engine's prefix cache served part of it, and usage says so
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # vLLM's continuous_usage_stats: each chunk carries its choice's usage so far
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(**kw, stream=True, stream_options=options))
    counts = [c.usage.completion_tokens for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == full.usage.completion_tokens
    assert all(c.usage.prompt_tokens == full.usage.prompt_tokens for c in chunks)


def test_stream_sends_tokens_whose_text_is_held_back(make_fake_server) -> None:
    """A step's tokens go out at once even when their text cannot yet (a split UTF-8
    character): streaming timing and token counts do not wait for the text (as vLLM)."""
    bg = make_fake_server(cfg=CFG, step_delay=0.01)
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(_client(bg).completions.create(model="tandem", prompt="€€€€", stream=True,
                                                 stream_options=options))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "€€€€"
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    silent = [c for c, before in zip(chunks[1:], counts, strict=False)
              if c.choices and c.choices[0].text == "" and c.usage.completion_tokens > before]  # fmt: skip
    assert silent and counts[-1] == 13  # 12 bytes + <eos>


def test_stream_is_server_sent_events_ending_in_done(server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.server.bound_http_port, timeout=10)
    body = {
        "model": "tandem",
        "prompt": "sse",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = resp.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == "sse"
    assert payloads[-1]["usage"]["completion_tokens"] == 4  # s, s, e, <eos>
    conn.close()


def test_completion_logprobs(server, tokenizer) -> None:
    client = _client(server)
    r = client.completions.create(model="tandem", prompt="abc", logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["a", "b", "c", "<eos>"]  # special tokens spelled out, as OpenAI
    assert lp.text_offset == [0, 1, 2, 3]
    assert lp.token_logprobs == [-0.5] * 4  # the fake engine's
    # the 2 alternatives (fake: token, token+1 at -0.5, -1.5) plus the sampled token
    assert lp.top_logprobs[0] == {"a": -0.5, "b": -1.5}
    r = client.completions.create(model="tandem", prompt="ab", logprobs=0)
    assert r.choices[0].logprobs.top_logprobs == [{"a": -0.5}, {"b": -0.5}, {"<eos>": -0.5}]
    assert client.completions.create(model="tandem", prompt="ab").choices[0].logprobs is None
    chunks = list(client.completions.create(model="tandem", prompt="abc", logprobs=1, stream=True))
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    offsets = [t for c in chunks for t in c.choices[0].logprobs.text_offset]
    assert tokens == ["a", "b", "c", "<eos>"] and offsets == [0, 1, 2, 3]


def test_completion_echo_scores_the_prompt(server, tokenizer) -> None:
    """echo + logprobs as lm-eval's loglikelihood requests send it (token ids, max_tokens 1,
    temperature 0), in OpenAI's and vLLM's shape: the prompt's tokens then the generated
    ones, the first prompt token's logprob and top_logprobs null; and vLLM's
    `prompt_logprobs` (the fake engine scores each prompt token -0.25, rank 1, with
    alternatives token+1, token+2 ... at -1.25, -2.25 ...)."""
    client = _client(server)
    ids = tokenizer.encode("abc", add_special_tokens=False)
    r = client.completions.create(
        model="tandem", prompt=ids, max_tokens=1, logprobs=2, echo=True, temperature=0
    )
    choice = r.choices[0]
    assert choice.text == "abca" and choice.finish_reason == "length"  # prompt + "a"
    lp = choice.logprobs
    assert lp.tokens == ["a", "b", "c", "a"] and lp.text_offset == [0, 1, 2, 3]
    assert lp.token_logprobs == [None, -0.25, -0.25, -0.5]
    assert lp.top_logprobs == [
        None, {"b": -0.25, "c": -1.25}, {"c": -0.25, "d": -1.25}, {"a": -0.5, "b": -1.5}
    ]  # fmt: skip
    b, c, d = ids[1], ids[2], ids[2] + 1
    assert choice.model_extra["prompt_logprobs"] == [
        None,
        {str(b): {"logprob": -0.25, "rank": 1, "decoded_token": "b"},
         str(c): {"logprob": -1.25, "rank": 2, "decoded_token": "c"}},
        {str(c): {"logprob": -0.25, "rank": 1, "decoded_token": "c"},
         str(d): {"logprob": -1.25, "rank": 2, "decoded_token": "d"}},
    ]  # fmt: skip
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 1
    # max_tokens 0 with echo: the prompt alone, scored (vLLM generates one token unseen)
    r = client.completions.create(model="tandem", prompt="abc", max_tokens=0, echo=True,
                                  logprobs=0)  # fmt: skip
    assert r.choices[0].text == "abc"  # the text as sent, the tokens as encoded (as vLLM)
    assert r.choices[0].logprobs.tokens == ["<bos>", "a", "b", "c"]
    assert r.choices[0].logprobs.token_logprobs == [None, -0.25, -0.25, -0.25]
    # echo alone: the text only; prompt_logprobs alone: vLLM's field, no echo
    r = client.completions.create(model="tandem", prompt="abc", echo=True)
    assert r.choices[0].text == "abcabc" and r.choices[0].logprobs is None
    assert r.choices[0].model_extra["prompt_logprobs"] is None
    r = client.completions.create(model="tandem", prompt=ids, extra_body={"prompt_logprobs": 0})
    assert r.choices[0].text == "abc" and r.choices[0].logprobs is None
    assert [list(e) for e in r.choices[0].model_extra["prompt_logprobs"][1:]] == [
        [str(b)], [str(c)]
    ]  # fmt: skip
    # streamed: the first chunk echoes the prompt, text and logprobs
    chunks = list(client.completions.create(model="tandem", prompt=ids, logprobs=1, echo=True,
                                            stream=True))  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks) == "abcabc"
    tokens = [t for ch in chunks for t in ch.choices[0].logprobs.tokens]
    offsets = [t for ch in chunks for t in ch.choices[0].logprobs.text_offset]
    assert tokens == ["a", "b", "c", "a", "b", "c", "<eos>"] and offsets == list(range(7))
    assert chunks[0].choices[0].logprobs.token_logprobs[:3] == [None, -0.25, -0.25]


def test_n_choices_get_seeds_seed_plus_i(server, monkeypatch) -> None:
    orch = server.server.orch
    seeds = []
    submit = orch.submit

    def recording_submit(prompt_ids, params, sink, **kw):
        seeds.append(params.seed)
        return submit(prompt_ids, params, sink, **kw)

    monkeypatch.setattr(orch, "submit", recording_submit)
    client = _client(server)
    r = client.completions.create(model="tandem", prompt="nnn", n=3, seed=7, temperature=0.8)
    assert [c.index for c in r.choices] == [0, 1, 2] and {c.text for c in r.choices} == {"nnn"}
    assert seeds == [7, 8, 9]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 3 * 4
    seeds.clear()
    r = client.completions.create(model="tandem", prompt=["a", "b"], n=2, seed=-1)
    assert [c.text for c in r.choices] == ["a", "a", "b", "b"]
    assert seeds == [2**64 - 1, 0, 2**64 - 1, 0]  # seed + i as 64-bit patterns (-1 is all ones)
    chunks = list(client.completions.create(model="tandem", prompt="zz", n=2, stream=True))
    for i in range(2):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == "zz"
    assert _idle(server)


# ---- chat -----------------------------------------------------------------------------


def test_chat_prompt_is_transformers_template_and_stops_at_model_stop_ids(
    make_fake_server, qwen
) -> None:
    import transformers

    tok, path = qwen
    hf = transformers.AutoTokenizer.from_pretrained(path)
    answer = tok.encode("Fine, thanks!", add_special_tokens=False)
    endoftext = tok.hf.token_to_id("<|endoftext|>")  # a generation_config stop id, not EOS
    assert endoftext != tok.eos_id and endoftext in tok.stop_ids
    prompts = []

    def script(prompt, index):
        if index == 0:
            prompts.append(list(prompt))
        return [*answer, endoftext][index] if index <= len(answer) else tok.eos_id

    bg = make_fake_server(cfg=CFG, tok=tok, script=script)
    client = _client(bg)
    r = client.chat.completions.create(model="tandem", messages=CHAT)
    expected = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert prompts == [expected]
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == "Fine, thanks!"
    assert choice.finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(expected)
    assert r.usage.completion_tokens == len(answer) + 1
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    # /tokenize renders the same prompt; text parts are joined as one content string
    status, body = _post(bg, "/tokenize", {"messages": CHAT})
    assert status == 200 and body["tokens"] == expected and body["count"] == len(expected)
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": CHAT[1]["content"]}]}]
    assert _post(bg, "/tokenize", {"messages": parts})[1]["tokens"] == expected
    status, body = _post(bg, "/tokenize", {"prompt": "Hello", "add_special_tokens": False})
    assert body["tokens"] == hf("Hello", add_special_tokens=False)["input_ids"]
    # streaming: a role chunk first, then content deltas, finish_reason on the last
    chunks = list(client.chat.completions.create(model="tandem", messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Fine, thanks!" and chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == len(answer) + 1
    # logprobs: the chosen token and top_logprobs alternatives, with their UTF-8 bytes
    r = client.chat.completions.create(model="tandem", messages=CHAT, logprobs=True,
                                       top_logprobs=2, max_completion_tokens=3)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.hf.decode([t]) for t in answer[:3]]
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2 for c in content)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model="tandem", messages=CHAT, n=2)
    assert [c.message.content for c in r.choices] == ["Fine, thanks!"] * 2
    assert _idle(bg)


def test_what_sdks_and_chat_uis_send_is_accepted(make_fake_server, qwen) -> None:
    """`null` for any parameter is its default; the SDK's own reply objects go back as
    history; OpenAI's bookkeeping fields change nothing; chat runs to the end of the
    context without max_tokens, completions stop at 16 (OpenAI's and vLLM's defaults)."""
    bg = make_fake_server(cfg=CFG, tok=qwen[0])
    client = _client(bg)
    nulls = dict.fromkeys(["temperature", "top_p", "top_k", "n", "stream", "presence_penalty",
                           "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
                           "ignore_eos", "logprobs", "add_generation_prompt", "max_tokens"])  # fmt: skip
    status, plain = _post(bg, CH, {"messages": CHAT, "max_tokens": 40})
    assert status == 200
    status, reply = _post(bg, CH, {"messages": CHAT, **nulls, "max_completion_tokens": 40})
    assert status == 200 and reply["choices"] == plain["choices"]
    r = client.chat.completions.create(model="tandem", messages=CHAT, temperature=None,
                                       top_p=None, n=None, max_completion_tokens=40)  # fmt: skip
    assert r.choices[0].message.content == plain["choices"][0]["message"]["content"]
    # the reply's message dumped back into the history (refusal, annotations, audio,
    # function_call, tool_calls: null), and OpenAI's fields that change nothing here
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tandem", messages=first, max_completion_tokens=4)
    history = [*first, r.choices[0].message.model_dump(), {"role": "user", "content": "More?"}]
    ignored = {"store": True, "metadata": {"run": "1"}, "service_tier": "auto", "user": "u",
               "prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"],
               "prediction": {"type": "content", "content": "x"}}  # fmt: skip
    status, reply = _post(bg, CH, {"messages": history, "max_tokens": 8})
    assert status == 200, reply
    assert (
        _post(bg, CH, {"messages": history, "max_tokens": 8, **ignored})[1]["choices"]
        == (reply["choices"])
    )
    # OpenAI's top_logprobs range (0..20) is served by default
    r = client.chat.completions.create(model="tandem", messages=CHAT, logprobs=True,
                                       top_logprobs=20, max_completion_tokens=2)  # fmt: skip
    assert [len(t.top_logprobs) for t in r.choices[0].logprobs.content] == [20, 20]
    # without max_tokens: chat to the end of the context, completions 16 tokens
    r = client.chat.completions.create(model="tandem", messages=CHAT,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == MAX_LEN
    r = client.completions.create(model="tandem", prompt="x" * 40)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 16)
    assert _idle(bg)


def test_stop_reason_names_the_stop_string_or_stop_token_id(server, tokenizer) -> None:
    """vLLM's `stop_reason`: the stop string or stop_token_ids entry that ended a choice,
    null for the model's own end token and for length; streamed on the last chunk."""
    body = {"prompt": "ab STOP cd", "max_tokens": 32}
    for extra, reason in [({"stop": "STOP"}, "STOP"), ({"stop_token_ids": [ord("b")]}, ord("b")),
                          ({}, None), ({"max_tokens": 2}, None)]:  # fmt: skip
        status, reply = _post(server, C, {**body, **extra})
        assert status == 200 and reply["choices"][0]["stop_reason"] == reason, (extra, reply)
        stream = _client(server).completions.create(
            model="tandem", **body, extra_body=extra, stream=True
        )
        last = list(stream)[-1].choices[0]
        assert last.finish_reason and last.model_extra["stop_reason"] == reason, extra


class _Scripted:
    """A fake engine's model that writes `answer` (then its EOS) and records each prompt."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.answer, self.prompts = tok, "", []

    def __call__(self, prompt: list[int], index: int) -> int:
        ids = self.tok.encode(self.answer, add_special_tokens=False)
        if index == 0:
            self.prompts.append(list(prompt))
        return ids[index] if index < len(ids) else self.tok.eos_id


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters


def test_tool_calls_named_and_required(make_fake_server, qwen) -> None:
    """A named tool_choice answers with that function's arguments, "required" with a list
    of calls, both as `tool_calls` (streamed too: a named call's arguments in pieces,
    "required" calls whole at the end); the tools and a history of calls and results are
    rendered as transformers renders them (arguments as objects, vLLM's conversion)."""
    import transformers

    tok, path = qwen
    hf = transformers.AutoTokenizer.from_pretrained(path)
    script = _Scripted(tok)

    cfg = dataclasses.replace(CFG, max_len=1024, max_prompt_len=900)
    bg = make_fake_server(cfg=cfg, tok=tok, script=script, step_delay=0.01)  # streamed in steps
    client = _client(bg)
    tools = [WEATHER, CLOCK]
    named = {"type": "function", "function": {"name": "get_weather"}}
    script.answer = '{"city":"Oslo"}'
    r = client.chat.completions.create(model="tandem", messages=CHAT, tools=tools,
                                       tool_choice=named)  # fmt: skip
    expected = hf.apply_chat_template(CHAT, tools=tools, add_generation_prompt=True, tokenize=True)
    assert script.prompts[-1] == list(
        expected["input_ids"] if hasattr(expected, "keys") else expected
    )
    message = r.choices[0].message
    assert message.content is None and r.choices[0].finish_reason == "stop"
    (call,) = message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == (
        "function",
        "get_weather",
        '{"city":"Oslo"}',
    )
    assert call.id.startswith("call_")
    chunks = list(client.chat.completions.create(model="tandem", messages=CHAT, tools=tools,
                                                 tool_choice=named, stream=True))  # fmt: skip
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert len(deltas) > 1 and deltas[0].function.name == "get_weather" and deltas[0].id
    assert all(d.index == 0 and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == '{"city":"Oslo"}'
    assert chunks[-1].choices[0].finish_reason == "stop"
    # "required": the calls the array lists
    script.answer = (
        '[{"name":"get_time","parameters":{}},{"name":"get_weather","parameters":{"city":"Rome"}}]'
    )
    r = client.chat.completions.create(model="tandem", messages=CHAT, tools=tools,
                                       tool_choice="required")  # fmt: skip
    calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert calls == [("get_time", "{}"), ("get_weather", '{"city": "Rome"}')]
    assert r.choices[0].finish_reason == "tool_calls"  # OpenAI's for "required" (and "auto")
    chunks = list(client.chat.completions.create(model="tandem", messages=CHAT, tools=tools,
                                                 tool_choice="required", stream=True))  # fmt: skip
    assert _assembled(chunks) == (None, calls, "tool_calls")
    # each call announced once, then its arguments as they decode
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert [d.index for d in deltas if d.id] == [0, 1] and len(deltas) > 4
    r = client.chat.completions.create(model="tandem", messages=CHAT, tools=tools,
                                       tool_choice="required", parallel_tool_calls=False)  # fmt: skip
    # the scripted model writes two calls; the grammar (one item) leaves it the first
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]
    # cut short by max_tokens, "required" is not whole JSON: it stays text
    r = client.chat.completions.create(model="tandem", messages=CHAT, tools=tools,
                                       tool_choice="required", max_tokens=3)  # fmt: skip
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert script.answer.startswith(r.choices[0].message.content)
    # the calls and their results go back as history; "none" answers in text
    history = [*CHAT, r_named := {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]  # fmt: skip
    script.answer = "Mild."
    r = client.chat.completions.create(model="tandem", messages=history, tools=tools,
                                       tool_choice="none")  # fmt: skip
    assert r.choices[0].message.content == "Mild." and r.choices[0].message.tool_calls is None
    as_objects = [*CHAT, {**r_named, "tool_calls": [{**r_named["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": {"city": "Oslo"}}}]}, history[-1]]  # fmt: skip
    expected = hf.apply_chat_template(as_objects, tools=tools, add_generation_prompt=True,
                                      tokenize=True)  # fmt: skip
    assert script.prompts[-1] == list(
        expected["input_ids"] if hasattr(expected, "keys") else expected
    )
    status, body = _post(bg, "/tokenize", {"messages": history, "tools": tools})
    assert status == 200 and body["tokens"] == script.prompts[-1]
    assert _idle(bg)


def test_auto_tool_choice_parses_the_models_own_calls(make_fake_server, qwen) -> None:
    """With --tool-call-parser hermes, "auto" (the default with tools) returns the
    `<tool_call>` blocks a Qwen-style model writes as tool_calls, finishing with
    "tool_calls", and a text answer as text; streamed, the SDK assembles the same."""
    tok, _ = qwen
    script = _Scripted(tok)

    cfg = dataclasses.replace(CFG, max_len=1024, max_prompt_len=900, tool_call_parser="hermes")
    client = _client(make_fake_server(cfg=cfg, tok=tok, script=script))
    script.answer = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    r = client.chat.completions.create(model="tandem", messages=CHAT, tools=[WEATHER, CLOCK])
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Oslo"},
    )
    chunks = list(client.chat.completions.create(model="tandem", messages=CHAT,
                                                 tools=[WEATHER, CLOCK], stream=True))  # fmt: skip
    whole = [(call.function.name, call.function.arguments)]
    assert _assembled(chunks) == ("Let me look.", whole, "tool_calls")
    script.answer = "It is sunny."
    r = client.chat.completions.create(model="tandem", messages=CHAT, tools=[WEATHER],
                                       tool_choice="auto")  # fmt: skip
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == ("It is sunny.", None)
    assert r.choices[0].finish_reason == "stop"


def test_mistral_calls_keep_their_control_token_and_go_back_as_history(
    make_fake_server, tmp_path
) -> None:
    """With --tool-call-parser mistral, "auto" finds the calls after `[TOOL_CALLS]`, a
    special token that the text of such a request keeps (vLLM's); the call's id is nine
    letters and digits, and the reply sent back (as the SDK dumps it) with the tool's
    result renders as transformers renders it. `skip_special_tokens` (vLLM's) shows
    special tokens in any answer."""
    import transformers

    path = build_tokenizer_dir("mistral", tmp_path / "mistral")
    tok, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    script = _Scripted(tok)

    cfg = dataclasses.replace(CFG, max_len=1024, max_prompt_len=900, tool_call_parser="mistral")
    bg = make_fake_server(cfg=cfg, tok=tok, script=script)
    client, tools = _client(bg), [WEATHER, CLOCK]
    chat = [{"role": "user", "content": "Hello, how are you?"}]
    script.answer = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    r = client.chat.completions.create(model="tandem", messages=chat, tools=tools)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert len(call.id) == 9 and call.id.isalnum()
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Oslo"},
    )
    chunks = list(client.chat.completions.create(model="tandem", messages=chat, tools=tools,
                                                 stream=True))  # fmt: skip
    whole = [(call.function.name, call.function.arguments)]
    assert _assembled(chunks) == (None, whole, "tool_calls")
    (streamed_id,) = [d.id for c in chunks for d in c.choices[0].delta.tool_calls or () if d.id]
    assert len(streamed_id) == 9 and streamed_id.isalnum()
    result = {"role": "tool", "tool_call_id": call.id, "content": "18 C"}
    script.answer = "It is 18 C."
    r = client.chat.completions.create(
        model="tandem", messages=[*chat, choice.message.model_dump(), result], tools=tools
    )
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("It is 18 C.", "stop")
    as_objects = {"role": "assistant", "tool_calls": [{"id": call.id, "type": "function",
                  "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}  # fmt: skip
    expected = hf.apply_chat_template([*chat, as_objects, result], tools=tools,
                                      add_generation_prompt=True, tokenize=True)  # fmt: skip
    assert script.prompts[-1] == list(
        expected["input_ids"] if hasattr(expected, "keys") else expected
    )
    script.answer = "[INST] hi"
    ids = tok.encode(script.answer, add_special_tokens=False)
    for skip in (True, False):
        extra = {"skip_special_tokens": skip}
        r = client.completions.create(model="tandem", prompt="a", max_tokens=8, extra_body=extra)
        text = r.choices[0].text
        assert text == tok.hf.decode(ids, skip_special_tokens=skip)
        assert ("[INST]" in text) is not skip
    assert _idle(bg)


def test_reasoning_parser_returns_the_thinking_apart(make_fake_server, tmp_path) -> None:
    """With --reasoning-parser qwen3 a Qwen3 answer's thinking comes back as `reasoning`
    and `reasoning_content`, the rest as content, whole and streamed alike through the
    SDK; a call after the thinking is parsed from the content; thinking turned off in the
    template is all content; the reply sent back as history renders as
    transformers renders the same conversation; a grammar holds only after the thinking."""
    import transformers

    path = build_tokenizer_dir("qwen3", tmp_path / "qwen3")
    tok, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    script = _Scripted(tok)

    cfg = dataclasses.replace(
        CFG, max_len=1024, max_prompt_len=900, reasoning_parser="qwen3", tool_call_parser="hermes"
    )
    bg = make_fake_server(cfg=cfg, tok=tok, script=script)
    client = _client(bg)
    thought, reply = "\nThe user greets me.\n", "\n\nHi there!"
    script.answer = f"<think>{thought}</think>{reply}"
    message = client.chat.completions.create(model="tandem", messages=CHAT).choices[0].message
    extra = message.model_extra
    assert (message.content, extra["reasoning"], extra["reasoning_content"]) == (
        reply,
        thought,
        thought,
    )
    chunks = list(client.chat.completions.create(model="tandem", messages=CHAT, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == reply
    assert "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas) == thought
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a call after the thinking; thinking off: all content
    script.answer = f'<think>{thought}</think><tool_call>{{"name": "get_time"}}</tool_call>'
    r = client.chat.completions.create(model="tandem", messages=CHAT, tools=[CLOCK])
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"
    script.answer = "No thinking here."
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    message = client.chat.completions.create(model="tandem", messages=CHAT,
                                             extra_body=off).choices[0].message  # fmt: skip
    assert (message.content, message.model_extra["reasoning"]) == ("No thinking here.", None)
    # a grammar holds after the thinking (which is no JSON), whole and streamed
    script.answer = f'<think>{thought}</think>{{"a":1}}'
    message = client.chat.completions.create(model="tandem", messages=CHAT,
                                             response_format={"type": "json_object"}
                                             ).choices[0].message  # fmt: skip
    assert (message.content, message.model_extra["reasoning"]) == ('{"a":1}', thought)
    script.answer = f'<think>{thought}</think>{{"city":"Oslo"}}'
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(client.chat.completions.create(model="tandem", messages=CHAT, stream=True,
                                                 tools=[WEATHER], tool_choice=named))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas) == thought
    calls = [t for d in deltas for t in d.tool_calls or ()]
    assert calls[0].function.name == "get_weather"
    assert "".join(t.function.arguments for t in calls) == '{"city":"Oslo"}'
    # a continued answer (continue_final_message) is content, not a new thinking
    go_on = {"continue_final_message": True, "add_generation_prompt": False}
    messages = [*CHAT, {"role": "assistant", "content": "The answer"}]
    script.answer = " is 4."
    message = client.chat.completions.create(model="tandem", messages=messages,
                                             extra_body=go_on).choices[0].message  # fmt: skip
    assert (message.model_extra["reasoning"], message.content) == (None, " is 4.")
    # the reply (as the SDK dumps it) back as history, with the tool's turn after it
    script.answer = f"<think>{thought}</think>{reply}"
    first = client.chat.completions.create(model="tandem", messages=CHAT).choices[0].message
    history = [*CHAT, first.model_dump(), {"role": "user", "content": "And you?"}]
    client.chat.completions.create(model="tandem", messages=history)
    as_hf = {"role": "assistant", "content": reply, "reasoning_content": thought}
    expected = hf.apply_chat_template([*CHAT, as_hf, history[-1]], add_generation_prompt=True,
                                      tokenize=True)  # fmt: skip
    assert script.prompts[-1] == list(
        expected["input_ids"] if hasattr(expected, "keys") else expected
    )
    # an agent's second turn: the call (content null, as the SDK dumps it) and its result
    # go back; Qwen3's template reads the content as text, so null renders as "" (vLLM's)
    script.answer = f'<think>{thought}</think><tool_call>{{"name": "get_time"}}</tool_call>'
    call = client.chat.completions.create(model="tandem", messages=CHAT, tools=[CLOCK])
    call_message = call.choices[0].message
    assert call_message.content is None
    result = {"role": "tool", "tool_call_id": call_message.tool_calls[0].id, "content": "9:00"}
    script.answer = f"<think>{thought}</think>It is nine."
    second = client.chat.completions.create(
        model="tandem", messages=[*CHAT, call_message.model_dump(), result], tools=[CLOCK]
    )
    assert second.choices[0].message.content == "It is nine."
    as_hf = {**call_message.model_dump(exclude_none=True), "content": "",
             "reasoning_content": thought}  # fmt: skip
    for t in as_hf["tool_calls"]:
        t["function"]["arguments"] = json.loads(t["function"]["arguments"])
    expected = hf.apply_chat_template([*CHAT, as_hf, result], add_generation_prompt=True,
                                      tools=[CLOCK], tokenize=True)  # fmt: skip
    assert script.prompts[-1] == list(
        expected["input_ids"] if hasattr(expected, "keys") else expected
    )
    assert _idle(bg)


def test_continue_final_message(make_fake_server, qwen) -> None:
    """vLLM's continue_final_message: the prompt ends inside the last (assistant) message,
    as transformers renders it, and the answer goes on from there; with
    add_generation_prompt (its default true) it is a 400 naming it."""
    import transformers

    tok, path = qwen
    hf = transformers.AutoTokenizer.from_pretrained(path)
    script = _Scripted(tok)
    cfg = dataclasses.replace(CFG, max_len=1024, max_prompt_len=900)
    bg = make_fake_server(cfg=cfg, tok=tok, script=script)
    partial = [*CHAT, {"role": "assistant", "content": "The capital of France is"}]
    script.answer = " Paris."
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    r = _client(bg).chat.completions.create(model="tandem", messages=partial, extra_body=extra)
    assert r.choices[0].message.content == " Paris."
    expected = hf.apply_chat_template(partial, continue_final_message=True, tokenize=True)
    assert script.prompts[-1] == list(
        expected["input_ids"] if hasattr(expected, "keys") else expected
    )
    status, body = _post(bg, "/tokenize", {"messages": partial, **extra})
    assert status == 200 and body["tokens"] == script.prompts[-1]
    status, body = _post(bg, CH, {"messages": partial, "continue_final_message": True})
    assert status == 400 and body["error"]["param"] == "continue_final_message"
    assert _idle(bg)


def test_chat_template_flag(make_fake_server, qwen) -> None:
    """vLLM's --chat-template: a file, or the Jinja text itself, replaces the bundle's
    template (rendered as transformers renders that template, with the bundle's special
    tokens) or serves chat for a bundle without one; a missing file or a template that
    does not parse stops the server at start-up, naming chat_template."""
    import transformers

    tok, path = qwen
    hf = transformers.AutoTokenizer.from_pretrained(path)
    source = TEMPLATES / "qwen3.jinja"  # not the bundle's own (Qwen2.5's)
    script = _Scripted(tok)
    cfg = dataclasses.replace(CFG, max_len=1024, max_prompt_len=900, chat_template=str(source))
    bg = make_fake_server(cfg=cfg, tok=tok, script=script)
    _client(bg).chat.completions.create(model="tandem", messages=CHAT)
    expected = hf.apply_chat_template(CHAT, chat_template=source.read_text(), tokenize=True,
                                      add_generation_prompt=True)  # fmt: skip
    assert script.prompts[-1] == list(
        expected["input_ids"] if hasattr(expected, "keys") else expected
    )
    status, body = _post(make_fake_server(cfg=CFG), CH, {"messages": CHAT})  # no template
    assert status == 400 and body["error"]["code"] == "no_chat_template"
    inline = dataclasses.replace(
        CFG, chat_template="{% for m in messages %}{{ m.content }}\n{% endfor %}"
    )
    status, body = _post(make_fake_server(cfg=inline), "/tokenize", {"messages": CHAT})
    assert status == 200 and bytes(body["tokens"]).decode() == "".join(
        m["content"] + "\n" for m in CHAT
    )
    for bad, match in [("no/such.jinja", "no such file"), ("{% if %}", "does not parse")]:
        with pytest.raises(ValueError, match=f"chat_template=.*{match}"):
            make_fake_server(cfg=dataclasses.replace(CFG, chat_template=bad))


def test_a_reasoning_parser_needs_the_models_end_of_thinking(make_fake_server) -> None:
    """As vLLM's parsers, refused at start-up for a model without a `</think>` token."""
    with pytest.raises(ValueError, match=r"reasoning_parser='qwen3' is invalid.*</think>"):
        make_fake_server(cfg=dataclasses.replace(CFG, reasoning_parser="qwen3"))


def test_tool_choice_errors_name_the_field(make_fake_server, qwen) -> None:
    cfg = dataclasses.replace(CFG, max_len=1024, max_prompt_len=900)
    bg = make_fake_server(cfg=cfg, tok=qwen[0])
    named = {"type": "function", "function": {"name": "nope"}}
    bad_history = [*CHAT, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]  # fmt: skip
    for body, param, code in [
        ({"tools": [WEATHER]}, "tool_choice", "not_supported_yet"),  # "auto", the default
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "not_supported_yet"),
        ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
        ({"tools": [WEATHER], "tool_choice": named}, "tool_choice", "invalid_value"),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0].function",
         "invalid_value"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {
            "type": "json_object"}}, "tool_choice", "invalid_value"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {}}},
         "tool_choice.function.name", "invalid_value"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "nonsense"}}}], "tool_choice": "required"}, "tools", "invalid_value"),
        ({"messages": bad_history}, "messages[2].tool_calls", "invalid_value"),
    ]:  # fmt: skip
        status, reply = _post(bg, CH, {"messages": CHAT, **body})
        assert status == 400, (body, reply)
        assert (reply["error"]["param"], reply["error"]["code"]) == (param, code), reply
    assert _idle(bg)


def test_chat_without_template_is_a_clear_400(server) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).chat.completions.create(model="tandem", messages=CHAT)
    assert err.value.body["param"] == "messages" and "chat template" in err.value.body["message"]
    assert err.value.body["code"] == "no_chat_template"


# ---- errors ---------------------------------------------------------------------------


def _raw(text: str) -> bytes:
    return text.encode()


C, CH = "/v1/completions", "/v1/chat/completions"
BAD_REQUESTS = [
    # (id, path, body, HTTP status, param the error must name); the gRPC table's rows first
    ("empty_prompt", C, {"prompt": ""}, 400, "prompt"),
    ("empty_ids", C, {"prompt": []}, 400, "prompt"),
    ("invalid_utf8", C, b'{"prompt": "a\xc3("}', 400, None),
    ("garbage_bytes", C, b"\xff\xff\xff\xff", 400, None),
    ("unknown_field", C, {"prompt": "hi", "bogus": 1}, 400, "bogus"),
    ("max_tokens_negative", C, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens_zero", C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("prompt_logprobs_too_many", C, {"prompt": "hi", "prompt_logprobs": 50}, 400,
     "prompt_logprobs"),
    ("prompt_logprobs_negative", C, {"prompt": "hi", "prompt_logprobs": -1}, 400,
     "prompt_logprobs"),
    ("max_tokens_huge", C, {"prompt": "hi", "max_tokens": 2**31 - 1}, 400, "max_tokens"),
    ("max_tokens_past_ctx", C, {"prompt": "hi", "max_tokens": MAX_LEN - 2}, 400, "max_tokens"),
    ("temperature_negative", C, {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("temperature_nan", C, _raw('{"prompt": "hi", "temperature": NaN}'), 400, "temperature"),
    ("temperature_inf", C, _raw('{"prompt": "hi", "temperature": Infinity}'), 400, "temperature"),
    ("temperature_text", C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("top_p_zero", C, {"prompt": "hi", "top_p": 0.0}, 400, "top_p"),
    ("top_p_above_one", C, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("top_p_negative", C, {"prompt": "hi", "top_p": -0.1}, 400, "top_p"),
    ("top_p_nan", C, _raw('{"prompt": "hi", "top_p": NaN}'), 400, "top_p"),
    ("top_k_negative", C, {"prompt": "hi", "top_k": -3}, 400, "top_k"),
    ("top_k_above_vocab", C, {"prompt": "hi", "top_k": 100000}, 400, "top_k"),
    ("logprobs_negative", C, {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("logprobs_too_many", C, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("stop_empty_string", C, {"prompt": "hi", "stop": ""}, 400, "stop"),
    ("stop_one_empty", C, {"prompt": "hi", "stop": ["ok", ""]}, 400, "stop"),
    ("stop_id_negative", C, {"prompt": "hi", "stop_token_ids": [-5]}, 400, "stop_token_ids"),
    ("stop_id_past_vocab", C, {"prompt": "hi", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("prompt_id_past_vocab", C, {"prompt": [1, 10**6]}, 400, "prompt"),
    ("prompt_id_negative", C, {"prompt": [-1]}, 400, "prompt"),
    ("prompt_too_long", C, {"prompt": "x" * MAX_PROMPT}, 400, "prompt"),
    ("prompt_ids_too_long", C, {"prompt": [5] * (MAX_PROMPT + 1)}, 400, "prompt"),
    ("prompt_huge_text", C, {"prompt": "y" * 200_000}, 400, "prompt"),
    ("prompt_wrong_type", C, {"prompt": 5}, 400, "prompt"),
    ("body_over_4mb", C, {"prompt": "z" * (5 << 20)}, 413, None),
    ("not_json_object", C, _raw("[1, 2]"), 400, None),
    ("n_zero", C, {"prompt": "hi", "n": 0}, 400, "n"),
    ("n_past_queue", C, {"prompt": "hi", "n": 17}, 400, "n"),
    ("seed_past_64_bits", C, {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    ("stream_options_unstreamed", C, {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("unknown_model", C, {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("presence_penalty_above_two", C, {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("frequency_penalty_below_minus_two", C, {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("repetition_penalty_zero", C, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("repetition_penalty_nan", C, _raw('{"prompt": "hi", "repetition_penalty": NaN}'), 400, "repetition_penalty"),
    ("min_p_above_one", C, {"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    ("min_tokens_negative", C, {"prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ("min_tokens_past_max_tokens", C, {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("logit_bias_above_100", C, {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("logit_bias_key_not_an_id", C, {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit_bias_id_negative", C, {"prompt": "hi", "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    ("logit_bias_id_past_vocab", C, {"prompt": "hi", "logit_bias": {"100000": 1}}, 400, "logit_bias"),
    ("logit_bias_too_many", C, {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    ("chat_presence_penalty_above_two", CH, {"messages": CHAT, "presence_penalty": 3}, 400, "presence_penalty"),
    ("chat_no_messages", CH, {"messages": []}, 400, "messages"),
    ("chat_bad_role", CH, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("chat_image_part", CH, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content[0].type"),
    ("chat_top_logprobs_alone", CH, {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat_top_logprobs_too_many", CH, {"messages": CHAT, "logprobs": True, "top_logprobs": 50},
     400, "top_logprobs"),
    ("chat_max_completion_tokens_zero", CH, {"messages": CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("chat_max_completion_tokens_huge", CH, {"messages": CHAT, "max_completion_tokens": 2**31 - 1},
     400, "max_completion_tokens"),
    ("chat_max_tokens_huge", CH, {"messages": CHAT, "max_tokens": 2**31 - 1}, 400, "max_tokens"),
    ("chat_unknown_model", CH, {"messages": CHAT, "model": "gpt-4"}, 404, "model"),
    ("chat_template_kwargs_reserved", CH, {"messages": CHAT, "chat_template_kwargs":
     {"add_generation_prompt": False}}, 400, "chat_template_kwargs"),
    ("chat_empty_structured_regex", CH, {"messages": CHAT, "structured_outputs": {"regex": ""}},
     400, "structured_outputs"),
    ("empty_structured_grammar", C, {"prompt": "hi", "structured_outputs": {"grammar": ""}}, 400,
     "structured_outputs"),
    ("chat_template_kwargs_self", CH, {"messages": CHAT, "chat_template_kwargs": {"self": 1}},
     400, "chat_template_kwargs"),
    ("prompt_logprobs_streamed", C, {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, 400,
     "prompt_logprobs"),
    ("chat_bad_json_schema", CH, {"messages": CHAT, "response_format": {"type": "json_schema",
     "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ("chat_audio_modality", CH, {"messages": CHAT, "modalities": ["text", "audio"]}, 400,
     "modalities[1]"),
    ("chat_history_audio", CH, {"messages": [*CHAT, {"role": "assistant", "audio": {"id": "a"}}]},
     400, "messages[2].audio"),
]  # fmt: skip
# Known parameters whose feature is not served yet: refused unless at their "off" value.
NOT_YET = [
    (C, "suffix", "x"), (C, "best_of", 2), (CH, "functions", [{"name": "f"}]), (CH, "function_call", "auto"),
    (CH, "audio", {"voice": "alloy", "format": "wav"}),
]  # fmt: skip


def test_bad_requests_are_400s_naming_the_param_and_server_keeps_serving(
    make_fake_server, qwen
) -> None:
    assert len(BAD_REQUESTS) >= 40
    plain = make_fake_server(cfg=CFG, metrics=True)
    chat = make_fake_server(cfg=CFG, tok=qwen[0])
    client = _client(plain)
    for name, path, body, status, param in BAD_REQUESTS:
        bg = chat if path == CH else plain
        got, reply = _post(bg, path, body)
        assert got == status, (name, reply)
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["param"] == param, (name, error)
        if param is not None:
            assert param.split("[")[0].split(".")[0] in error["message"], (name, error)
        # and a good request still works right after each bad one
        assert client.completions.create(model="tandem", prompt="ok").choices[0].text == "ok"
    for path, param, value in NOT_YET:
        body = {"prompt": "hi"} if path == C else {"messages": CHAT}
        got, reply = _post(chat if path == CH else plain, path, {**body, param: value})
        assert (got, reply["error"]["param"]) == (400, param), (param, reply)
        assert reply["error"]["code"] == "not_supported_yet", reply
        assert "is not supported" in reply["error"]["message"]
    for param, off in openai_protocol.NOT_YET.items():  # the "off" values are accepted
        if param in openai_protocol.CompletionRequest.model_fields:
            assert _post(plain, C, {"prompt": "ok", param: off})[0] == 200, param
    ok = {"prompt": "ok", "best_of": 1, "top_k": -1, "logit_bias": {}, "user": "u1"}
    assert _post(plain, C, ok)[0] == 200
    assert _post(chat, CH, {"messages": CHAT, "response_format": {"type": "text"},
                            "tools": [], "tool_choice": "none"})[0] == 200  # fmt: skip
    assert _get(plain, "/v1/nope")[0] == 404 and _get(plain, C)[0] == 405
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    for bg in (plain, chat):
        assert _idle(bg)
    # rejections are counted under gRPC's status names, as gRPC's are
    invalid = sum(row[1] == C and row[3] == 400 for row in BAD_REQUESTS)
    invalid += sum(row[0] == C for row in NOT_YET)
    _, metrics = _get(plain, "/metrics")
    assert f'tandem_requests_total{{status="INVALID_ARGUMENT"}} {invalid}.0'.encode() in metrics
    assert b'tandem_requests_total{status="NOT_FOUND"} 2.0' in metrics
    assert b'tandem_requests_total{status="RESOURCE_EXHAUSTED"} 1.0' in metrics  # the 413


def test_a_server_bug_is_an_openai_shaped_500_and_the_server_goes_on(server, monkeypatch):
    def broken(token: int) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.server.http.service, "token_text", broken)
    status, reply = _post(server, C, {"prompt": "ab", "logprobs": 1})
    assert status == 500 and reply["error"]["code"] == "internal"
    assert "RuntimeError" in reply["error"]["message"]
    assert _post(server, C, {"prompt": "ok"})[1]["choices"][0]["text"] == "ok"
    assert _idle(server)


def test_queue_full_is_429_and_warming_up_is_503(make_fake_server, tokenizer) -> None:
    # steps of 50 ms: the running stream lasts 3 s, past what a loaded host takes to fill
    # the queue behind it (at 20 ms it sometimes ended first)
    bg = make_fake_server(cfg=dataclasses.replace(CFG, max_seqs=1, max_queue=2), step_delay=0.05)
    client, orch = _client(bg), bg.server.orch

    def stream():
        return client.completions.create(
            model="tandem", prompt="w" * 60, max_tokens=60, stream=True
        )

    streams = [stream()]
    next(iter(streams[0]))  # running
    streams.append(stream())
    assert _wait(lambda: orch.queue_depth == 1)
    with pytest.raises(openai.RateLimitError):  # n=2: the 2nd does not fit, the 1st is withdrawn
        client.completions.create(model="tandem", prompt="x", n=2)
    assert _wait(lambda: orch.queue_depth == 1)
    streams.append(stream())
    assert _wait(lambda: orch.queue_depth == 2)
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="tandem", prompt="overflow")
    assert time.monotonic() - t0 < 2.0 and err.value.body["code"] == "resource_exhausted"
    for s in streams:
        s.close()
    assert _idle(bg)

    from tandem.serve.fake_engine import FakeEngine
    from tandem.serve.server import BackgroundServer, TandemServer

    gate = threading.Event()

    class SlowWarmup(FakeEngine):
        def warmup(self) -> None:
            gate.wait(10)
            super().warmup()

    warming = BackgroundServer(
        TandemServer(SlowWarmup(tokenizer), dataclasses.replace(CFG, port=0))
    ).start(wait_ready=False)
    try:
        assert _get(warming, "/health")[0] == 503
        with pytest.raises(openai.InternalServerError) as err:
            _client(warming).completions.create(model="tandem", prompt="early")
        assert err.value.status_code == 503
        assert _get(warming, "/v1/models")[0] == 200  # static facts are there at once
        gate.set()
        assert _wait(lambda: _get(warming, "/health")[0] == 200)
        assert (
            _client(warming).completions.create(model="tandem", prompt="now").choices[0].text
            == "now"
        )
    finally:
        gate.set()
        warming.stop()


def test_drain_finishes_streams_while_health_and_new_requests_get_503(make_fake_server) -> None:
    bg = make_fake_server(cfg=CFG, step_delay=0.01)
    client = _client(bg)
    stream = client.completions.create(model="tandem", prompt="drain me please", stream=True)
    it = iter(stream)
    text = next(it).choices[0].text
    stopper = threading.Thread(target=bg.stop, kwargs={"grace": 10})
    stopper.start()
    assert _wait(lambda: not bg.server.ready.is_set())
    assert _get(bg, "/health")[0] == 503
    status, reply = _post(bg, C, {"prompt": "late"})
    assert status == 503 and reply["error"]["code"] == "unavailable"
    text += "".join(c.choices[0].text for c in it)  # the in-flight stream completes
    stopper.join(30)
    assert text == "drain me please"


def test_disconnect_cancels_stream_and_unary_within_a_step(make_fake_server) -> None:
    bg = make_fake_server(cfg=CFG, step_delay=0.01)
    orch, port = bg.server.orch, bg.server.bound_http_port
    for stream in (True, False):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = {"model": "tandem", "prompt": "c" * 60, "stream": stream}
        conn.request("POST", C, json.dumps(body), {"content-type": "application/json"})
        if stream:
            resp = conn.getresponse()
            assert resp.status == 200 and resp.readline().startswith(b"data: ")
        assert _wait(lambda: orch.active_slots == 1)
        steps_at_close = orch.steps
        conn.sock.shutdown(2)
        conn.close()
        assert _idle(bg), stream
        assert orch.steps - steps_at_close <= 3  # freed within a step of the server noticing


def test_cancel_soak_leaks_no_sequence(make_fake_server) -> None:
    """Many concurrent streamed and unary requests, most abandoned at random points:
    afterwards no sequence is running or queued and the server still answers."""
    bg = make_fake_server(cfg=dataclasses.replace(CFG, max_seqs=4, max_queue=64), step_delay=0.002)
    port, rng = bg.server.bound_http_port, random.Random(0)
    completed = []

    def worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(6):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            stream = r.random() < 0.7
            prompt = "s" * r.randint(5, 60)
            body = {"model": "tandem", "prompt": prompt, "stream": stream, "n": r.choice([1, 2])}
            conn.request("POST", C, json.dumps(body), {"content-type": "application/json"})
            if r.random() < 0.7:  # hang up: before the answer, or after some events
                if stream and r.random() < 0.5:
                    resp = conn.getresponse()
                    for _ in range(r.randint(1, 5)):
                        resp.readline()
                else:
                    time.sleep(r.random() * 0.05)
                conn.sock.shutdown(2)
            else:
                resp = conn.getresponse()
                assert resp.status == 200
                data = resp.read().decode()
                completed.append(data.endswith("data: [DONE]\n\n") if stream else "choices" in data)
            conn.close()

    threads = [threading.Thread(target=worker, args=(rng.random(),)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert completed and all(completed)
    assert _idle(bg)
    assert _client(bg).completions.create(model="tandem", prompt="alive").choices[0].text == "alive"


# ---- auth, TLS, metrics, config -------------------------------------------------------


def test_bearer_token(make_fake_server) -> None:
    bg = make_fake_server(cfg=CFG, token="s3cret")
    with pytest.raises(openai.AuthenticationError) as err:
        _client(bg, api_key="wrong").completions.create(model="tandem", prompt="hi")
    assert err.value.body["code"] == "invalid_api_key"
    assert _post(bg, "/tokenize", {"prompt": "x"})[0] == 401
    assert _get(bg, "/v1/models")[0] == 401
    assert _get(bg, "/health")[0] == 200  # probes need no secret, as gRPC's health
    r = _client(bg, api_key="s3cret").completions.create(model="tandem", prompt="hi")
    assert r.choices[0].text == "hi"


def _preflight(bg, origin: str) -> tuple[int, dict]:
    req = urllib.request.Request(_url(bg, CH), method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def test_cors_lets_browser_clients_in(make_fake_server) -> None:
    """A chat UI served from its own origin: the preflight passes without the token (a
    browser sends none there) and replies carry the allowed origin; vLLM's default "*"."""
    bg = make_fake_server(cfg=CFG, token="s3cret")
    status, headers = _preflight(bg, "http://ui.example")
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    assert "authorization" in headers["access-control-allow-headers"].lower()
    auth = {"Authorization": "Bearer s3cret", "Origin": "http://ui.example"}
    req = urllib.request.Request(_url(bg, C), data=b'{"prompt": "hi"}', headers=auth)
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["access-control-allow-origin"] == "*"
        assert json.loads(resp.read())["choices"][0]["text"] == "hi"
    only = make_fake_server(cfg=dataclasses.replace(CFG, allowed_origins=("http://ui.example",)))
    assert _preflight(only, "http://ui.example")[1]["access-control-allow-origin"] == (
        "http://ui.example"
    )
    assert _preflight(only, "http://evil.example")[0] == 400
    off = make_fake_server(cfg=dataclasses.replace(CFG, allowed_origins=()))
    assert "access-control-allow-origin" not in _preflight(off, "http://ui.example")[1]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
def test_tls(tmp_path: Path, tokenizer) -> None:
    from tandem.serve.fake_engine import FakeEngine
    from tandem.serve.server import BackgroundServer, TandemServer

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    cfg = dataclasses.replace(CFG, port=0, tls_cert=str(cert), tls_key=str(key))
    with BackgroundServer(TandemServer(FakeEngine(tokenizer), cfg)) as bg:
        assert bg.base_url.startswith("https://")
        client = _client(bg, http_client=openai.DefaultHttpxClient(verify=str(cert)))
        assert (
            client.completions.create(model="tandem", prompt="secure").choices[0].text == "secure"
        )
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(_url(bg, "/health"), context=context, timeout=10) as resp:
            assert resp.status == 200


def test_http_and_grpc_share_one_orchestrator_and_metrics(server) -> None:
    from tandem.serve.client import TandemClient

    _client(server).completions.create(model="tandem", prompt="via http")
    with TandemClient(server.target) as grpc_client:
        assert grpc_client.generate_text("via grpc").text == "via grpc"
    status, body = _get(server, "/metrics")
    assert status == 200 and b'tandem_requests_total{status="OK"} 2.0' in body
    side = server.server.bound_metrics_port
    other = urllib.request.urlopen(f"http://127.0.0.1:{side}/metrics", timeout=5).read()

    def samples(text: bytes) -> dict[str, str]:  # sample (name and labels) -> value
        lines = text.decode().splitlines()
        return dict(line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))

    # the same registry: the same samples, and the same counts (gauges and timings may
    # move between two scrapes while the loop runs)
    one, two = samples(body), samples(other)
    assert one.keys() == two.keys()
    counts = [k for k in one if k.startswith("tandem_requests_total")]
    assert counts and all(one[k] == two[k] for k in counts)


def test_taken_http_port_fails_start_and_frees_the_grpc_port(tokenizer) -> None:
    from tandem.serve.fake_engine import FakeEngine
    from tandem.serve.server import TandemServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = dataclasses.replace(CFG, port=0, http_port=taken.getsockname()[1])
        server = TandemServer(FakeEngine(tokenizer), cfg)
        with pytest.raises(ValueError, match=rf"^http_port={cfg.http_port} is invalid: .* in use"):
            asyncio.run(server.start())
    assert server._server is None and server.bound_port is not None
    with socket.socket() as again:  # no half-started replica: the gRPC port is free again
        again.bind(("127.0.0.1", server.bound_port))


def test_config_keys_and_model_name(tmp_path) -> None:
    from tandem.serve.http_server import served_model_name

    assert ServeConfig().http_port is None
    for bad in (-1, 70000):
        with pytest.raises(ValueError, match="http_port"):
            ServeConfig(http_port=bad)
    with pytest.raises(ValueError, match="served_model_name"):
        ServeConfig(served_model_name=" x")
    assert served_model_name(ServeConfig(bundle=str(tmp_path / "my-model"))) == "my-model"
    assert served_model_name(ServeConfig(bundle="b", served_model_name="named")) == "named"
    assert served_model_name(ServeConfig()) == "tandem"
