"""train -> export -> serve -> stream over real gRPC, through the real command lines.

The streamed tokens must equal the exported model's own greedy decode (a full forward
per step, no KV cache), for several prompts sent at once so batching is exercised.
"""

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.model.bundle import Bundle
from tandem.serve.client import TandemClient
from tests.serve.test_engine import greedy_reference
from tests.xla_flags import on_devices

MODEL = [
    "model.vocab_size=512",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=16",
    "model.d_ff=128",
]
PROMPTS = ["def main(", "import os\n", "class Parser:\n    def __init__(self"]
NEW_TOKENS = 12


def tandem(*args, timeout=600):
    result = subprocess.run(
        [sys.executable, "-m", "tandem", *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(port: int, server: subprocess.Popen, limit: float = 300) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read()[-3000:]
        try:
            status = stub.Check(
                health_pb2.HealthCheckRequest(service="tandem.v1.Generation"), timeout=2
            ).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise AssertionError("server never reported SERVING")


@pytest.mark.slow
def test_train_export_serve_streams_the_models_greedy_tokens(tmp_path):
    run_dir, bundle_dir = tmp_path / "run", tmp_path / "bundle"
    tandem(
        "train",
        "tiny",
        f"run_dir={run_dir}",
        "steps=8",
        "checkpoint_every=4",
        "seq_len=64",
        "batch_size=8",
        "eval_every=0",
        "progress=false",
        "tensorboard=false",
        "compile_cache_dir=''",
        *MODEL,
    )
    tandem(
        "export",
        "--checkpoint",
        str(run_dir),
        "--out",
        str(bundle_dir),
        "--dtype",
        "float32",
        "--eval-batches",
        "1",
    )
    bundle = Bundle.load(bundle_dir)
    assert bundle.manifest["source"]["step"] == 8
    greedy = greedy_reference(bundle.model())

    port = free_port()
    env = dict(os.environ, XLA_FLAGS=on_devices(1))  # one CPU device, as a user runs it
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem.serve",
            "--bundle",
            str(bundle_dir),
            "--port",
            str(port),
            "--max-slots",
            "4",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_serving(port, server)
        client = TandemClient(f"127.0.0.1:{port}", timeout=120)

        def stream(prompt):
            chunks = list(
                client.generate(prompt, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
            )
            tokens = [t for c in chunks for t in c.token_ids]
            return tokens, "".join(c.text for c in chunks), chunks[-1].finish_reason

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(stream, PROMPTS))
        for prompt, (tokens, text, finish) in zip(PROMPTS, results, strict=True):
            assert finish == "length"
            assert tokens == greedy(bundle.tokenizer.encode(prompt), NEW_TOKENS)[0], prompt
            assert text == bundle.tokenizer.decode(tokens)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, server.stderr.read()[-3000:]
    assert np.isfinite(bundle.manifest["quality"]["perplexity_bundle"])
