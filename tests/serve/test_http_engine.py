"""The OpenAI-compatible API on the real JAX engine: a tiny random model with a Qwen2.5-style
tokenizer (ChatML template, two stop ids) written as a bundle, served over HTTP and gRPC at
once. Greedy text over HTTP == over gRPC == the bundle model's own greedy decode, for
completions and chat; `n` choices are the seeds seed, seed+1, ... ; and `tandem serve
--http-port` answers, names the model after the bundle directory and drains on SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from flax import nnx

from tandem.model.bundle import Bundle, flat_params, write_bundle
from tandem.model.config import ModelConfig
from tandem.model.tokenizer import Tokenizer
from tandem.model.transformer import Transformer
from tandem.serve.client import TandemClient
from tandem.serve.config import ServeConfig
from tandem.serve.engine import JaxEngine
from tandem.serve.server import BackgroundServer, TandemServer
from tests.model.hf_tokenizers import build_tokenizer_dir
from tests.serve.test_engine import greedy_reference
from tests.xla_flags import on_devices

REPO = Path(__file__).resolve().parents[2]
SCFG = ServeConfig(
    max_seqs=4, max_len=80, max_prompt_len=48, page_size=16, tensor_parallel=1, port=0,
    http_port=0, metrics_port=0,
)  # fmt: skip
PROMPTS = ["Hello, how are you?", "def greet(name):", "The"]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello."},
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http-engine")
    tok = Tokenizer.from_dir(build_tokenizer_dir("qwen2.5", root / "tokenizer"))
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, d_ff=128, max_seq_len=96, init_std=0.5,
    )  # fmt: skip
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    return write_bundle(root / "tiny-qwen", cfg, tok, flat_params(params), source={"test": "http"})


@pytest.fixture(scope="module")
def served(bundle):
    engine = JaxEngine.from_bundle(bundle, dataclasses.replace(SCFG, bundle=str(bundle)))
    with BackgroundServer(TandemServer(engine, engine.serve_cfg)) as bg:
        yield bg


@pytest.fixture(scope="module")
def reference(bundle):
    """The bundle model's own greedy decode (full forward, no cache), cut after the first
    stop id unless ignore_eos."""
    loaded = Bundle.load(bundle)
    run = greedy_reference(loaded.model())
    stops = loaded.tokenizer.stop_ids

    def greedy(ids: list[int], steps: int, *, ignore_eos: bool = False) -> list[int]:
        out, _ = run(ids, steps)
        if not ignore_eos:
            for i, t in enumerate(out):
                if t in stops:
                    return out[: i + 1]
        return out

    return greedy, loaded.tokenizer


def test_greedy_http_equals_grpc_equals_the_models_own(served, reference) -> None:
    greedy, tok = reference
    client = openai.OpenAI(base_url=served.base_url, api_key="none", max_retries=0)
    (card,) = client.models.list().data
    assert card.id == "tiny-qwen"  # the bundle directory's name
    with TandemClient(served.target) as grpc_client:
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            for ignore_eos in (False, True):
                want = greedy(ids, 20, ignore_eos=ignore_eos)
                text = tok.decode([t for t in want if ignore_eos or t not in tok.stop_ids])
                extra = {"ignore_eos": True} if ignore_eos else {}
                r = client.completions.create(model="tiny-qwen", prompt=prompt, max_tokens=20,
                                              temperature=0, extra_body=extra)  # fmt: skip
                assert r.choices[0].text == text, (prompt, ignore_eos)
                assert r.usage.completion_tokens == len(want)
                assert r.choices[0].finish_reason == ("length" if len(want) == 20 else "stop")
                g = grpc_client.generate_text(prompt, max_tokens=20, ignore_eos=ignore_eos)
                assert list(g.token_ids) == want and g.text == text
                chunks = client.completions.create(model="tiny-qwen", prompt=prompt, max_tokens=20,
                                                   temperature=0, stream=True, extra_body=extra)  # fmt: skip
                assert "".join(c.choices[0].text for c in chunks) == text


def test_chat_greedy_is_the_models_own_on_the_templated_prompt(served, reference, bundle) -> None:
    import transformers

    greedy, tok = reference
    hf = transformers.AutoTokenizer.from_pretrained(bundle.parent / "tokenizer")  # the same files
    out = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    want = greedy(ids, 24)
    client = openai.OpenAI(base_url=served.base_url, api_key="none", max_retries=0)
    r = client.chat.completions.create(model="tiny-qwen", messages=CHAT, max_tokens=24,
                                       temperature=0)  # fmt: skip
    assert r.choices[0].message.content == tok.decode([t for t in want if t not in tok.stop_ids])
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)


def test_n_choices_are_the_seeds_seed_plus_i(served) -> None:
    client = openai.OpenAI(base_url=served.base_url, api_key="none", max_retries=0)
    r = client.completions.create(model="tiny-qwen", prompt="The", n=3, seed=11, max_tokens=12,
                                  temperature=1.0, extra_body={"ignore_eos": True})  # fmt: skip
    with TandemClient(served.target) as grpc_client:
        want = [
            grpc_client.generate_text("The", max_tokens=12, temperature=1.0, seed=11 + i,
                                      ignore_eos=True).text
            for i in range(3)
        ]  # fmt: skip
    assert [c.text for c in r.choices] == want
    assert len(set(want)) > 1  # sampled: the seeds differ, so do the texts
    with TandemClient(served.target) as grpc_client:  # gRPC's n: one stream, indexed
        texts = ["", "", ""]
        for chunk in grpc_client.generate("The", n=3, max_tokens=12, temperature=1.0, seed=11,
                                          ignore_eos=True):  # fmt: skip
            texts[chunk.index] += chunk.text
    assert texts == want


def _prefix_hits(served) -> float:
    with urllib.request.urlopen(f"{served.base_url.removesuffix('/v1')}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith("tandem_prefix_cache_hits_total "):
                return float(line.split()[1])
    raise AssertionError("no tandem_prefix_cache_hits_total in /metrics")


def test_n_choices_prefill_the_prompt_once(served) -> None:
    """The 2 full pages (16 tokens each) of a 40-token prompt are computed by the first
    choice and found cached by the other three, which wait for them."""
    client = openai.OpenAI(base_url=served.base_url, api_key="none", max_retries=0)
    prompt = list(range(100, 140))
    before = _prefix_hits(served)
    r = client.completions.create(model="tiny-qwen", prompt=prompt, n=4, seed=3, max_tokens=4,
                                  temperature=1.0, extra_body={"ignore_eos": True})  # fmt: skip
    assert len(r.choices) == 4
    assert _prefix_hits(served) - before == 3 * 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tandem_serve_http_port_end_to_end(bundle, reference) -> None:
    """`python -m tandem.serve --bundle B --port P --http-port H`: /health turns 200, the
    model is named after the bundle directory, and SIGTERM drains a stream and exits 0."""
    greedy, tok = reference
    port, http_port = _free_port(), _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": on_devices(1)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.serve", "--bundle", str(bundle), "--port", str(port),
         "--http-port", str(http_port), "--max-seqs", "2", "--max-len", "48",
         "--max-prompt-len", "32"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = urllib.request.urlopen(f"{base}/health", timeout=2).status
            except urllib.error.HTTPError as err:
                status = err.code  # 503 while warming up
            except OSError:
                status = None  # not listening yet
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else status
        models = json.loads(urllib.request.urlopen(f"{base}/v1/models", timeout=5).read())
        assert [m["id"] for m in models["data"]] == ["tiny-qwen"]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        want = greedy(tok.encode("Hello"), 8, ignore_eos=True)
        stream = client.completions.create(model="tiny-qwen", prompt="Hello", max_tokens=8,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        proc.send_signal(signal.SIGTERM)
        text += "".join(c.choices[0].text for c in chunks)  # drained, not cut
        assert text == tok.decode(want)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_penalties_over_http_equal_grpc(served, reference, monkeypatch) -> None:
    """The official client's presence/frequency penalties and logit_bias (string keys), and
    vLLM's repetition_penalty / min_p / min_tokens through extra_body, reach the sampler as
    the same request over gRPC does, and act there."""
    _, tok = reference
    orch = served.server.orch
    submitted = []
    submit = orch.submit

    def recording(ids, params, *args, **kw):
        submitted.append(params)
        return submit(ids, params, *args, **kw)

    monkeypatch.setattr(orch, "submit", recording)
    client = openai.OpenAI(base_url=served.base_url, api_key="none", max_retries=0)
    stop_id = min(tok.stop_ids)
    sampling = dict(max_tokens=16, presence_penalty=0.75, frequency_penalty=1.25)
    extra = {"repetition_penalty": 1.5, "min_p": 0.25, "min_tokens": 4}
    with TandemClient(served.target) as grpc_client:
        for temperature, seed in ((0.0, None), (1.0, 5)):
            seeded = {"seed": seed} if seed else {}
            r = client.completions.create(
                model="tiny-qwen", prompt="The", temperature=temperature, seed=seed,
                logit_bias={str(stop_id): 100}, extra_body=extra, **sampling,
            )  # fmt: skip
            g = grpc_client.generate_text(
                "The", temperature=temperature, **seeded, logit_bias={stop_id: 100.0}, **extra,
                **sampling,
            )  # fmt: skip
            http_params, grpc_params = submitted[-2:]
            assert http_params == grpc_params
            assert (http_params.presence_penalty, http_params.frequency_penalty) == (0.75, 1.25)
            assert (http_params.repetition_penalty, http_params.min_p) == (1.5, 0.25)
            assert http_params.logit_bias == ((stop_id, 100.0),) and http_params.min_tokens == 4
            # min_tokens held the (biased) stop id off for 4 tokens, then it came
            assert list(g.token_ids)[4] == stop_id and len(g.token_ids) == 5
            assert r.choices[0].text == g.text and r.choices[0].finish_reason == "stop"
            assert r.usage.completion_tokens == 5
        # min_p = 1 keeps only the top token: sampling at temperature 1 gives greedy output
        greedy = client.completions.create(model="tiny-qwen", prompt="The", max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        top_only = client.completions.create(model="tiny-qwen", prompt="The", max_tokens=8,
                                             temperature=1.0, seed=3,
                                             extra_body={"ignore_eos": True, "min_p": 1.0})  # fmt: skip
        assert top_only.choices[0].text == greedy.choices[0].text
        # a token forced by logit_bias repeats; a strong repetition penalty stops it repeating
        forced = tok.encode("!", add_special_tokens=False)[0]
        chat = client.chat.completions.create(
            model="tiny-qwen", messages=CHAT, max_tokens=6, temperature=0,
            logit_bias={str(forced): 50},
        )  # fmt: skip
        assert chat.choices[0].message.content == "!" * 6
        once = client.chat.completions.create(
            model="tiny-qwen", messages=CHAT, max_tokens=6, temperature=0,
            logit_bias={str(forced): 50}, extra_body={"repetition_penalty": 100.0},
        )  # fmt: skip
        assert once.choices[0].message.content.count("!") == 1
