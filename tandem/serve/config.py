"""ServeConfig: every knob of one serving replica, validated once, passed whole.

Loadable like every tandem config (`tandem.config.load_config`: YAML/JSON file plus
`key=value` overrides); `tandem serve`'s flags are other spellings of its keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar, Literal

from tandem.config import check_choices, require


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """What to serve, where, and the limits and scheduling of one replica.
    0 in a size field means "derive it"."""

    # --- what and where ---
    bundle: str = ""  # serving bundle directory (tandem export / tandem import-hf)
    host: str = "127.0.0.1"  # bind address
    port: int = 50051  # gRPC port; 0 = any free port
    metrics_port: int | None = None  # Prometheus /metrics; None = off, 0 = any free port
    http_port: int | None = None  # OpenAI-compatible HTTP API; None = off, 0 = any free port
    served_model_name: str = ""  # the model's name in the HTTP API; "" = the bundle dir's name
    tls_cert: str = ""  # PEM certificate chain (with tls_key: TLS on)
    tls_key: str = ""  # PEM private key
    token_file: str = ""  # file holding the bearer token clients must send ("" = none)
    allowed_origins: tuple[str, ...] = ("*",)  # HTTP API: origins browsers may call it
    # from (CORS; vLLM's default "*"); () = no CORS headers
    tool_call_parser: Literal["", "hermes", "llama3_json", "mistral"] = ""  # the served model's
    # tool-call format, for tool_choice "auto" (vLLM's --tool-call-parser); "" = "auto" off
    chat_template: str = ""  # the chat API's template: a Jinja file, or the template text
    # itself (vLLM's --chat-template); "" = the bundle's own
    reasoning_parser: Literal["", "deepseek_r1", "qwen3"] = ""  # the served model's thinking
    # apart from its answer (vLLM's --reasoning-parser); "" = the answer is all content
    grace_s: float = 30.0  # seconds to drain in-flight streams on SIGTERM

    # --- limits and scheduling ---
    max_seqs: int = 8  # concurrent sequences (running requests); older key: max_slots
    max_len: int = 0  # positions per sequence (prompt + output); 0 = model max_seq_len
    max_prompt_len: int = 0  # 0 = max_len - 1
    max_queue: int = 1024  # waiting requests beyond this get RESOURCE_EXHAUSTED (a
    # batch of prompts or n choices counts each: lm-eval sends its batch in one request)
    max_logprobs: int = 20  # most alternatives a request may ask for (compiled in;
    # OpenAI's top_logprobs range and vLLM's default)
    default_max_tokens: int = 256  # when a request leaves max_tokens at 0
    tensor_parallel: int = 0  # devices per replica on the `tensor` axis; 0 = all that fit
    cache_dtype: Literal["", "float32", "bfloat16"] = ""  # "" = the model's compute dtype
    # (float32 on CPU: tandem/serve/engine.py, default_cache_dtype)
    mode: Literal["continuous", "static"] = "continuous"  # static: benchmark baseline only
    static_batch_wait_s: float = 0.05  # static mode: wait this long to fill a batch
    max_prefills_per_step: int = 0  # continuous: prefills between two decode steps; 0 = any
    stream_interval: int = 1  # tokens per streamed message (vLLM/SGLang's stream interval);
    # the first token and the final message are never held back

    # --- paged KV cache and the token-budget step (tandem/serve/kv_cache.py, scheduler.py) ---
    kv_cache_tokens: int = 0  # KV-cache pool in tokens (pages x page_size); 0 = the engine
    # derives it from free device memory
    kv_cache_memory: float = 0.0  # or the pool's size in GiB of each device's memory
    # (instead of kv_cache_tokens; the engine converts it to whole pages)
    page_size: int = 0  # tokens per KV-cache page; 0 = the engine's default for its device
    max_num_batched_tokens: int = 2048  # tokens one step runs: decodes + prompt chunks
    # (vLLM's default for its OpenAI server on CPU; docs/benchmarks.md measures 512 too)
    enable_prefix_caching: bool = True  # share cached full pages of equal prefixes
    async_scheduling: bool = True  # plan step N+1 while step N runs (its decode inputs
    # taken on device from N's samples; vLLM's --async-scheduling); the loop commits first
    # while a request with a grammar runs (its bitmask needs the last token)

    KEY_ALIASES: ClassVar[Mapping[str, str]] = {"max_slots": "max_seqs"}  # old key -> key

    def __post_init__(self) -> None:
        check_choices(self)
        require(0 <= self.port <= 65535, "port", self.port, "0..65535 (0 = any free port)")
        require(
            self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            "metrics_port",
            self.metrics_port,
            "null (off) or 0..65535",
        )
        require(
            self.http_port is None or 0 <= self.http_port <= 65535,
            "http_port",
            self.http_port,
            "null (off) or 0..65535",
        )
        require(
            self.served_model_name == self.served_model_name.strip(),
            "served_model_name",
            self.served_model_name,
            "a name without leading or trailing whitespace",
        )
        require(
            bool(self.tls_cert) == bool(self.tls_key),
            "tls_key" if self.tls_cert else "tls_cert",
            "",
            "a PEM file whenever the other of tls_cert / tls_key is given",
        )
        require(self.grace_s >= 0, "grace_s", self.grace_s, ">= 0")
        require(self.max_seqs >= 1, "max_seqs", self.max_seqs, ">= 1")
        require(self.max_len >= 0, "max_len", self.max_len, ">= 0 (0 = model max_seq_len)")
        require(self.max_prompt_len >= 0, "max_prompt_len", self.max_prompt_len, ">= 0")
        require(
            self.max_len == 0 or self.max_prompt_len < self.max_len,
            "max_prompt_len",
            self.max_prompt_len,
            f"< max_len ({self.max_len})",
        )
        require(self.max_queue >= 0, "max_queue", self.max_queue, ">= 0")
        require(0 <= self.max_logprobs <= 64, "max_logprobs", self.max_logprobs, "0..64")
        require(self.default_max_tokens >= 1, "default_max_tokens", self.default_max_tokens, ">= 1")
        require(self.tensor_parallel >= 0, "tensor_parallel", self.tensor_parallel, ">= 0")
        require(
            self.static_batch_wait_s >= 0, "static_batch_wait_s", self.static_batch_wait_s, ">= 0"
        )
        require(
            self.max_prefills_per_step >= 0,
            "max_prefills_per_step",
            self.max_prefills_per_step,
            ">= 0",
        )
        require(self.stream_interval >= 1, "stream_interval", self.stream_interval, ">= 1")
        require(self.page_size >= 0, "page_size", self.page_size, ">= 1 (0 = the engine's default)")
        require(
            self.kv_cache_tokens == 0 or self.kv_cache_tokens >= 2 * self.page_size,
            "kv_cache_tokens",
            self.kv_cache_tokens,
            f"0 (derive) or >= 2 pages ({2 * self.page_size}): page 0 is the engine's null page",
        )
        require(
            self.kv_cache_memory >= 0 and not (self.kv_cache_memory and self.kv_cache_tokens),
            "kv_cache_memory",
            self.kv_cache_memory,
            "GiB >= 0, and 0 when kv_cache_tokens is set (one size, not two)",
        )
        require(
            self.max_num_batched_tokens >= self.max_seqs,
            "max_num_batched_tokens",
            self.max_num_batched_tokens,
            f">= max_seqs ({self.max_seqs}): every running sequence decodes each step",
        )

    @property
    def num_pages(self) -> int:
        """Pages in the KV-cache pool, the null page 0 included (0 until kv_cache_tokens and
        page_size are set)."""
        return self.kv_cache_tokens // self.page_size if self.page_size else 0

    @property
    def max_step_tokens(self) -> int:
        """The most tokens one step can compute, whatever the budget: a sequence computes
        at most `max_len` positions and each needs a slot of the pool (page 0 is the null
        page); never below `max_seqs` (a row each). Of a resolved config (the engine's):
        it caps `max_num_batched_tokens` there, as buckets above it would never run."""
        limit = self.max_seqs * self.max_len
        if self.kv_cache_tokens:
            limit = min(limit, (self.num_pages - 1) * self.page_size)
        return max(self.max_seqs, limit)

    def resolve(self, model_max_len: int, default_page_size: int) -> ServeConfig:
        """Fills the derived sizes from the model's context length and the engine's page
        size for its device (kv_cache_tokens is the engine's to derive)."""
        max_len = self.max_len or model_max_len
        require(
            max_len <= model_max_len, "max_len", max_len, f"<= model max_seq_len {model_max_len}"
        )
        require(max_len >= 2, "max_len", max_len, ">= 2")
        prompt = self.max_prompt_len or max_len - 1
        require(prompt < max_len, "max_prompt_len", prompt, f"< max_len ({max_len})")
        return dataclasses.replace(
            self,
            max_len=max_len,
            max_prompt_len=prompt,
            page_size=self.page_size or default_page_size,
        )


def unbindable(field: str, port: int | None, host: str) -> ValueError:
    """The error for a port field (`port`, `metrics_port`, `http_port`) that cannot be bound."""
    return ValueError(
        f"{field}={port} is invalid: {host}:{port} cannot be bound (the port is in use, or "
        f"host={host!r} is not an address of this machine); allowed a free port or 0 (any)"
    )
