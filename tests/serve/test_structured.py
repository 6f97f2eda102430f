"""Structured output (tandem/serve/structured.py): response_format over HTTP with the official
`openai` client and the gRPC oneof over a real socket, on the JAX engine (a tiny random
model with a Qwen2.5-style byte-level BPE tokenizer) and on the fake engine; outputs parse
and validate (pydantic models of the test schemas; `jsonschema` is not installed); the
device bitmask against llguidance's own numpy reference; compact JSON."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
from pathlib import Path
from typing import Literal

import grpc
import jax.numpy as jnp
import llguidance
import llguidance.numpy
import numpy as np
import openai
import pydantic
import pytest
from flax import nnx

from tandem.model.bundle import flat_params, write_bundle
from tandem.model.chat_template import ChatTemplate
from tandem.model.config import ModelConfig
from tandem.model.tokenizer import Tokenizer
from tandem.model.transformer import Transformer
from tandem.proto.v1 import generate_pb2 as pb
from tandem.serve.config import ServeConfig
from tandem.serve.engine import JaxEngine
from tandem.serve.orchestrator import Orchestrator
from tandem.serve.sampling import SamplingParams
from tandem.serve.server import BackgroundServer, TandemServer
from tandem.serve.structured import (
    JSON_OPTIONS,
    GrammarCompiler,
    StructuredOutput,
    apply_bitmask,
)
from tests.model.hf_tokenizers import build_tokenizer_dir
from tests.serve.test_http_engine import SCFG

GENERATE = "/tandem.v1.Generation/Generate"


class Answer(pydantic.BaseModel):
    """The test schema: every value bounded, so even a random model closes the object."""

    model_config = pydantic.ConfigDict(extra="forbid")
    ok: bool
    color: Literal["red", "green", "blue"]
    count: int = pydantic.Field(ge=0, le=99)
    name: str = pydantic.Field(max_length=6)


SCHEMA = Answer.model_json_schema()
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
}
CHAT = [{"role": "user", "content": "Describe the sky as JSON."}]


def _client(bg: BackgroundServer) -> tuple[openai.OpenAI, str]:
    """The official client on the server's HTTP API, and the served model's name."""
    client = openai.OpenAI(base_url=bg.base_url, api_key="none", max_retries=0)
    return client, client.models.list().data[0].id


# ---- the grammar engine and the device mask ------------------------------------------


@pytest.fixture(scope="module", params=["qwen2.5", "llama3"])
def bpe_tokenizer(request, tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(build_tokenizer_dir(request.param, tmp_path_factory.mktemp("tok")))


def test_apply_bitmask_matches_llguidance_reference(bpe_tokenizer) -> None:
    compiler = GrammarCompiler(bpe_tokenizer)
    matcher = compiler.matcher(StructuredOutput("json_schema", json.dumps(SCHEMA)))
    assert matcher.accept(bpe_tokenizer.encode('{"', add_special_tokens=False)[0])
    vocab = bpe_tokenizer.vocab_size + 37  # a model's padded vocabulary
    mask = np.zeros((2, (vocab + 31) // 32), np.int32)
    mask[0] = -1
    mask[1, : compiler.mask_words] = np.frombuffer(matcher._matcher.compute_bitmask(), np.int32)
    logits = np.random.default_rng(0).normal(size=(2, vocab)).astype(np.float32)
    expected = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, mask)
    got = np.asarray(apply_bitmask(jnp.asarray(logits), jnp.asarray(mask)))
    np.testing.assert_array_equal(got, expected)
    assert np.isfinite(got[0]).all() and 0 < np.isfinite(got[1]).sum() < 20


def test_finished_grammar_allows_only_the_stop_ids(bpe_tokenizer) -> None:
    compiler = GrammarCompiler(bpe_tokenizer)
    matcher = compiler.matcher(StructuredOutput("regex", "yes|no"))
    for t in bpe_tokenizer.encode("yes", add_special_tokens=False):
        assert matcher.accept(t)
    bits = np.unpackbits(
        np.frombuffer(matcher._matcher.compute_bitmask(), np.uint8), bitorder="little"
    )
    assert set(np.flatnonzero(bits)) == set(bpe_tokenizer.stop_ids)
    assert not matcher.finished
    assert matcher.accept(min(bpe_tokenizer.stop_ids)) and matcher.finished


def test_json_is_compact(bpe_tokenizer) -> None:
    """No whitespace between JSON tokens (llguidance's default allows any run of it)."""
    compiler = GrammarCompiler(bpe_tokenizer)
    prefix = bpe_tokenizer.encode('{"ok":', add_special_tokens=False)
    space = {i for i in range(bpe_tokenizer.vocab_size) if bpe_tokenizer.decode([i]).isspace()}
    assert space

    def allowed(options: dict) -> set[int]:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options)
        m = llguidance.LLMatcher(compiler.tokenizer, grammar, log_level=0)
        assert m.consume_tokens(prefix)
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")
        return set(np.flatnonzero(bits).tolist())

    assert allowed({}) & space  # the library's default: whitespace may follow the ':'
    assert not allowed(JSON_OPTIONS) & space


