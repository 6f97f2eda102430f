"""The OpenAI-compatible API's request and response bodies (pydantic), as tandem serves them.

Field names, types and defaults follow OpenAI's `/v1/completions` and
`/v1/chat/completions` (and vLLM's extensions `top_k`, `ignore_eos`, `stop_token_ids`,
`repetition_penalty`, `min_p`, `min_tokens`, `skip_special_tokens`, `prompt_logprobs`,
`structured_outputs`, `chat_template_kwargs`, `add_generation_prompt`,
`continue_final_message`, `include_reasoning`,
`stream_options.continuous_usage_stats`),
so the `openai` SDK, lm-eval's `local-completions` / `local-chat-completions` and `vllm
bench serve` talk to tandem unchanged. Requests are strict where OpenAI-compatible servers
are usually lax:

- an unknown field is an error naming it (`extra="forbid"`), never silently ignored; the
  fields OpenAI defines that change nothing here are accepted and ignored (`user`, `store`,
  `metadata`, `service_tier`, `prompt_cache_key`, `safety_identifier`, `prediction`, and
  the `refusal` / `annotations` of an assistant message sent back as history), so the
  SDK's own objects round-trip (`messages.append(reply.choices[0].message.model_dump())`);
- `null` is the parameter's default (the SDK sends `"temperature": null` for `None`), as
  in OpenAI's and vLLM's servers;
- NaN and infinite numbers are refused (`allow_inf_nan=False`);
- a known parameter whose feature tandem does not serve yet (`NOT_YET`: suffix, functions,
  ...) is accepted only at its default value,
  any other value is a 400 naming it (`not_yet_supported`).

The bounds that depend on the served model (logprobs <= max_logprobs, top_k <= vocab, the
prompt and max_tokens fitting max_len) are checked by the orchestrator, as for gRPC; so are
the ranges of the penalties, min_p, min_tokens and logit_bias (SamplingParams names them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Parameters OpenAI (or vLLM) defines whose feature tandem's sampler does not have yet,
# with the value that means "off": any other value is refused, naming the parameter.
NOT_YET: dict[str, Any] = {
    "suffix": None,
    "functions": None,  # the deprecated spelling of tools
    "function_call": None,
    "audio": None,  # audio output
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """A parameter sent as `null` takes its default, whatever the default is (OpenAI's
        and vLLM's servers read `"n": null` as n = 1); a required one stays null, so its
        error says so."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None
            or key not in fields
            or fields[key].default is None
            or fields[key].is_required()
        }


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk with the usage, "usage": null on the others
    continuous_usage_stats: bool = False  # vLLM extension: each chunk with its choice's usage


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` extension (its `guided_*` fields' successor): exactly
    one of a JSON schema, a regex, a list of choices or a Lark grammar."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None


class _Sampling(_Request):
    """The parameters both generation endpoints share."""

    model: str | None = None  # None: the one served model
    max_tokens: int | None = Field(None, ge=1)  # None: the endpoint's default (http_server)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM extension; 0 and -1 disable it
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's bookkeeping and hints, accepted and unused: nothing is stored, the prefix
    # cache needs no key, and a prediction only ever changes latency
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM extension
    min_p: float = 0.0  # vLLM extension
    min_tokens: int = 0  # vLLM extension
    skip_special_tokens: bool = True  # vLLM extension: False shows them in the text
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    structured_outputs: StructuredOutputs | None = None  # vLLM extension


class JsonSchemaFormat(_Request):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced (strict or not)


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class CompletionRequest(_Sampling):
    # a text, a batch of texts, token ids, or a batch of token-id lists
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: with echo, the prompt only (scored)
    logprobs: int | None = Field(None, ge=0)  # alternatives per token (None: no logprobs)
    best_of: int | None = Field(None, ge=1)  # accepted when equal to n
    echo: bool = False  # the prompt before the completion, in text and logprobs
    suffix: str | None = None
    prompt_logprobs: int | None = Field(None, ge=0)  # vLLM extension: top-n per prompt token
    response_format: ResponseFormat | None = None  # vLLM extension on completions


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # history, handed to the template
    tool_call_id: str | None = None
    reasoning: str | None = None  # an earlier answer's thinking (vLLM's name) ...
    reasoning_content: str | None = None  # ... or its earlier one: the template reads either
    # what OpenAI's assistant messages carry besides: accepted as history, never rendered
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = None  # a reference to an earlier audio answer: only null is served
    function_call: None = None  # the deprecated tool_calls: only null is served


class FunctionDefinition(_Request):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema (None: no parameters)
    strict: bool | None = None  # the schema is always enforced (strict or not)


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    # None: "auto" with tools, else "none" (OpenAI's defaults); see tandem/serve/openai_tools.py
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[Literal["text"]] | None = None  # the one output modality served
    reasoning_effort: str | None = None  # handed to the chat template, as vLLM does
    include_reasoning: bool = True  # vLLM extension: false leaves the thinking out
    add_generation_prompt: bool = True  # vLLM extension
    continue_final_message: bool = False  # vLLM extension: the answer goes on from the
    # last message's text (with add_generation_prompt false)
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM extension (enable_thinking)


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a text (`prompt`) or a conversation (`messages`)."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # rendered by the chat template with the messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


# ---- responses ---------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens the prefix cache served


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class PromptLogprob(BaseModel):
    """vLLM's `Logprob` of one prompt position's token or alternative."""

    logprob: float
    rank: int
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop_token_ids entry
    # vLLM's shape: per prompt token, {token id: PromptLogprob} (the token itself and the
    # top prompt_logprobs), None for the first; present when prompt logprobs were computed
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None: the answer is tool_calls (or thinking cut short)
    tool_calls: list[ToolCall] | None = None  # None (null): a text answer, as OpenAI's
    # the thinking, with --reasoning-parser: vLLM's field and its earlier name, which
    # DeepSeek's API and many clients read
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop_token_ids entry


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
