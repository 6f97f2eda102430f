"""The gRPC API layer (grpc.aio): translates tandem.v1 messages to orchestrator calls.
`TandemServer` also runs the OpenAI-compatible HTTP API (tandem/serve/http_server.py) on the same
orchestrator, metrics and health when `http_port` is set.

It owns no scheduling: it validates and converts requests, streams `Output`s back, maps
errors to status codes, and runs the standard health service (NOT_SERVING until the engine
has compiled everything, then SERVING under "" and "tandem.v1.Generation") and server
reflection (so grpcurl works without the .proto).

Status codes: INVALID_ARGUMENT (bad field; the message names it, including unknown fields
and undecodable requests), RESOURCE_EXHAUSTED (queue full), DEADLINE_EXCEEDED, CANCELLED,
UNAVAILABLE (warming up or shutting down), UNAUTHENTICATED (bearer token, when enabled).
A client that hangs up has its request cancelled and its KV-cache pages freed within one
step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import uvloop
from google.protobuf import message as pb_message
from google.protobuf import unknown_fields
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from tandem.proto.v1 import generate_pb2 as pb
from tandem.serve.config import ServeConfig, unbindable
from tandem.serve.engine_api import Engine, RowToken
from tandem.serve.handoff import Handoff
from tandem.serve.http_server import HttpServer, OpenAIService
from tandem.serve.metrics import ServeMetrics
from tandem.serve.orchestrator import (
    Orchestrator,
    Output,
    RequestError,
    RequestHandle,
    merge_outputs,
)
from tandem.serve.sampling import SamplingParams
from tandem.serve.structured import StructuredOutput

log = logging.getLogger(__name__)

SERVICE = "tandem.v1.Generation"
_HEALTH_NAMES = ("", SERVICE)


class _BadRequest(Exception):
    """Raised while converting a request; becomes INVALID_ARGUMENT."""


class _Undecodable:
    """Stands in for a request whose bytes did not parse (e.g. invalid UTF-8 in `prompt`)."""

    def __init__(self, error: str) -> None:
        self.error = error


def _safe_deserializer(cls: type[pb_message.Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except pb_message.DecodeError as e:
            return _Undecodable(str(e))

    return parse


def _serialize(msg: pb_message.Message) -> bytes:
    return msg.SerializeToString()


def _check_message(msg: Any) -> None:
    if isinstance(msg, _Undecodable):
        raise _BadRequest(f"request could not be decoded: {msg.error}")
    unknown = [f.field_number for f in unknown_fields.UnknownFieldSet(msg)]
    if unknown:
        raise _BadRequest(
            f"unknown field numbers {sorted(set(unknown))} in {type(msg).DESCRIPTOR.full_name}: "
            "the client speaks a different tandem.v1 revision"
        )


def _token_logprob(st: RowToken) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=st.token,
        logprob=st.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in st.top],
    )


def _structured_output(req: Any) -> StructuredOutput | None:
    """The request's `structured_output` oneof (json_object=false is no constraint)."""
    kind = req.WhichOneof("structured_output")
    if kind is None or (kind == "json_object" and not req.json_object):
        return None
    try:
        return StructuredOutput(kind, "" if kind == "json_object" else getattr(req, kind))
    except ValueError as e:
        raise _BadRequest(str(e)) from e


def _to_response(out: Output, request_id: str, index: int = 0) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(
        text=out.text,
        token_ids=out.token_ids,
        finish_reason=out.finish_reason,
        matched_stop=out.matched_stop,
        request_id=request_id,
        index=index,
    )
    for st in out.logprobs:
        resp.logprobs.append(_token_logprob(st))
    for st in out.prompt_logprobs or ():
        resp.prompt_logprobs.append(_token_logprob(st))
    if out.final:
        resp.usage.prompt_tokens = out.prompt_tokens
        resp.usage.completion_tokens = out.completion_tokens
        resp.usage.cached_prompt_tokens = out.cached_prompt_tokens
    return resp


