"""Prompt logprobs on the JAX engine against `transformers` on the same weights: every prompt
position's logprob, rank and top alternatives equal log_softmax of the HF model's logits,
for a prompt chunked over several steps, for one sent again once its pages are in the
prefix cache (which such a request must not read), and with a step's other rows asking for
nothing; a request that asks nothing gets no prompt rows back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tandem.serve.config import ServeConfig
from tandem.serve.engine import JaxEngine
from tandem.serve.orchestrator import Orchestrator, Output
from tandem.serve.sampling import SamplingParams
from tests.serve.test_lm_eval import tiny_qwen

# Steps of 16 tokens, pages of 4: the 40-token prompt below runs in three chunks.
SCFG = ServeConfig(
    max_seqs=4, max_len=96, page_size=4, max_num_batched_tokens=16, max_logprobs=5,
    tensor_parallel=1,
)  # fmt: skip
TOP = 3


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_qwen(tmp_path_factory.mktemp("prompt-logprobs"))


@pytest.fixture(scope="module")
def engine(weights) -> JaxEngine:
    _, bundle = weights
    eng = JaxEngine.from_bundle(bundle, dataclasses.replace(SCFG, bundle=str(bundle)))
    eng.warmup()
    return eng


@pytest.fixture(scope="module")
def hf_logprobs(weights):
    """log_softmax of the HF model's float32 logits at every position of a prompt."""
    import torch
    import transformers

    hf_dir, _ = weights
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)

    def run(ids: list[int]) -> np.ndarray:  # [S, V]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).numpy()

    return run


def _run(
    engine: JaxEngine, requests: list[tuple[list[int], SamplingParams]]
) -> tuple[list[Output], Orchestrator]:
    """Each request's first message (the one that carries prompt logprobs), in order, and
    the orchestrator that ran them."""
    orch = Orchestrator(engine)
    firsts: dict[int, Output] = {}
    for i, (ids, params) in enumerate(requests):
        orch.submit(ids, params, lambda out, i=i: firsts.setdefault(i, out))
    while orch.step():
        pass
    return [firsts[i] for i in range(len(requests))], orch


def _check(out: Output, ids: list[int], logp: np.ndarray, top: int, tol: float = 1e-4) -> None:
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids) - 1
    for p, st in enumerate(out.prompt_logprobs, start=1):
        row = logp[p - 1]  # the logits before token p score it
        assert (st.token, st.position) == (ids[p], p)
        assert st.logprob == pytest.approx(float(row[ids[p]]), abs=tol)
        assert st.rank == 1 + int(np.sum(row > row[ids[p]]))
        want = np.argsort(-row, kind="stable")[:top]
        assert [t for t, _ in st.top] == want.tolist()
        np.testing.assert_allclose([v for _, v in st.top], row[want], atol=tol, rtol=0)


def test_prompt_logprobs_equal_transformers_chunked_and_cache_warm(engine, hf_logprobs) -> None:
    tok = engine.tokenizer
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 4)[:40]
    short = tok.encode("Hello there")
    assert len(ids) == 40 > SCFG.max_num_batched_tokens  # chunked: three steps
    asked = SamplingParams(max_tokens=2, prompt_logprobs=TOP)
    plain = SamplingParams(max_tokens=2)
    logp = hf_logprobs(ids)
    assert len({int(np.argmax(r)) for r in logp}) > 3  # a model with varied predictions

    (first, other), _ = _run(engine, [(ids, asked), (short, plain)])
    _check(first, ids, logp, TOP)
    assert other.prompt_logprobs is None  # its neighbour asked; it did not
    ranks = [st.rank for st in first.prompt_logprobs]
    assert len(set(ranks)) > 3  # ranks vary: they are really compared

    # The same prompt again in one orchestrator: the second request asking for prompt
    # logprobs must compute its whole prompt (no prefix hit), the one that does not reuses
    # the first's published pages.
    (warm, again, _), orch = _run(engine, [(ids, asked), (ids, asked), (ids, plain)])
    for out in (warm, again):
        _check(out, ids, logp, TOP)
    assert orch.scheduler.kv.prefix_hits >= 36  # `reused` was served from the cache


def test_prompt_logprobs_zero_scores_the_prompt_tokens_only(engine, hf_logprobs) -> None:
    ids = engine.tokenizer.encode("def greet(name): return name")
    (out,), _ = _run(engine, [(ids, SamplingParams(max_tokens=1, prompt_logprobs=0))])
    _check(out, ids, hf_logprobs(ids), 0)


def test_preempted_requests_score_their_prompt_once(weights, hf_logprobs) -> None:
    """A pool of 24 pages for three 40-token prompts generating 20 tokens each: requests
    are preempted and recomputed, and each still reports every prompt position once, as
    transformers scores it."""
    _, bundle = weights
    cfg = dataclasses.replace(SCFG, bundle=str(bundle), kv_cache_tokens=25 * 4)
    tight = JaxEngine.from_bundle(bundle, cfg)
    tight.warmup()
    tok = tight.tokenizer
    prompts = [tok.encode(f"Story {i}: once upon a time, far away. " * 5)[:40] for i in range(3)]
    asked = SamplingParams(max_tokens=20, prompt_logprobs=TOP, ignore_eos=True)
    outs, orch = _run(tight, [(ids, asked) for ids in prompts])
    assert orch.scheduler.num_preemptions > 0
    for out, ids in zip(outs, prompts, strict=True):  # (float32 sums in other orders:
        _check(out, ids, hf_logprobs(ids), TOP, tol=3e-4)  # logprobs near -14 differ by 1e-4)
