"""`tandem serve [CONFIG] [key=value ...] [--bundle B --port P ...]` (= `python -m tandem.serve`).

CONFIG is a YAML/JSON file of ServeConfig keys; `key=value` overrides one key; every flag
is another spelling of a key (`--port 1` = `port=1`, `--max-seqs 8` = `max_seqs=8`).
Loads the bundle, compiles every shape (health reports NOT_SERVING meanwhile), serves
tandem.v1.Generation on 127.0.0.1 by default (and the OpenAI-compatible HTTP API with
--http-port), and drains in-flight streams on SIGTERM/SIGINT.
"""

from __future__ import annotations

import sys

import uvloop

from tandem.config import Flag, parse_command_line

FLAGS = (
    Flag("--bundle", "bundle", "serving bundle directory (tandem export / import-hf)"),
    Flag("--host", "host", "bind address (default 127.0.0.1)"),
    Flag("--port", "port", "gRPC port (0 = any free port)"),
    Flag("--metrics-port", "metrics_port", "Prometheus /metrics port"),
    Flag("--http-port", "http_port", "OpenAI-compatible HTTP API port (off unless given)"),
    Flag("--served-model-name", "served_model_name", "model name in the HTTP API"),
    Flag("--max-seqs", "max_seqs", "concurrent sequences"),
    Flag("--max-slots", "max_seqs", "= --max-seqs (older name)"),
    Flag("--max-len", "max_len", "positions per sequence (prompt + output)"),
    Flag("--kv-cache-tokens", "kv_cache_tokens", "KV-cache pool in tokens (0 = derive)"),
    Flag("--kv-cache-memory", "kv_cache_memory", "KV-cache pool in GiB per device (0 = derive)"),
    Flag("--page-size", "page_size", "tokens per KV-cache page"),
    Flag("--max-num-batched-tokens", "max_num_batched_tokens", "tokens one step runs"),
    Flag("--no-prefix-caching", "enable_prefix_caching", switch="false"),
    Flag("--async-scheduling", "async_scheduling", switch="true"),
    Flag("--no-async-scheduling", "async_scheduling", switch="false"),
    Flag("--max-prompt-len", "max_prompt_len"),
    Flag("--max-queue", "max_queue", "waiting requests before RESOURCE_EXHAUSTED"),
    Flag("--tensor-parallel", "tensor_parallel", "0 = all devices that fit"),
    Flag("--grace", "grace_s", "seconds to drain on SIGTERM"),
    Flag("--tls-cert", "tls_cert", "PEM certificate chain"),
    Flag("--tls-key", "tls_key", "PEM private key"),
    Flag("--token-file", "token_file", "file holding the bearer token clients must send"),
    Flag("--allowed-origins", "allowed_origins", "HTTP API's CORS origins, a JSON list"),
    Flag(
        "--tool-call-parser", "tool_call_parser", "tool calls' format: hermes, llama3_json, mistral"
    ),
    Flag("--reasoning-parser", "reasoning_parser", "thinking's format: deepseek_r1, qwen3"),
    Flag("--chat-template", "chat_template", "the chat API's Jinja template: a file or the text"),
)


def main(argv: list[str] | None = None) -> int:
    from tandem.serve.config import ServeConfig

    cfg = parse_command_line(
        ServeConfig,
        sys.argv[1:] if argv is None else argv,
        prog="tandem serve",
        description=__doc__,
        flags=FLAGS,
    )
    if not cfg.bundle:
        raise ValueError("bundle is not set: give --bundle DIR (or bundle=DIR)")
    from tandem.serve.engine import JaxEngine
    from tandem.serve.server import TandemServer, serve_until_signal

    engine = JaxEngine.from_bundle(cfg.bundle, cfg)
    uvloop.run(serve_until_signal(TandemServer(engine, engine.serve_cfg)))
    return 0


if __name__ == "__main__":
    from tandem.cli import run

    sys.exit(run("serve"))