class GenerationService:
    """Handlers of tandem.v1.Generation over one orchestrator."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        engine: Engine,
        metrics: ServeMetrics | None,
        ready: threading.Event,
    ) -> None:
        self.orch = orchestrator
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.metrics = metrics
        self.ready = ready
        self._handoff: Handoff | None = None  # bound to the event loop at the first request

    # ---- conversion -----------------------------------------------------------------

    async def _parse(self, req: Any) -> tuple[list[int], list[SamplingParams]]:
        """The prompt's ids and one SamplingParams per choice (n), all validated."""
        _check_message(req)
        if req.prompt and req.prompt_token_ids:
            raise _BadRequest("prompt is invalid: set prompt or prompt_token_ids, not both")
        if req.prompt_token_ids:
            prompt_ids = list(req.prompt_token_ids)
        elif req.prompt:
            if len(req.prompt) > 64 * self.engine.max_prompt_len + 1024:
                raise _BadRequest(
                    f"prompt is invalid: {len(req.prompt)} characters cannot fit in "
                    f"max_prompt_len {self.engine.max_prompt_len} tokens"
                )
            loop = asyncio.get_running_loop()
            prompt_ids = await loop.run_in_executor(None, self.tokenizer.encode, req.prompt)
        else:
            raise _BadRequest("prompt is invalid: it is empty (set prompt or prompt_token_ids)")
        if req.max_tokens < 0:
            raise _BadRequest(f"max_tokens={req.max_tokens} is invalid: must be >= 0")
        if req.logprobs < 0:
            raise _BadRequest(f"logprobs={req.logprobs} is invalid: must be >= 0")
        if not math.isfinite(req.temperature):
            raise _BadRequest(f"temperature={req.temperature} is invalid: must be finite")
        n = max(req.n, 1)
        if req.n < 0 or n > self.orch.cfg.max_queue:
            raise _BadRequest(
                f"n={req.n} is invalid: must be in [0, max_queue={self.orch.cfg.max_queue}] "
                "(each choice is a sequence of its own)"
            )
        structured = _structured_output(req)
        if structured is not None:
            try:
                await self.orch.check_grammar(structured)
            except ValueError as e:
                raise _BadRequest(str(e)) from e
        fields: dict[str, Any] = {
            "max_tokens": req.max_tokens,
            "temperature": float(req.temperature),
            "top_k": req.top_k,
            "top_p": float(req.top_p) if req.HasField("top_p") else 1.0,
            "seed": req.seed if req.HasField("seed") else None,
            "stop": tuple(req.stop),
            "stop_token_ids": tuple(req.stop_token_ids),
            "logprobs": req.logprobs,
            "ignore_eos": req.ignore_eos,
            "structured_output": structured,
            "logit_bias": tuple(sorted(req.logit_bias.items())),
            "min_tokens": req.min_tokens,
            "prompt_logprobs": (req.prompt_logprobs if req.HasField("prompt_logprobs") else None),
        }
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            if req.HasField(name):
                fields[name] = float(getattr(req, name))
        try:
            params = self.orch.default_params(len(prompt_ids), **fields)
            self.orch.validate(prompt_ids, params)
        except ValueError as e:
            raise _BadRequest(str(e)) from e
        seed = params.seed
        choices = [  # seed, seed+1, ...: the same 64-bit patterns as the HTTP API's n
            dataclasses.replace(params, seed=None if seed is None else (seed + i) % 2**64)
            for i in range(n)
        ]
        return prompt_ids, choices

    async def _reject(self, context: grpc.aio.ServicerContext, code: str, msg: str) -> None:
        if self.metrics:
            self.metrics.count_request(code)
        await context.abort(grpc.StatusCode[code], msg)

    async def _start(
        self, req: Any, context: grpc.aio.ServicerContext, *, max_n: int
    ) -> tuple[list[RequestHandle], asyncio.Queue[tuple[int, Output]]]:
        """Submits the request's choices; their outputs arrive as (index, Output)."""
        if not self.ready.is_set():
            why = self.orch.failure or "model is warming up or the server is draining"
            await self._reject(context, "UNAVAILABLE", why)
        try:
            prompt_ids, choices = await self._parse(req)
            if len(choices) > max_n:
                raise _BadRequest(
                    f"n={req.n} is invalid: GenerateUnary returns one sequence; use the "
                    "streaming Generate for n > 1"
                )
        except _BadRequest as e:
            await self._reject(context, "INVALID_ARGUMENT", str(e))
        queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        if self._handoff is None:
            self._handoff = Handoff(asyncio.get_running_loop())
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        handles: list[RequestHandle] = []
        try:
            for i, params in enumerate(choices):
                sink = functools.partial(self._handoff.put, queue, i)
                handles.append(self.orch.submit(prompt_ids, params, sink, deadline=deadline))
        except (ValueError, RequestError) as e:
            for handle in handles:  # all choices run, or none
                handle.cancel()
            if isinstance(e, ValueError):
                await self._reject(context, "INVALID_ARGUMENT", str(e))
            await self._reject(context, e.code, e.message)
        return handles, queue

    # ---- RPCs -----------------------------------------------------------------------

    async def generate(self, req: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        handles, queue = await self._start(req, context, max_n=self.orch.cfg.max_queue)
        done: set[int] = set()
        try:
            while len(done) < len(handles):
                # what has arrived, merged per choice: one message per choice and wake-up
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                per_choice: dict[int, list[Output]] = {}
                for index, out in batch:
                    per_choice.setdefault(index, []).append(out)
                for index, outs in per_choice.items():
                    err = outs[-1].error
                    if err is not None:
                        outs.pop()  # what was decoded before the error is still delivered
                    if outs:
                        out = merge_outputs(outs)
                        if out.final:
                            done.add(index)
                        yield _to_response(out, req.request_id, index)
                    if err is not None:
                        await context.abort(grpc.StatusCode[err.code], err.message)
        finally:
            code = _cancel_code(context)
            for index, handle in enumerate(handles):
                if index not in done:
                    handle.cancel(code)

    async def generate_unary(self, req: Any, context: grpc.aio.ServicerContext) -> Any:
        handles, queue = await self._start(req, context, max_n=1)
        outs: list[Output] = []
        try:
            while not outs or not outs[-1].final:
                outs.append((await queue.get())[1])
        finally:
            if not outs or not outs[-1].final:
                handles[0].cancel(_cancel_code(context))
        if outs[-1].error is not None:
            await context.abort(grpc.StatusCode[outs[-1].error.code], outs[-1].error.message)
        return _to_response(merge_outputs(outs), req.request_id)

    async def tokenize(self, req: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_message(req)
        except _BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        ids = self.tokenizer.encode(req.text, add_special_tokens=req.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids)

    async def model_info(self, req: Any, context: grpc.aio.ServicerContext) -> Any:
        info = self.engine.info()
        tok = self.tokenizer
        return pb.ModelInfoResponse(
            config_json=json.dumps(info.get("config", {}), sort_keys=True),
            vocab_size=tok.vocab_size,
            max_slots=self.engine.max_seqs,
            max_len=self.orch.max_len,
            max_prompt_len=self.orch.max_prompt_len,
            max_logprobs=self.engine.max_logprobs,
            eos_id=tok.eos_id,
            bos_id=tok.bos_id,
            stop_token_ids=sorted(tok.stop_ids),
            manifest_json=json.dumps(info["manifest"], sort_keys=True)
            if info.get("manifest")
            else "",
            tensor_parallel=int(info.get("tensor_parallel", 1)),
            backend=str(info.get("backend", "")),
            prefill_buckets=list(self.engine.token_buckets()),
        )

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.generate, _safe_deserializer(pb.GenerateRequest), _serialize
            ),
            "GenerateUnary": grpc.unary_unary_rpc_method_handler(
                self.generate_unary, _safe_deserializer(pb.GenerateRequest), _serialize
            ),
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                self.tokenize, _safe_deserializer(pb.TokenizeRequest), _serialize
            ),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(
                self.model_info, _safe_deserializer(pb.ModelInfoRequest), _serialize
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (health checks are exempt, so
    load balancers can probe without the secret)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith("/grpc.health.v1.Health/") or handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        if metadata.get("authorization") == self._expected:
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        if handler.response_streaming:

            async def deny_stream(request, context):
                await deny(request, context)
                yield  # pragma: no cover  (makes this an async generator)

            return grpc.unary_stream_rpc_method_handler(
                deny_stream, handler.request_deserializer, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            deny, handler.request_deserializer, handler.response_serializer
        )


def _read(field: str, path: str) -> bytes:
    """A file named by a config field (b"" for none); a missing or unreadable one is a
    ValueError naming the field."""
    if not path:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        msg = f"{field}={path!r} is invalid: allowed a readable file ({err.strerror})"
        raise ValueError(msg) from None


def _cancel_code(context: grpc.aio.ServicerContext) -> str:
    """Why a handler ends before its request: its deadline passed, or the client left."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


class TandemServer:
    """One replica: engine + orchestrator + gRPC server + health + metrics."""

    def __init__(
        self,
        engine: Engine,
        cfg: ServeConfig | None = None,
    ) -> None:
        """`cfg` (default: the engine's) passed whole to the serving loop (which takes
        the engine's sizes, `orchestrator.loop_config`). Reads the token and TLS files now,
        so a missing one fails at start-up."""
        self.engine = engine
        self.metrics = ServeMetrics()
        self.orch = Orchestrator(engine, cfg, metrics=self.metrics)
        cfg = self.cfg = self.orch.cfg
        self.host = cfg.host
        self.ready = threading.Event()
        self.service = GenerationService(self.orch, engine, self.metrics, self.ready)
        self.health = health_aio.HealthServicer()
        self._token = _read("token_file", cfg.token_file).decode().strip() or None
        if cfg.token_file and self._token is None:  # else every client would be let in
            raise ValueError(f"token_file={cfg.token_file!r} is invalid: the file is empty")
        self._tls = (
            (_read("tls_cert", cfg.tls_cert), _read("tls_key", cfg.tls_key))
            if cfg.tls_cert
            else None
        )
        self._server: grpc.aio.Server | None = None
        self.bound_port: int | None = None
        self.bound_metrics_port: int | None = None
        self.bound_http_port: int | None = None
        self.http: HttpServer | None = None
        if cfg.http_port is not None:  # the OpenAI-compatible API on the same orchestrator
            openai = OpenAIService(
                self.orch, engine.tokenizer, cfg, max_len=self.orch.max_len,
                max_prompt_len=self.orch.max_prompt_len, metrics=self.metrics, ready=self.ready,
            )  # fmt: skip
            self.http = HttpServer(openai, cfg, token=self._token)
        self._warmup_task: asyncio.Task | None = None
        self._froze_heap = False

    async def start(self) -> int:
        """Binds and starts answering (NOT_SERVING); warm-up runs in the background."""
        interceptors = [BearerTokenInterceptor(self._token)] if self._token else []
        # SO_REUSEPORT (grpc's default) would let a second replica on this port start
        # silently and split the traffic; a taken port is an error instead.
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
        address = f"{self.host}:{self.cfg.port}"
        try:
            if self._tls:
                creds = grpc.ssl_server_credentials([(self._tls[1], self._tls[0])])
                self.bound_port = server.add_secure_port(address, creds)
            else:
                self.bound_port = server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind"
            self.bound_port = 0
        if not self.bound_port:
            raise unbindable("port", self.cfg.port, self.host)
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        try:  # no half-started replica: a port taken (or TLS files refused) stops it all
            if self.cfg.metrics_port is not None:
                try:
                    self.bound_metrics_port = self.metrics.serve_http(
                        self.cfg.metrics_port, self.host
                    )
                except OSError:
                    raise unbindable("metrics_port", self.cfg.metrics_port, self.host) from None
            if self.http is not None:
                self.bound_http_port = await self.http.start()
        except BaseException:
            await server.stop(0)
            self.metrics.close()
            self._server = None
            raise
        self._warmup_task = asyncio.create_task(self._warmup())
        log.info("gRPC on %s:%d (warming up)", self.host, self.bound_port)
        return self.bound_port

    async def _warmup(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        await loop.run_in_executor(None, self.engine.warmup)
        # Everything alive now (the libraries, the compiled steps, the model) lives as long
        # as the server: moved out of the collector's reach, so that a full collection
        # while serving walks only what requests allocate, not the whole startup heap (a
        # few hundred ms, a stall of every stream, docs/benchmarks.md). vLLM and SGLang do
        # the same after their warm-up (`freeze_gc_heap`, `freeze_gc`). `stop` undoes it.
        gc.collect()
        gc.freeze()
        self._froze_heap = True
        self.orch.on_failure = lambda: asyncio.run_coroutine_threadsafe(self._not_serving(), loop)
        self.orch.start()
        self.ready.set()
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("warm-up done in %.1f s: SERVING", time.perf_counter() - t0)

    async def _not_serving(self) -> None:
        """Health NOT_SERVING and new requests refused (draining, or the engine failed)."""
        self.ready.clear()
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def wait_ready(self) -> None:
        assert self._warmup_task is not None, "start() first"
        await self._warmup_task

    async def stop(self, grace: float = 30.0) -> None:
        """Graceful: NOT_SERVING, no new requests, in-flight streams finish (up to grace).
        The HTTP listener stays open while draining (503s, /health 503), then closes."""
        if self._server is None:
            return
        if self._warmup_task is not None and not self._warmup_task.done():
            with contextlib.suppress(BaseException):  # (NOT_SERVING until it ends)
                await self._warmup_task
        await self._not_serving()  # after it: its end sets SERVING
        loop = asyncio.get_running_loop()
        drained = loop.run_in_executor(None, lambda: self.orch.stop(drain=True, timeout=grace))
        await self._server.stop(grace)
        await drained
        if self.http is not None:
            await self.http.stop()
        self.metrics.close()
        self._server = None
        if self._froze_heap:  # the process may go on (tests, embedders): collectable again
            gc.unfreeze()
            self._froze_heap = False
        log.info("server stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve_until_signal(server: TandemServer) -> None:
    """Runs until SIGTERM/SIGINT, then drains for up to `grace_s` (what `tandem serve` does)."""
    grace = server.cfg.grace_s
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await server.start()
    waiter = asyncio.create_task(stop_requested.wait())
    warmup = server._warmup_task
    assert warmup is not None
    await asyncio.wait({waiter, warmup}, return_when=asyncio.FIRST_COMPLETED)
    if warmup.done() and warmup.exception() is not None:
        waiter.cancel()
        await server.stop(0)
        raise RuntimeError("engine warm-up failed") from warmup.exception()
    await waiter
    log.info("signal received: draining (grace %.0f s)", grace)
    await server.stop(grace)


class BackgroundServer:
    """A TandemServer on its own event-loop thread (tests, benchmarks, notebooks)."""

    def __init__(self, server: TandemServer) -> None:
        self.server = server
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self, *, wait_ready: bool = True, timeout: float = 600.0) -> BackgroundServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout)
        if wait_ready:
            asyncio.run_coroutine_threadsafe(self.server.wait_ready(), self._loop).result(timeout)
        return self

    @property
    def port(self) -> int:
        assert self.server.bound_port is not None
        return self.server.bound_port

    @property
    def target(self) -> str:
        return f"{self.server.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API's root, e.g. for `openai.OpenAI(base_url=...)`."""
        assert self.server.bound_http_port is not None, "started without http_port"
        scheme = "https" if self.server.cfg.tls_cert else "http"
        return f"{scheme}://{self.server.host}:{self.server.bound_http_port}/v1"

    def stop(self, grace: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(grace + 60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start() if not self._thread.is_alive() else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
