"""The OpenAI-compatible HTTP API (Starlette on uvicorn), beside gRPC on the same orchestrator.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both stream as
server-sent events with `"stream": true`, ending in `data: [DONE]`), `GET /v1/models`
(and `/v1/models/{model}`),
`POST /tokenize` (vLLM's), `GET /health` (200 once warm, 503 while warming up or
draining) and `GET /metrics` (the replica's Prometheus registry). It is a translation
layer like the gRPC one: requests become `SamplingParams` submitted to the one
`Orchestrator`, `Output`s come back over the same batched thread hand-off, and the
server's `ready` event is its health. `n > 1` is served as n submissions with seeds
seed, seed+1, ... (each a sequence of its own); the scheduler makes the later ones wait
for the first to publish the prompt's full pages, so the prompt is prefilled once (all
but its last, partial page; with prefix caching on).

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a
bad parameter (named in `param`, including unknown fields and parameters whose feature
tandem does not serve yet), 401 without the bearer token (when one is set; /health and
/metrics stay open, as for gRPC's health service), 404 for an unknown model or path, 413
for a body over 4 MiB (gRPC's message limit), 429 when the queue is full, 503 while
warming up or draining. A client that disconnects cancels its request: its sequences are
freed within one step, as for gRPC.

Why Starlette and not FastAPI: per request FastAPI's dependency and validation layers cost
~3x Starlette's (docs/benchmarks.md), and the OpenAI error format needs our own body
validation anyway. Streamed chunks are written from per-request JSON templates, not
pydantic models: a chunk is 0.3 us instead of 8 us, which matters at GPU token rates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

import pydantic
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tandem.model.chat_template import ChatTemplate
from tandem.model.tokenizer import Tokenizer
from tandem.serve import openai_protocol as api
from tandem.serve import openai_reasoning, openai_tools
from tandem.serve.config import ServeConfig, unbindable
from tandem.serve.engine_api import RowToken
from tandem.serve.handoff import Handoff
from tandem.serve.metrics import ServeMetrics
from tandem.serve.openai_answer import AnswerShape, AnswerStream, chat_message
from tandem.serve.orchestrator import Orchestrator, Output, RequestError, merge_outputs
from tandem.serve.sampling import SamplingParams
from tandem.serve.structured import GrammarKind, StructuredOutput

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20  # gRPC's default message limit: the same requests fit both APIs
LONG_TEXT = 4096  # characters: longer prompts are tokenized (chats rendered) off the loop
OPEN_PATHS = frozenset({"/health", "/metrics"})  # answered without the bearer token
MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI and vLLM floor logprobs here
# max_tokens when a request leaves it out: /v1/completions' documented default (OpenAI's
# and vLLM's); a chat answer may run to the end of the context (max_len), as in both.
COMPLETION_MAX_TOKENS = 16

# RequestError codes (gRPC status names) as HTTP statuses and OpenAI error types.
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,  # the client went away (nginx's code); nobody reads it
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}
_GRPC_NAME = {status: name for name, status in _HTTP_STATUS.items()} | {413: "RESOURCE_EXHAUSTED"}
# pydantic's names of union members in an error's location; never field names here.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "TextPart", "NamedToolChoice"})
# The field a ValueError of SamplingParams / the orchestrator names: `field=value is invalid`.
_FIELD = re.compile(r"^([A-Za-z_]\w*)(?:\[\d+\])?(?:=| is )")


class ApiError(Exception):
    """An answer other than 200: becomes `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        counted: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.counted = counted  # already in tandem_requests_total (the orchestrator's)

    def response(self) -> Response:
        body = api.ErrorResponse(
            error=api.ErrorInfo(
                message=self.message,
                type=_ERROR_TYPE.get(self.status, "error"),
                param=self.param,
                code=self.code,
            )
        )
        return Response(body.model_dump_json(), self.status, media_type="application/json")

    @classmethod
    def from_request_error(cls, err: RequestError, *, counted: bool = False) -> ApiError:
        return cls(
            _HTTP_STATUS.get(err.code, 500), err.message, code=err.code.lower(), counted=counted
        )

    def sse(self) -> str:
        """The error as a server-sent event (a stream whose 200 has already gone out)."""
        return f"data: {self.response().body.decode()}\n\n"


def _bad_value(err: ValueError, renames: dict[str, str]) -> ApiError:
    """A ValueError naming a field (SamplingParams, the orchestrator) as a 400 naming the
    API's parameter (`prompt_token_ids` is `prompt`, ...)."""
    message = str(err)
    match = _FIELD.match(message)
    field = match.group(1) if match else None
    if field in renames:
        message = renames[field] + message[len(field) :]
        field = renames[field]
    return ApiError(400, message, param=field, code="invalid_value")


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias (token ids as JSON object keys) as SamplingParams takes it."""
    pairs = []
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(
                400, f"logit_bias={{{key!r:.40}: ...}} is invalid: keys must be token ids",
                param="logit_bias", code="invalid_value",
            ) from None  # fmt: skip
        pairs.append((token, value))
    return tuple(sorted(pairs))


def _validation_error(err: pydantic.ValidationError) -> ApiError:
    """pydantic's complaint, naming the parameter as a JSON path (`messages[0].role`); of a
    union's complaints (one per member) the deepest, i.e. the member that matched furthest."""
    first = max(err.errors(include_url=False), key=lambda e: len(e["loc"]))
    param = ""
    for part in first["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part:
            continue  # which member of a union pydantic tried (`str`, `list[int]`): no field
        else:
            param += f".{part}" if param else str(part)
    if first["type"] == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {first['msg']}", code="invalid_json")
    if first["type"] == "extra_forbidden":
        return ApiError(
            400,
            f"{param} is an unknown parameter (tandem serves OpenAI's parameters and vLLM's "
            "top_k, ignore_eos, stop_token_ids, repetition_penalty, min_p, min_tokens, "
            "skip_special_tokens, chat_template_kwargs, add_generation_prompt, "
            "continue_final_message, include_reasoning)",
            param=param,
            code="unknown_parameter",
        )
    value = first.get("input")
    shown = f"={value!r:.80}" if param and not isinstance(value, dict) else ""
    return ApiError(
        400, f"{param or 'body'}{shown} is invalid: {first['msg']}", param=param or None,
        code="invalid_value",
    )  # fmt: skip


def _structured_output(
    fmt: api.ResponseFormat | None, extension: api.StructuredOutputs | None
) -> StructuredOutput | None:
    """`response_format`, or vLLM's `structured_outputs`, as the grammar the output must
    match (None: free text). A `choice` list becomes a grammar of its literal strings."""
    if extension is not None:
        return _structured_outputs(fmt, extension)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput("json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ApiError(
            400,
            "response_format.json_schema.schema is invalid: type json_schema needs a schema",
            param="response_format.json_schema.schema",
            code="invalid_value",
        )
    return StructuredOutput("json_schema", json.dumps(fmt.json_schema.schema_))


def _structured_outputs(
    fmt: api.ResponseFormat | None, extension: api.StructuredOutputs
) -> StructuredOutput:
    if fmt is not None and fmt.type != "text":
        raise ApiError(400, "structured_outputs is invalid: set it or response_format, not both",
                       param="structured_outputs", code="invalid_value")  # fmt: skip
    given = {k: v for k, v in extension.model_dump(by_alias=True).items() if v is not None}
    if len(given) != 1:
        raise ApiError(
            400,
            f"structured_outputs={given!r:.200} is invalid: set exactly one of json, regex, "
            "choice, grammar",
            param="structured_outputs",
            code="invalid_value",
        )
    ((kind, value),) = given.items()
    if kind == "json":
        return StructuredOutput(
            "json_schema", value if isinstance(value, str) else json.dumps(value)
        )
    if kind == "choice":
        return StructuredOutput("grammar", "start: " + " | ".join(json.dumps(c) for c in value))
    return StructuredOutput(kind, value)


def stop_reason(out: Output, stop_token_ids: Sequence[int] | None) -> str | int | None:
    """vLLM's `stop_reason` of a choice: the stop string or `stop_token_ids` entry that
    ended it (None when the model's own end token did, at length, or while it runs)."""
    if out.stop_token is not None:
        return out.stop_token if out.stop_token in (stop_token_ids or ()) else None
    return out.matched_stop or None


def _text(content: str | list[api.TextPart] | None) -> str:
    """A message's content as the chat template gets it: text parts joined by newlines."""
    if isinstance(content, list):
        return "\n".join(part.text for part in content)
    return content or ""


def _chat_template(value: str, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat API's template: `value` (ServeConfig.chat_template: a file, or the Jinja
    text itself, which vLLM tells apart the same way) with the bundle's special tokens,
    else the bundle's own. A missing file or a template that does not parse is a
    ValueError naming chat_template, at start-up."""
    if not value:
        return tokenizer.chat_template
    path = Path(value)
    if path.is_file():
        value = path.read_text(encoding="utf-8")
    elif not any(c in value for c in "{}\n"):
        raise ValueError(f"chat_template={value!r} is invalid: no such file (nor Jinja text)")
    bundle = tokenizer.chat_template
    template = ChatTemplate(value, bundle.special_tokens if bundle else tokenizer.special_tokens)
    try:
        template.check_syntax()
    except ValueError as err:
        raise ValueError(f"chat_template={str(path)!r:.80} is invalid: {err}") from None
    return template


def _not_yet(req: api.CompletionRequest | api.ChatCompletionRequest) -> None:
    """Refuses a parameter whose feature tandem does not serve yet, unless it is off."""
    for name, off in api.NOT_YET.items():
        value = getattr(req, name, off)
        if value == off or (off is None and not value):
            continue  # None, [] and {} all mean "not used"
        shown = value.model_dump() if isinstance(value, pydantic.BaseModel) else value
        raise ApiError(
            400,
            f"{name}={shown!r} is not supported by tandem yet; leave it at {off!r}",
            param=name,
            code="not_supported_yet",
        )
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != req.n:
        raise ApiError(
            400,
            f"best_of={best_of} is not supported yet: only best_of == n ({req.n}), which "
            "returns every sequence",
            param="best_of",
            code="not_supported_yet",
        )


@dataclasses.dataclass
class _Run:
    """The sequences of one HTTP request (prompts x n) and the queue their outputs reach
    as (choice index, Output)."""

    prompts: list[list[int]]
    n: int
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    handles: list[Any] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


@dataclasses.dataclass
class _Choices:
    """Accumulates each choice's outputs; the usage of the whole request."""

    run: _Run
    outputs: list[list[Output]] = dataclasses.field(default_factory=list)
    finished: int = 0

    def __post_init__(self) -> None:
        self.outputs = [[] for _ in range(self.run.size)]

    def usage(self) -> api.Usage:
        finals = [outs[-1] if outs else Output() for outs in self.outputs]
        prompt = sum(len(p) for p in self.run.prompts)
        completion = sum(o.completion_tokens for o in finals)
        # the prompt counted once per prompt, so its cached part too (the first choice's)
        cached = sum(
            finals[p * self.run.n].cached_prompt_tokens for p in range(len(self.run.prompts))
        )
        return api.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=api.PromptTokensDetails(cached_tokens=cached),
        )


class _Templates:
    """One request's streamed chunks as JSON text around the parts that change, so a chunk
    costs a string join instead of a model build and dump (see the module docstring)."""

    def __init__(
        self,
        kind: str,
        rid: str,
        created: int,
        model: str,
        options: api.StreamOptions | None,
        stop_token_ids: Sequence[int] | None,
        answer: AnswerShape | None = None,
    ) -> None:
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        self.envelope = (
            f'data: {{"id":{json.dumps(rid)},"object":"{obj}","created":{created},'
            f'"model":{json.dumps(model)},"choices":'
        )
        self.head = self.envelope + '[{"index":'
        options = options or api.StreamOptions()
        self.include_usage = options.include_usage  # then every chunk has "usage": null
        self.continuous_usage = options.continuous_usage_stats  # or its running usage
        self.tail = ',"usage":null}\n\n' if self.include_usage else "}\n\n"
        self.chat = kind == "chat"
        self.stop_token_ids = stop_token_ids
        # a chat answer that is more than text (thinking, calls): each choice's deltas
        self.answers = None
        if answer is not None and not answer.plain:
            self.answers = collections.defaultdict(functools.partial(AnswerStream, answer))

    def chunk(
        self, index: int, text: str, logprobs: Any, out: Output, usage: tuple[int, int]
    ) -> str:
        """One choice's new text (of `out`, its merged output); `usage` = (prompt,
        completion tokens so far) of it."""
        finish = out.finish_reason
        lp = "null" if logprobs is None else logprobs.model_dump_json()
        if self.answers is not None:
            answer = self.answers[index]
            body = f'"delta":{json.dumps(answer.delta(text, bool(finish)))}'
            finish = answer.finish_reason(finish)
        elif self.chat:
            body = f'"delta":{{"content":{json.dumps(text)}}}'
        else:
            body = f'"text":{json.dumps(text)}'
        reason = 'null,"stop_reason":null'  # the final chunk's: its reason and stop
        if finish:
            reason = f'"{finish}","stop_reason":{json.dumps(stop_reason(out, self.stop_token_ids))}'
        tail = self.tail
        if self.continuous_usage:
            prompt, completion = usage
            tail = (
                f',"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},'
                f'"total_tokens":{prompt + completion}}}}}\n\n'
            )
        return f'{self.head}{index},{body},"logprobs":{lp},"finish_reason":{reason}}}]{tail}'

    def usage(self, usage: api.Usage) -> str:
        """The last chunk with `stream_options.include_usage`: no choices, the usage."""
        return f'{self.envelope}[],"usage":{usage.model_dump_json()}}}\n\n'

    def role(self, index: int, prompt_tokens: int) -> str:
        delta = '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null'
        tail = self.tail
        if self.continuous_usage:
            tail = (
                f',"usage":{{"prompt_tokens":{prompt_tokens},"completion_tokens":0,'
                f'"total_tokens":{prompt_tokens}}}}}\n\n'
            )
        return f"{self.head}{index},{delta}}}]{tail}"


class OpenAIService:
    """The handlers of the OpenAI-compatible API over one orchestrator."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        tokenizer: Tokenizer,
        cfg: ServeConfig,
        *,
        max_len: int,
        max_prompt_len: int,
        metrics: ServeMetrics | None,
        ready: threading.Event,
    ) -> None:
        self.orch = orchestrator
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_len = max_len
        self.max_prompt_len = max_prompt_len
        self.metrics = metrics
        self.ready = ready
        self.model_name = served_model_name(cfg)
        self.created = int(time.time())
        self._handoff: Handoff | None = None  # bound to the event loop by `bind`
        self._token_text: dict[int, str] = {}
        self.chat_template = _chat_template(cfg.chat_template, tokenizer)
        # the token that ends a reasoning model's thinking, after which a grammar holds
        self._think_end: int | None = None
        if cfg.reasoning_parser:
            self._think_end = tokenizer.hf.token_to_id(openai_reasoning.THINK_CLOSE)
            if self._think_end is None:
                raise ValueError(
                    f"reasoning_parser={cfg.reasoning_parser!r} is invalid for this model: "
                    f"its tokenizer has no {openai_reasoning.THINK_CLOSE} token (allowed: "
                    "'' for a model that does not think)"
                )

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handoff = Handoff(loop)

    # ---- request parsing ----------------------------------------------------------------

    async def _body(self, request: Request, model: type[pydantic.BaseModel]) -> Any:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total <= MAX_BODY_BYTES:
                chunks.append(chunk)
            elif total > 16 * MAX_BODY_BYTES:
                break  # stop reading: the connection closes after the answer
        if total > MAX_BODY_BYTES:
            # an oversized body is read (not kept) before answering: a client that sends
            # all of it first, as most do, then gets the 413 instead of a reset connection
            raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes",
                           code="request_too_large")  # fmt: skip
        try:
            return model.model_validate_json(b"".join(chunks))
        except pydantic.ValidationError as err:
            raise _validation_error(err) from None

    def _check_ready(self) -> None:
        if not self.ready.is_set():
            why = self.orch.failure or "model is warming up or the server is draining; retry"
            raise ApiError(503, why, code="unavailable")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model {model!r} does not exist: this server serves {self.model_name!r} "
                "(GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def _encode(self, text: str, *, add_special_tokens: bool, param: str) -> list[int]:
        if len(text) > 64 * self.max_prompt_len + 1024:
            raise ApiError(
                400,
                f"{param} is invalid: {len(text)} characters cannot fit in max_prompt_len "
                f"{self.max_prompt_len} tokens",
                param=param,
                code="invalid_value",
            )
        encode = functools.partial(
            self.tokenizer.encode, text, add_special_tokens=add_special_tokens
        )
        return encode() if len(text) <= LONG_TEXT else await _in_thread(encode)

    async def _chat_prompt(
        self,
        messages: Sequence[api.ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None,
        tools: Sequence[api.Tool] | None = None,
        continue_final_message: bool = False,
    ) -> list[int]:
        """The conversation (and the tools it may call) as the model's chat template
        renders it, tokenized without special tokens (the template writes them), as
        transformers' apply_chat_template (`continue_final_message` as well)."""
        if continue_final_message and add_generation_prompt:
            raise ApiError(400, "continue_final_message=true is invalid with "
                           "add_generation_prompt=true (its default): send "
                           "add_generation_prompt=false to continue the last message",
                           param="continue_final_message", code="invalid_value")  # fmt: skip
        template = self.chat_template
        if template is None:
            raise ApiError(
                400,
                f"model {self.model_name!r} has no chat template (its bundle has neither "
                "chat_template.jinja nor tokenizer_config.json's chat_template): use "
                "/v1/completions, or start the server with --chat-template",
                param="messages",
                code="no_chat_template",
            )
        template_kwargs = template_kwargs or {}
        own = {"messages", "add_generation_prompt", "continue_final_message", "self"}
        own |= {"tools"} if tools else set()
        if reserved := sorted(own & set(template_kwargs)):
            raise ApiError(
                400,
                f"chat_template_kwargs may not set {reserved}: reserved (the request's own "
                "fields, and the template's `self`)",
                param="chat_template_kwargs",
                code="invalid_value",
            )
        chat, size = [], 0
        for i, m in enumerate(messages):
            message = m.model_dump(exclude_none=True, exclude={"refusal", "annotations"})
            if isinstance(m.content, list):
                message["content"] = _text(m.content)
            # null content (an assistant's tool calls, as the SDK sends its reply back) is
            # "" for the template, as vLLM gives it: templates read message.content as text
            message.setdefault("content", "")
            try:
                message = openai_tools.template_tool_calls(message)
            except ValueError as err:
                raise ApiError(400, f"messages[{i}].{err}", param=f"messages[{i}].tool_calls",
                               code="invalid_value") from None  # fmt: skip
            size += len(message.get("content", ""))
            chat.append(message)
        if tools:  # as the client wrote them (no added nulls), as transformers takes them
            tools_json = [t.model_dump(exclude_unset=True) for t in tools]
            template_kwargs = {**template_kwargs, "tools": tools_json}
        render = functools.partial(
            template.render,
            chat,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **template_kwargs,
        )
        try:  # a long conversation renders off the event loop, as a long prompt encodes
            text = render() if size <= LONG_TEXT else await _in_thread(render)
        except ValueError as err:
            raise ApiError(
                400, f"messages: {err}", param="messages", code="invalid_value"
            ) from None
        return await self._encode(text, add_special_tokens=False, param="messages")

    async def _plan(
        self,
        prompts: list[list[int]],
        req: api.CompletionRequest | api.ChatCompletionRequest,
        *,
        max_tokens: int | None,
        default_max_tokens: int | None,
        logprobs: int | None,
        renames: dict[str, str],
        prompt_logprobs: int | None = None,
        tool_grammar: StructuredOutput | None = None,
        keep_special_tokens: bool = False,
        grammar_after_token: int | None = None,
    ) -> list[tuple[list[int], SamplingParams]]:
        """One (prompt ids, SamplingParams) per choice, every one validated against the
        served model before any is submitted. Without max_tokens a choice gets
        `default_max_tokens` or what fits if less (None: what fits). `keep_special_tokens`
        overrides the request's skip_special_tokens (a tool-call parser needs them); a
        grammar holds after `grammar_after_token` if given (the end of thinking)."""
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true",
                           param="stream_options", code="invalid_value")  # fmt: skip
        if len(prompts) * req.n > self.cfg.max_queue:
            raise ApiError(
                400,
                f"n={req.n} is invalid: prompts ({len(prompts)}) x n must be <= max_queue "
                f"({self.cfg.max_queue}), each choice is a sequence of its own",
                param="n",
                code="invalid_value",
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        where = "structured_outputs" if req.structured_outputs else "response_format"
        try:
            structured = _structured_output(
                getattr(req, "response_format", None), req.structured_outputs
            )
        except ValueError as err:  # an empty regex / grammar / schema
            raise _bad_value(err, dict.fromkeys(get_args(GrammarKind), where)) from None
        if tool_grammar is not None:  # a named function or "required": its JSON
            if structured is not None:
                raise ApiError(400, f"tool_choice is invalid with {where}: the answer is "
                               "either tool calls or that format", param="tool_choice",
                               code="invalid_value")  # fmt: skip
            structured, where = tool_grammar, "tools"
        renames = renames | dict.fromkeys(get_args(GrammarKind), where)
        if structured is not None:
            try:
                await self.orch.check_grammar(structured)
            except ValueError as err:
                raise _bad_value(err, renames) from None
        logit_bias = _logit_bias(req.logit_bias)
        plan = []
        for ids in prompts:
            limit = max_tokens
            if limit is None:
                limit = self.orch.room(len(ids))  # < 1: validate names the prompt
                if default_max_tokens is not None:
                    limit = min(limit, default_max_tokens)
                limit = max(1, limit)
            for j in range(req.n):
                fields = {
                    "max_tokens": limit,
                    "temperature": req.temperature,
                    "top_k": max(req.top_k, 0),
                    "top_p": req.top_p,
                    # seed, seed+1, ...: bit-identical 64-bit patterns to what gRPC takes
                    "seed": None if req.seed is None else (req.seed + j) % 2**64,
                    "stop": stop,
                    "stop_token_ids": tuple(req.stop_token_ids or ()),
                    # logprobs 0 means "the chosen token's only": the engine's 1, top dropped
                    "logprobs": 0 if logprobs is None else max(logprobs, 1),
                    "ignore_eos": req.ignore_eos,
                    "structured_output": structured,
                    "presence_penalty": req.presence_penalty,
                    "frequency_penalty": req.frequency_penalty,
                    "repetition_penalty": req.repetition_penalty,
                    "min_p": req.min_p,
                    "min_tokens": req.min_tokens,
                    "logit_bias": logit_bias,
                    "prompt_logprobs": prompt_logprobs,
                    "skip_special_tokens": req.skip_special_tokens and not keep_special_tokens,
                    "grammar_after_token": None if structured is None else grammar_after_token,
                }
                try:
                    params = self.orch.default_params(len(ids), **fields)
                    self.orch.validate(ids, params)
                except ValueError as err:
                    raise _bad_value(err, renames) from None
                plan.append((ids, params))
        return plan

    def _submit(self, prompts: list[list[int]], n: int, plan: list) -> _Run:
        assert self._handoff is not None, "bind() to the event loop first"
        run = _Run(prompts, n)
        try:
            for i, (ids, params) in enumerate(plan):
                sink = functools.partial(self._handoff.put, run.queue, i)
                run.handles.append(self.orch.submit(ids, params, sink))
        except ValueError as err:
            run.cancel()
            raise _bad_value(err, {}) from None
        except RequestError as err:
            run.cancel()
            raise ApiError.from_request_error(err) from None
        return run

    # ---- token strings and logprobs ----------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        """Token ids as text, special tokens spelled out (an echoed token prompt)."""
        return self.tokenizer.hf.decode(ids, skip_special_tokens=False)

    def token_text(self, token: int) -> str:
        """A token's own text (special tokens spelled out), as OpenAI's logprobs show it."""
        text = self._token_text.get(token)
        if text is None:
            text = self.tokenizer.hf.decode([token], skip_special_tokens=False)
            self._token_text[token] = text
        return text

    def completion_logprobs(
        self,
        out: Output,
        top: int,
        offset: int,
        echo: list[int] | None = None,
        only_prompt: bool = False,
    ) -> api.CompletionLogprobs:
        """OpenAI's completion logprobs of `out`'s tokens, after those of the prompt `echo`
        (its first token without a logprob, null, as OpenAI and vLLM show it; the others
        from `out.prompt_logprobs`), and without the generated ones if `only_prompt`."""
        lp = api.CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        scored: list[tuple[int, RowToken | None]] = []
        if echo is not None:
            assert out.prompt_logprobs is not None, "echo with logprobs scores the prompt"
            scored += zip(echo, [None, *out.prompt_logprobs], strict=True)
        if not only_prompt:
            scored += [(st.token, st) for st in out.logprobs]
        for token_id, st in scored:
            token = self.token_text(token_id)
            lp.text_offset.append(offset)
            offset += len(token)
            lp.tokens.append(token)
            if st is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(max(st.logprob, MIN_LOGPROB))
            # OpenAI: the top `logprobs` alternatives plus the sampled (or prompt) token
            alts = {token: max(st.logprob, MIN_LOGPROB)}
            for t, v in st.top[:top]:
                alts.setdefault(self.token_text(t), max(v, MIN_LOGPROB))
            lp.top_logprobs.append(alts)
        return lp

    def prompt_logprobs(
        self, ids: list[int], out: Output, top: int | None
    ) -> list[dict[str, api.PromptLogprob] | None] | None:
        """vLLM's `prompt_logprobs` of a choice: per prompt token {token id: logprob, rank,
        decoded token} for the token itself then its `top` alternatives (None for the first
        token); None when the prompt was not scored."""
        if out.prompt_logprobs is None:
            return None

        def entry(token: int, logprob: float, rank: int) -> api.PromptLogprob:
            return api.PromptLogprob(
                logprob=max(logprob, MIN_LOGPROB), rank=rank, decoded_token=self.token_text(token)
            )

        scored: list[dict[str, api.PromptLogprob] | None] = [None]
        for st in out.prompt_logprobs:
            alts = {str(st.token): entry(st.token, st.logprob, st.rank)}
            for k, (t, v) in enumerate(st.top[: top or 0]):
                alts.setdefault(str(t), entry(t, v, k + 1))
            scored.append(alts)
        assert len(scored) == len(ids)
        return scored

    def chat_logprobs(self, out: Output, top: int) -> api.ChatLogprobs:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": max(logprob, MIN_LOGPROB),
                    "bytes": list(text.encode("utf-8", errors="replace"))}  # fmt: skip

        return api.ChatLogprobs(
            content=[
                api.TokenLogprob(
                    **entry(st.token, st.logprob),
                    top_logprobs=[api.TopLogprob(**entry(t, v)) for t, v in st.top[:top]],
                )
                for st in out.logprobs
            ]
        )

    # ---- collecting outputs -------------------------------------------------------------

    async def _gather(self, run: _Run) -> _Choices:
        """Every choice's outputs until each is final; an error ends the request."""
        choices = _Choices(run)
        while choices.finished < run.size:
            i, out = await run.queue.get()
            if out.error is not None:
                raise ApiError.from_request_error(out.error, counted=True)
            choices.outputs[i].append(out)
            choices.finished += out.final
        return choices

    async def _collect(self, run: _Run, request: Request) -> _Choices:
        """`_gather`, or a cancel of every sequence if the client disconnects first."""
        gather = asyncio.ensure_future(self._gather(run))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({gather, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not gather.done():
                gather.cancel()
                run.cancel()
        if not gather.done():
            raise ApiError(499, "client disconnected", code="cancelled")
        try:
            return gather.result()
        except ApiError:
            run.cancel()
            raise

    async def _events(
        self,
        run: _Run,
        templates: _Templates,
        render: Callable[[int, Output], tuple[str, pydantic.BaseModel | None]],
    ) -> AsyncIterator[str]:
        """The server-sent events of a streamed request (`render`: a choice's output as
        its chunk's text and logprobs): the outputs waiting for it merged per choice into
        one chunk each (a slow reader gets fewer, larger chunks), then the
        usage chunk if asked, then `[DONE]`. Leaving early (disconnect) cancels the rest."""
        choices = _Choices(run)
        tokens = [0] * run.size  # generated so far, per choice
        try:
            if templates.chat:
                yield "".join(templates.role(i, len(run.prompts[i // run.n]))
                              for i in range(run.size))  # fmt: skip
            while choices.finished < run.size:
                items = [await run.queue.get()]
                while not run.queue.empty():
                    items.append(run.queue.get_nowait())
                grouped: dict[int, list[Output]] = {}
                for i, out in items:
                    grouped.setdefault(i, []).append(out)
                events, error = [], None
                for i, outs in grouped.items():
                    if outs[-1].error is not None:
                        error = outs.pop().error
                    if outs:
                        out = merge_outputs(outs)
                        choices.outputs[i].append(out)
                        choices.finished += out.final
                        tokens[i] += len(out.token_ids)
                        if out.token_ids or out.finish_reason:  # vLLM: a chunk per step,
                            # empty text too (a held-back UTF-8 or stop-string prefix)
                            usage = (len(run.prompts[i // run.n]), tokens[i])
                            text, lp = render(i, out)
                            events.append(templates.chunk(i, text, lp, out, usage))
                if error is not None:
                    events.append(ApiError.from_request_error(error, counted=True).sse())
                    yield "".join(events) + "data: [DONE]\n\n"
                    return
                if events:
                    yield "".join(events)
            usage = templates.usage(choices.usage()) if templates.include_usage else ""
            yield usage + "data: [DONE]\n\n"
        finally:
            if choices.finished < run.size:
                run.cancel()

    # ---- endpoints ----------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        self._check_ready()
        req = await self._body(request, api.CompletionRequest)
        self._check_model(req.model)
        _not_yet(req)
        prompt = req.prompt
        if prompt == "" or (isinstance(prompt, list) and "" in prompt):
            raise ApiError(400, "prompt is invalid: it is empty", param="prompt",
                           code="invalid_value")  # fmt: skip
        if isinstance(prompt, str):
            prompts = [await self._encode(prompt, add_special_tokens=True, param="prompt")]
        elif prompt and isinstance(prompt[0], str):
            prompts = [
                await self._encode(p, add_special_tokens=True, param="prompt") for p in prompt
            ]
        elif prompt and isinstance(prompt[0], list):
            prompts = [list(p) for p in prompt]
        else:
            prompts = [list(prompt)]
        if req.stream and req.prompt_logprobs is not None:  # as vLLM
            raise ApiError(400, "prompt_logprobs is not available with stream=true",
                           param="prompt_logprobs", code="invalid_value")  # fmt: skip
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens=0 is invalid: must be >= 1 (0 only with echo, "
                           "which then returns the prompt alone)", param="max_tokens",
                           code="invalid_value")  # fmt: skip
        only_prompt = req.max_tokens == 0  # vLLM: echo the prompt, generate one token unseen
        # what the prompt positions are scored for: echo's logprobs and prompt_logprobs
        scored = [req.prompt_logprobs, req.logprobs if req.echo else None]
        plan = await self._plan(
            prompts, req, max_tokens=1 if only_prompt else req.max_tokens,
            default_max_tokens=COMPLETION_MAX_TOKENS,
            logprobs=req.logprobs, renames={"prompt_token_ids": "prompt"},
            prompt_logprobs=max((n for n in scored if n is not None), default=None),
        )  # fmt: skip
        run = self._submit(prompts, req.n, plan)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        top = req.logprobs or 0
        prompt_top = req.logprobs if req.prompt_logprobs is None else req.prompt_logprobs
        # the echoed text: the prompt as sent, or its token ids decoded (vLLM's too)
        texts: list[str] = []
        if req.echo:
            if isinstance(prompt, str):
                texts = [prompt]
            elif isinstance(prompt[0], str):
                texts = list(prompt)
            else:
                texts = [self._decode(ids) for ids in prompts]

        def render(i: int, out: Output, offset: int) -> tuple[str, api.CompletionLogprobs | None]:
            """A choice's message as text and logprobs, `offset` characters of it sent
            before (-1: this is its first message, which echo prefixes with the prompt)."""
            ids = prompts[i // req.n] if req.echo and offset < 0 else None
            text = "" if only_prompt else out.text
            if ids is not None:
                text = texts[i // req.n] + text
            lp = None
            if req.logprobs is not None:
                lp = self.completion_logprobs(out, top, max(offset, 0), ids, only_prompt)
            return text, lp

        if req.stream:
            templates = _Templates(
                "completion", rid, created, self.model_name, req.stream_options, req.stop_token_ids
            )
            offsets = [-1] * run.size  # text sent so far per choice (-1: none yet)

            def render_chunk(i: int, out: Output) -> tuple[str, api.CompletionLogprobs | None]:
                text, lp = render(i, out, offsets[i])
                offsets[i] = max(offsets[i], 0) + len(text)
                return text, lp

            return _sse(self._events(run, templates, render_chunk))
        choices = await self._collect(run, request)
        body = api.CompletionResponse(
            id=rid,
            created=created,
            model=self.model_name,
            choices=[
                api.CompletionChoice(
                    index=i,
                    text=text,
                    logprobs=lp,
                    finish_reason=out.finish_reason,
                    stop_reason=stop_reason(out, req.stop_token_ids),
                    prompt_logprobs=self.prompt_logprobs(prompts[i // req.n], out, prompt_top),
                )
                for i, out in enumerate(merge_outputs(outs) for outs in choices.outputs)
                for text, lp in [render(i, out, -1)]
            ],
            usage=choices.usage(),
        )
        return _json(body)

    async def chat_completions(self, request: Request) -> Response:
        self._check_ready()
        req = await self._body(request, api.ChatCompletionRequest)
        self._check_model(req.model)
        _not_yet(req)
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs is only allowed with logprobs=true",
                           param="top_logprobs", code="invalid_value")  # fmt: skip
        calls = self._calls_choice(req)
        template_kwargs = req.chat_template_kwargs
        if req.reasoning_effort is not None:  # what templates of reasoning models read
            template_kwargs = {"reasoning_effort": req.reasoning_effort, **(template_kwargs or {})}
        ids = await self._chat_prompt(
            req.messages, req.add_generation_prompt, template_kwargs, req.tools,
            req.continue_final_message,
        )  # fmt: skip
        continued = _text(req.messages[-1].content) if req.continue_final_message else None
        thinks = openai_reasoning.thinks(
            self.cfg.reasoning_parser, req.chat_template_kwargs, continued
        )
        top = req.top_logprobs or 0
        parallel = req.parallel_tool_calls is not False
        try:
            tool_grammar = openai_tools.tool_grammar(req.tools or (), calls, parallel)
        except ValueError as err:
            raise _bad_value(err, {}) from None
        plan = await self._plan(
            [ids], req,
            max_tokens=req.max_completion_tokens or req.max_tokens,
            default_max_tokens=None,
            logprobs=top if req.logprobs else None,
            renames={"prompt_token_ids": "messages", "prompt": "messages",
                     "logprobs": "top_logprobs",
                     **({"max_tokens": "max_completion_tokens"} if req.max_completion_tokens
                        else {})},
            tool_grammar=tool_grammar,
            keep_special_tokens=calls == "auto"
            and openai_tools.FORMATS[self.cfg.tool_call_parser].keeps_special_tokens,
            grammar_after_token=self._think_end if thinks else None,
        )  # fmt: skip
        shape = AnswerShape(
            calls=calls,
            tool_parser=self.cfg.tool_call_parser,
            parallel=parallel,
            thinks=thinks,
            include_reasoning=req.include_reasoning,
        )
        run = self._submit([ids], req.n, plan)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            templates = _Templates(
                "chat", rid, created, self.model_name, req.stream_options, req.stop_token_ids,
                shape,
            )  # fmt: skip

            def render(i: int, out: Output) -> tuple[str, api.ChatLogprobs | None]:
                return out.text, self.chat_logprobs(out, top) if req.logprobs else None

            return _sse(self._events(run, templates, render))
        choices = await self._collect(run, request)
        body = api.ChatCompletionResponse(
            id=rid,
            created=created,
            model=self.model_name,
            choices=[
                api.ChatChoice(
                    index=i,
                    message=answer,
                    logprobs=self.chat_logprobs(out, top) if req.logprobs else None,
                    finish_reason=finish,
                    stop_reason=stop_reason(out, req.stop_token_ids),
                )
                for i, out in enumerate(merge_outputs(outs) for outs in choices.outputs)
                for answer, finish in [chat_message(out.text, out.finish_reason, shape)]
            ],
            usage=choices.usage(),
        )
        return _json(body)

    def _calls_choice(self, req: api.ChatCompletionRequest) -> openai_tools.ToolChoice:
        """The request's tool_choice, checked against its tools, when the answer may be
        calls (None: text, i.e. "none" or no tools); "auto" with tools (the default)
        needs the server's tool_call_parser."""
        try:
            choice = openai_tools.resolve_choice(req.tools, req.tool_choice)
        except ValueError as err:
            raise _bad_value(err, {}) from None
        if choice == "auto" and req.tools and not self.cfg.tool_call_parser:
            raise ApiError(
                400,
                "tool_choice='auto' (the default with tools) needs the server started with "
                "--tool-call-parser (hermes: Qwen, Hermes; llama3_json: Llama 3.1+; "
                "mistral: Mistral), the "
                "model's own call format; or send tool_choice 'required', a named function "
                '({"type": "function", "function": {"name": ...}}) or \'none\'',
                param="tool_choice",
                code="not_supported_yet",
            )
        return choice if choice != "none" and req.tools else None

    def _card(self) -> api.ModelCard:
        return api.ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_len)

    async def models(self, request: Request) -> Response:
        return _json(api.ModelList(data=[self._card()]))

    async def model(self, request: Request) -> Response:
        """`GET /v1/models/{model}` (the SDK's `models.retrieve`)."""
        self._check_model(request.path_params["model"])
        return _json(self._card())

    async def tokenize(self, request: Request) -> Response:
        req = await self._body(request, api.TokenizeRequest)
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "prompt is invalid: set prompt or messages, not both",
                           param="prompt", code="invalid_value")  # fmt: skip
        if req.messages is not None:
            ids = await self._chat_prompt(
                req.messages, req.add_generation_prompt, req.chat_template_kwargs, req.tools,
                req.continue_final_message,
            )  # fmt: skip
        else:
            ids = await self._encode(
                req.prompt, add_special_tokens=req.add_special_tokens, param="prompt"
            )
        return _json(api.TokenizeResponse(count=len(ids), max_model_len=self.max_len, tokens=ids))

    async def health(self, request: Request) -> Response:
        if self.ready.is_set():
            return Response(b"", 200)
        why = self.orch.failure or "warming up or draining"
        return ApiError(503, why, code="unavailable").response()

    async def prometheus(self, request: Request) -> Response:
        if self.metrics is None:
            return ApiError(404, "metrics are off", code="not_found").response()
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def served_model_name(cfg: ServeConfig) -> str:
    """`served_model_name`, else the bundle directory's name, else "tandem"."""
    if cfg.served_model_name:
        return cfg.served_model_name
    return Path(cfg.bundle).resolve().name if cfg.bundle else "tandem"


async def _in_thread(work: Callable[[], Any]) -> Any:
    """`work()` on the default executor: long tokenizing and rendering would stall every
    stream of the event loop (the gRPC server's too)."""
    return await asyncio.get_running_loop().run_in_executor(None, work)


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(body: pydantic.BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


def _endpoint(
    handler: Callable[[Request], Awaitable[Response]], metrics: ServeMetrics | None, counted: bool
) -> Callable[[Request], Awaitable[Response]]:
    """Turns an ApiError into its response; a generation endpoint's rejections are counted
    in tandem_requests_total under the gRPC status name, as gRPC's are."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:
            return Response(status_code=499)  # hung up while sending the body
        except ApiError as err:
            if counted and metrics is not None and not err.counted and err.status != 499:
                metrics.count_request(_GRPC_NAME.get(err.status, "UNKNOWN"))
            return err.response()

    return run


class _BearerToken:
    """ASGI middleware: `Authorization: Bearer <token>` on every path but OPEN_PATHS (the
    `openai` SDK sends its api_key this way)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                response = ApiError(401, "missing or wrong bearer token", code="invalid_api_key")
                await response.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    service: OpenAIService, token: str | None = None, allowed_origins: Sequence[str] = ()
) -> Any:
    """The ASGI app: routes, OpenAI-shaped errors for unknown paths, optional token, and
    CORS for browser clients (chat UIs calling the API from their own origin) when
    `allowed_origins` is set: Starlette's middleware answers preflights before the token
    check, as a browser sends no credentials there, and adds the headers to every reply."""
    m = service.metrics
    routes = [
        Route("/v1/completions", _endpoint(service.completions, m, True), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(service.chat_completions, m, True),
              methods=["POST"]),
        Route("/v1/models", _endpoint(service.models, m, False), methods=["GET"]),
        Route("/v1/models/{model:path}", _endpoint(service.model, m, False), methods=["GET"]),
        Route("/tokenize", _endpoint(service.tokenize, m, False), methods=["POST"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/metrics", service.prometheus, methods=["GET"]),
    ]  # fmt: skip

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", str(exc))
        return ApiError(status, f"{request.method} {request.url.path}: {detail}").response()

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette logs the traceback and re-raises after sending this
        return ApiError(500, f"internal error: {type(exc).__name__}", code="internal").response()

    app: Any = Starlette(
        routes=routes,
        exception_handlers={404: http_error, 405: http_error, Exception: server_error},
    )
    if token:
        app = _BearerToken(app, token)
    if allowed_origins:
        app = CORSMiddleware(
            app, allow_origins=list(allowed_origins), allow_methods=["*"], allow_headers=["*"]
        )
    return app


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM handlers: `tandem serve` drains on those
    signals itself (serve_until_signal), and only then closes the HTTP listener."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """uvicorn serving the app on the caller's event loop (the gRPC server's), on a socket
    bound here so a taken port is an OSError at start-up."""

    def __init__(self, service: OpenAIService, cfg: ServeConfig, *, token: str | None) -> None:
        assert cfg.http_port is not None
        self.service = service
        self.cfg = cfg
        self._config = uvicorn.Config(
            build_app(service, token, cfg.allowed_origins),
            lifespan="off",  # no startup hooks: the TandemServer owns the lifecycle
            log_config=None,  # tandem.cli configures logging; uvicorn must not replace it
            access_log=False,
            ws="none",
            http="httptools",  # the C parser (without it uvicorn falls back to h11, in Python)
            ssl_certfile=cfg.tls_cert or None,
            ssl_keyfile=cfg.tls_key or None,
            timeout_graceful_shutdown=5,  # after the drain: only the last bytes to send
        )
        self._server = _Uvicorn(self._config)
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> int:
        host, port = self.cfg.host, self.cfg.http_port
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.create_server((host, port), family=family)
        except OSError:  # socket.gaierror is one
            raise unbindable("http_port", port, host) from None
        self.port = sock.getsockname()[1]
        self.service.bind(asyncio.get_running_loop())
        self._config.load()  # TLS files are read here: a bad one fails start()
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"HTTP server on {host}:{self.port} did not start")
            await asyncio.sleep(0.005)
        scheme = "https" if self.cfg.tls_cert else "http"
        log.info("OpenAI-compatible HTTP on %s://%s:%d", scheme, host, self.port)
        return self.port

    async def stop(self) -> None:
        """Closes the listener and waits (5 s at most) for responses still being sent."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