@pytest.mark.parametrize(
    ("output", "field"),
    [
        (StructuredOutput("json_schema", "{not json"), "json_schema"),
        (StructuredOutput("json_schema", '{"type": "nonsense"}'), "json_schema"),
        (StructuredOutput("json_schema", "[1, 2]"), "json_schema"),
        (StructuredOutput("regex", "[a-z]+("), "regex"),
        (StructuredOutput("grammar", "start: undefined_rule"), "grammar"),
    ],
    ids=lambda x: x if isinstance(x, str) else x.spec[:12],
)
def test_invalid_grammar_names_the_field(output, field, tokenizer) -> None:
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid"):
        GrammarCompiler(tokenizer).compile(output)


# ---- the fake engine: API plumbing, whitespace-loving model --------------------------


@pytest.fixture
def fake_http(make_fake_server):
    return make_fake_server(
        cfg=ServeConfig(max_seqs=4, max_queue=16, max_prompt_len=64, http_port=0)
    )


def test_bad_schema_is_400_and_server_keeps_serving(fake_http) -> None:
    client, model = _client(fake_http)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    for response_format, param in [
        (bad, "response_format"),
        (
            {"type": "json_schema", "json_schema": {"name": "x"}},
            "response_format.json_schema.schema",
        ),
        ({"type": "xml"}, "response_format.type"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:  # (the byte tokenizer has no
            client.completions.create(  # chat template: completions, vLLM's extension)
                model=model,
                prompt="x",
                max_tokens=8,
                extra_body={"response_format": response_format},
            )
        assert err.value.body["param"] == param, err.value.body
        out = client.completions.create(model=model, prompt="still here", max_tokens=20)
        assert out.choices[0].text == "still here"


def test_grpc_bad_regex_is_invalid_argument(fake_http) -> None:
    with grpc.insecure_channel(fake_http.target) as channel:
        call = channel.unary_stream(GENERATE)
        with pytest.raises(grpc.RpcError) as err:
            list(call(pb.GenerateRequest(prompt="hi", regex="(").SerializeToString(), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "regex" in err.value.details()
        ok = list(call(pb.GenerateRequest(prompt="hi").SerializeToString(), timeout=10))
        assert "".join(pb.GenerateResponse.FromString(r).text for r in ok) == "hi"


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _spy(real: type, on_call) -> type:
    """A stand-in for llguidance class `real`: constructing it calls `on_call()` first;
    every other attribute (its static methods) is `real`'s."""

    class Meta(type):
        def __call__(cls, *args, **kwargs):
            on_call()
            return real(*args, **kwargs)

        def __getattr__(cls, name):
            return getattr(real, name)

    return Meta(real.__name__, (), {})


def _grpc_text(bg: BackgroundServer, request: pb.GenerateRequest) -> list[str]:
    """Each choice's text from the streaming Generate."""
    with grpc.insecure_channel(bg.target) as channel:
        replies = channel.unary_stream(GENERATE)(request.SerializeToString(), timeout=30)
        texts = [""] * max(request.n, 1)
        for raw in replies:
            reply = pb.GenerateResponse.FromString(raw)
            texts[reply.index] += reply.text
        return texts


def test_grammar_work_never_runs_on_the_event_loop(fake_http, monkeypatch) -> None:
    """The grammar engine's build and every grammar compile or matcher built for a request
    with n choices, over both APIs, run on worker threads: on the event loop they would
    stall every stream for as long (tens of ms per matcher for a large schema)."""
    built = []  # whether each LLTokenizer / LLMatcher construction ran on an event loop
    for name in ("LLTokenizer", "LLMatcher"):
        real = getattr(llguidance, name)
        monkeypatch.setattr(llguidance, name, _spy(real, lambda: built.append(_on_event_loop())))
    client, model = _client(fake_http)
    out = client.completions.create(
        model=model,
        prompt="x",
        max_tokens=8,
        n=4,
        extra_body={"structured_outputs": {"regex": "ab"}},
    )
    assert [c.text for c in out.choices] == ["ab"] * 4
    assert _grpc_text(fake_http, pb.GenerateRequest(prompt="y", regex="cd", n=3)) == ["cd"] * 3
    assert len(built) >= 3 and not any(built), built  # tokenizer, then one compile per grammar


def test_a_grammar_compile_blocks_neither_the_loop_nor_compiled_grammars(
    fake_http, monkeypatch
) -> None:
    """While one request's grammar compiles (held here until released), both APIs keep
    answering other requests, those with an already compiled grammar included."""
    client, model = _client(fake_http)
    fast = openai.OpenAI(base_url=fake_http.base_url, api_key="none", max_retries=0, timeout=10)
    ready = fast.completions.create(
        model=model, prompt="x", max_tokens=8, extra_body={"structured_outputs": {"regex": "ab"}}
    )  # "ab" compiled
    assert ready.choices[0].text == "ab"
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        assert release.wait(30)

    monkeypatch.setattr(llguidance, "LLMatcher", _spy(llguidance.LLMatcher, hold))
    results = []
    pending = [
        threading.Thread(target=lambda: results.append(client.completions.create(
            model=model, prompt="x", max_tokens=8, extra_body={"structured_outputs": {"regex": "cd"}},
        ).choices[0].text)),
        threading.Thread(target=lambda: results.append(
            _grpc_text(fake_http, pb.GenerateRequest(prompt="y", regex="ef"))[0]
        )),
    ]  # fmt: skip
    for thread in pending:
        entered.clear()
        thread.start()
        assert entered.wait(10)
        assert (
            fast.completions.create(model=model, prompt="ok", max_tokens=4).choices[0].text == "ok"
        )
        compiled = fast.completions.create(
            model=model,
            prompt="x",
            max_tokens=8,
            extra_body={"structured_outputs": {"regex": "ab"}},
        )
        assert compiled.choices[0].text == "ab"
        assert _grpc_text(fake_http, pb.GenerateRequest(prompt="y", regex="ab")) == ["ab"]
        release.set()
        thread.join(30)
        release.clear()
    assert results == ["cd", "ef"]


def test_whitespace_loving_model_still_closes_the_object(make_fake_server, tokenizer) -> None:
    """A model whose favourite token is always a space (the fake engine's script; under a
    grammar it falls back to the lowest allowed id) returns valid JSON in a few dozen
    tokens: the compact grammar never allows the space."""
    space = tokenizer.encode(" ", add_special_tokens=False)[0]
    bg = make_fake_server(
        cfg=ServeConfig(max_seqs=4, max_queue=16, max_prompt_len=64, http_port=0),
        script=lambda prompt, i: space,
    )
    client, model = _client(bg)
    out = client.completions.create(
        model=model, prompt="sky:", max_tokens=100, extra_body={"response_format": RESPONSE_FORMAT}
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice
    Answer.model_validate_json(choice.text)
    compact = json.dumps(json.loads(choice.text), separators=(",", ":"), ensure_ascii=False)
    assert choice.text == compact and out.usage.completion_tokens < 64
    # without a grammar the same model only ever says " "
    free = client.completions.create(model=model, prompt="sky:", max_tokens=10)
    assert free.choices[0].text == " " * 10


# ---- the JAX engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """test_http_engine's tiny random Qwen2.5-style model, with room for chat prompts."""
    root = tmp_path_factory.mktemp("structured")
    tok = Tokenizer.from_dir(build_tokenizer_dir("qwen2.5", root / "tokenizer"))
    cfg = ModelConfig(
        vocab_size=tok.vocab_size + 11,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=128,
        max_seq_len=192,
        init_std=0.5,
    )  # fmt: skip  (a padded vocabulary: ids past the tokenizer are never allowed)
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    return write_bundle(root / "tiny-qwen", cfg, tok, flat_params(params), source={"test": "so"})


def _engine(bundle: Path) -> JaxEngine:
    scfg = dataclasses.replace(  # a budget of 256: 6 compiled steps where 1,536 takes 9
        SCFG, max_seqs=8, max_len=192, max_prompt_len=128, max_num_batched_tokens=256
    )
    return JaxEngine.from_bundle(bundle, dataclasses.replace(scfg, bundle=str(bundle)))


@pytest.fixture(scope="module")
def served(bundle):
    engine = _engine(bundle)
    with BackgroundServer(TandemServer(engine, engine.serve_cfg)) as bg:
        yield bg


@pytest.mark.parametrize("seed", [None, 7, 8], ids=lambda s: f"{s=}")
def test_json_schema_output_validates(served, seed) -> None:
    client, model = _client(served)
    sampled = {} if seed is None else {"temperature": 1.0, "seed": seed}
    texts = []
    for _ in range(2 if seed is not None else 1):
        out = client.chat.completions.create(
            model=model, messages=CHAT, max_tokens=100, response_format=RESPONSE_FORMAT, **sampled
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        Answer.model_validate_json(choice.message.content)
        texts.append(choice.message.content)
    assert len(set(texts)) == 1  # seeded: reproducible


def test_json_object_and_completions_response_format(served) -> None:
    client, model = _client(served)
    schema = {"type": "object", "properties": {"x": {"enum": [1, 2, 3]}}, "required": ["x"],
              "additionalProperties": False}  # fmt: skip
    out = client.completions.create(
        model=model, prompt="JSON:", max_tokens=20, extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
    )  # fmt: skip
    assert json.loads(out.choices[0].text)["x"] in (1, 2, 3)
    out = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=40, response_format={"type": "json_object"}
    )
    choice = out.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # a random model may keep writing one string: still a JSON object's prefix
        assert choice.message.content.startswith("{")


def test_grpc_regex_and_grammar(served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        call = channel.unary_stream(GENERATE)

        def text(**kw) -> str:
            req = pb.GenerateRequest(prompt="The answer:", max_tokens=30, **kw)
            return "".join(
                pb.GenerateResponse.FromString(r).text
                for r in call(req.SerializeToString(), timeout=60)
            )

        assert re.fullmatch(r"[0-9]{3}-(yes|no)", text(regex=r"[0-9]{3}-(yes|no)"))
        assert text(grammar='start: "a" | "b" "c"') in ("a", "bc")
        assert text(temperature=1.0, seed=3, regex="[xyz]{4}") in {
            a + b + c + d for a in "xyz" for b in "xyz" for c in "xyz" for d in "xyz"
        }


def test_vllm_structured_outputs_extension(served) -> None:
    """vLLM's `structured_outputs` (extra_body): json, regex, choice and grammar, over both
    endpoints; exactly one of them, and never with response_format."""
    client, model = _client(served)

    def complete(spec: dict, **kw) -> str:
        out = client.completions.create(model=model, prompt="Answer:", max_tokens=30,
                                        extra_body={"structured_outputs": spec, **kw})  # fmt: skip
        return out.choices[0].text

    assert complete({"choice": ['say "yes"', "naïve", "no"]}) in ('say "yes"', "naïve", "no")
    assert re.fullmatch(r"[0-9]{2}", complete({"regex": "[0-9]{2}"}))
    assert complete({"grammar": 'start: "a" | "b" "c"'}) in ("a", "bc")
    schema = {"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"],
              "additionalProperties": False}  # fmt: skip
    assert json.loads(complete({"json": schema}))["x"] in (1, 2)
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10,
                                          extra_body={"structured_outputs": {"choice": ["up", "down"]}})  # fmt: skip
    assert chat.choices[0].message.content in ("up", "down")
    for spec, kw in [({"regex": "a", "choice": ["b"]}, {}), ({}, {}), ({"regex": "("}, {}),
                     ({"regex": "a"}, {"response_format": {"type": "json_object"}})]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as err:
            complete(spec, **kw)
        assert err.value.body["param"] == "structured_outputs", err.value.body


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: Literal["Oslo", "Rome"]
    days: int = pydantic.Field(ge=1, le=7)


class Zone(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    zone: Literal["UTC", "CET"]


TOOLS = [
    {"type": "function", "function": {"name": "forecast", "parameters": City.model_json_schema()}},
    {"type": "function", "function": {"name": "clock", "parameters": Zone.model_json_schema()}},
]
ARGUMENTS = {"forecast": City, "clock": Zone}


def test_tool_calls_match_the_tools_schemas(served, monkeypatch) -> None:
    """A named tool_choice and "required" on the JAX engine: every call names a tool and
    its arguments validate against that tool's parameters (the grammar makes them). (A
    short template that lists the tools' names: Qwen's tool preamble alone is longer than
    this model's context; test_http_openai checks the real templates' rendering.)"""
    brief = "{% for m in messages %}{{ m.content }}\n{% endfor %}{{ tools | length }} tools:"
    monkeypatch.setattr(served.server.http.service, "chat_template", ChatTemplate(brief))
    client, model = _client(served)
    named = {"type": "function", "function": {"name": "forecast"}}
    for seed in (None, 3):
        sampled = {} if seed is None else {"temperature": 1.0, "seed": seed}
        out = client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS,
                                             tool_choice=named, max_tokens=60, **sampled)  # fmt: skip
        (call,) = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "stop" and call.function.name == "forecast"
        City.model_validate_json(call.function.arguments)
    finished = 0
    for seed in (None, 1, 2, 3):  # a random model may list calls until max_tokens
        sampled = {} if seed is None else {"temperature": 1.0, "seed": seed}
        out = client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS,
                                             tool_choice="required", max_tokens=100, **sampled)  # fmt: skip
        choice = out.choices[0]
        if choice.finish_reason == "length":
            assert choice.message.tool_calls is None and choice.message.content.startswith("[{")
            continue
        finished += 1
        assert choice.message.tool_calls and choice.message.content is None
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            ARGUMENTS[call.function.name].model_validate_json(call.function.arguments)
    assert finished >= 1


def test_mixed_batch_leaves_other_requests_alone(bundle) -> None:
    """Non-grammar requests give the same tokens beside grammar requests as alone (one
    orchestrator driven step by step, so all share every step)."""
    engine = _engine(bundle)
    engine.warmup()
    prompts = [engine.tokenizer.encode(p) for p in ["Hello there", "def f(x):", "The sky"]]
    schema = StructuredOutput("json_schema", json.dumps(SCHEMA))

    def run(rows: list[tuple[int, bool]]) -> list[list[int]]:
        """Requests (index: prompt, sampling and seed; with a grammar or not) in one batch."""
        orch = Orchestrator(engine)
        outs: list[list[int]] = [[] for _ in rows]
        for j, (i, grammar) in enumerate(rows):
            params = SamplingParams(
                max_tokens=80 if grammar else 24, temperature=0.0 if i % 2 else 1.0, seed=11 + i,
                ignore_eos=not grammar, structured_output=schema if grammar else None,
            )  # fmt: skip
            orch.submit(prompts[i % 3], params, lambda o, j=j: outs[j].extend(o.token_ids))
        while orch.step():
            pass
        return outs

    mixed = run([(0, False), (1, True), (2, False), (3, True), (4, False), (5, True)])
    for j, i in enumerate((0, 2, 4)):
        assert mixed[2 * j] == run([(i, False)])[0], i
        assert len(mixed[2 * j]) == 24
    for j in (1, 3, 5):
        Answer.model_validate_json(engine.tokenizer.decode(mixed[j]))
