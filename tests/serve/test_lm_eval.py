"""lm-evaluation-harness against tandem's OpenAI-compatible API, on small local JSON-lines
tasks shipped with the tests (no download), scores what lm-eval's own `hf` model scores on
the same weights, sample by sample: `local-chat-completions` (generate_until: the same
generations) and `local-completions` (multiple_choice over loglikelihood requests, which
tandem answers with echo + prompt logprobs: the same per-choice loglikelihoods and
is_greedy). The weights: a random Qwen2 model saved by transformers with a Qwen-style
tokenizer (ChatML template, two stop ids), imported into a bundle with `tandem import-hf`."""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tandem.model.hf import import_hf
from tandem.serve.config import ServeConfig
from tandem.serve.engine import JaxEngine
from tandem.serve.server import BackgroundServer, TandemServer
from tests.model.hf_tokenizers import build_tokenizer_dir

DATA = Path(__file__).resolve().parents[1] / "data" / "lm_eval" / "greetings.jsonl"
TASK = "tandem_greetings"
CHOICE_DATA = DATA.with_name("capitals.jsonl")
CHOICE_TASK = "tandem_capitals"


def tiny_qwen(root: Path) -> tuple[Path, Path]:
    """A random Qwen2 model saved by transformers with a Qwen2.5-style tokenizer (HF dir)
    and its float32 bundle (`tandem import-hf`): (hf_dir, bundle)."""
    import torch
    import transformers

    hf_dir = root / "hf"
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, initializer_range=0.5,  # clear argmaxes: greedy is stable
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(config).save_pretrained(hf_dir)
    build_tokenizer_dir("qwen2.5", hf_dir)
    return hf_dir, import_hf(hf_dir, root / "tiny-qwen", dtype="float32")


@pytest.fixture(scope="module")
def served_qwen(tmp_path_factory) -> Iterator[tuple[Path, BackgroundServer]]:
    """`tiny_qwen`'s HF dir, and its bundle served with the OpenAI API: one model and one
    warmed-up server for the module's tests. lm-eval and `datasets` stay offline."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        hf_dir, bundle = tiny_qwen(tmp_path_factory.mktemp("lm_eval"))
        cfg = ServeConfig(bundle=str(bundle), max_seqs=4, max_len=128, tensor_parallel=1,
                          port=0, http_port=0)  # fmt: skip
        engine = JaxEngine.from_bundle(bundle, cfg)
        with BackgroundServer(TandemServer(engine, dataclasses.replace(engine.serve_cfg))) as bg:
            yield hf_dir, bg


def _ok_requests(bg: BackgroundServer) -> float:
    """tandem_requests_total{status="OK"} from the server's /metrics."""
    metrics = urllib.request.urlopen(bg.base_url.removesuffix("/v1") + "/metrics").read()
    found = re.search(rb'^tandem_requests_total\{status="OK"\} (\S+)$', metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _task_dir(tmp_path: Path) -> Path:
    """The task's YAML, pointing at the shipped JSONL (datasets' local `json` builder)."""
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(DATA)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False,
                              "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                         "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }  # fmt: skip
    directory = tmp_path / "tasks"
    directory.mkdir()
    (directory / f"{TASK}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return directory


def _evaluate(model: str, model_args: dict, task_dir: Path) -> tuple[float, list[str]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model, model_args=model_args, tasks=[TASK], apply_chat_template=True,
        log_samples=True, task_manager=TaskManager(include_path=str(task_dir)),
    )  # fmt: skip
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK]["exact_match,none"], [s["filtered_resps"][0] for s in samples]


@pytest.mark.slow
def test_lm_eval_chat_scores_equal_the_hf_model_on_the_same_weights(tmp_path, served_qwen):
    hf_dir, bg = served_qwen
    task_dir = _task_dir(tmp_path)

    hf_score, hf_outputs = _evaluate(
        "hf", {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"}, task_dir
    )
    ok_before = _ok_requests(bg)
    args = {"model": "tiny-qwen", "base_url": f"{bg.base_url}/chat/completions",
            "num_concurrent": 2, "max_retries": 1}  # fmt: skip
    score, outputs = _evaluate("local-chat-completions", args, task_dir)
    orch = bg.server.orch
    assert orch.active_slots == 0 and orch.queue_depth == 0
    assert _ok_requests(bg) - ok_before == 8  # lm-eval asked tandem

    assert len(outputs) == len(DATA.read_text().splitlines()) == 8
    assert outputs == hf_outputs  # every generation, not only the score
    assert score == pytest.approx(hf_score)
    assert sum(bool(o.strip()) for o in outputs) >= 4  # real text was compared


def _choice_task_dir(tmp_path: Path) -> Path:
    """A multiple_choice task (one loglikelihood request per choice) on the shipped JSONL."""
    task = {
        "task": CHOICE_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(CHOICE_DATA)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    directory = tmp_path / "choice-tasks"
    directory.mkdir()
    (directory / f"{CHOICE_TASK}.yaml").write_text(json.dumps(task))
    return directory


def _loglikelihoods(model: str, model_args: dict, task_dir: Path) -> tuple[float, list]:
    """The task's accuracy and, per doc, each choice's (loglikelihood, is_greedy)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model, model_args=model_args, tasks=[CHOICE_TASK], log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir)),
    )  # fmt: skip
    samples = sorted(out["samples"][CHOICE_TASK], key=lambda s: s["doc_id"])
    scores = [[(float(r[0][0]), bool(r[0][1])) for r in s["resps"]] for s in samples]
    return out["results"][CHOICE_TASK]["acc,none"], scores


@pytest.mark.slow
def test_lm_eval_loglikelihood_equals_the_hf_model_on_the_same_weights(tmp_path, served_qwen):
    hf_dir, bg = served_qwen
    task_dir = _choice_task_dir(tmp_path)

    hf_acc, hf_scores = _loglikelihoods(
        "hf", {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"}, task_dir
    )
    ok_before = _ok_requests(bg)
    args = {"model": "tiny-qwen", "base_url": f"{bg.base_url}/completions",
            "tokenizer_backend": "huggingface", "tokenizer": str(hf_dir),
            "num_concurrent": 2, "max_retries": 1}  # fmt: skip
    acc, scores = _loglikelihoods("local-completions", args, task_dir)
    orch = bg.server.orch
    assert orch.active_slots == 0 and orch.queue_depth == 0
    requests = sum(len(json.loads(line)["choices"]) for line in CHOICE_DATA.open())
    assert _ok_requests(bg) - ok_before == requests

    assert len(scores) == len(hf_scores) == 6
    for got, want in zip(scores, hf_scores, strict=True):
        assert [g for _, g in got] == [g for _, g in want]  # is_greedy, exactly
        np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in want], atol=1e-4)
    assert acc == pytest.approx(hf_acc)
    assert len({ll for doc in scores for ll, _ in doc}) > 10  # real, varied scores compared
