"""`tandem train init_from=PATH`: a run starts from a HF directory, a bundle or another run's
checkpoint; its first logged loss is the pretrained model's loss on that batch (checked
against transformers); shape changes are refused; a resumed run ignores init_from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tandem.config import load_config  # noqa: E402
from tandem.model.bundle import forward, model_from_tensors  # noqa: E402
from tandem.model.hf import import_hf  # noqa: E402
from tandem.model.tokenizer import Tokenizer  # noqa: E402
from tandem.train import data as tdata  # noqa: E402
from tandem.train.__main__ import main as train_main  # noqa: E402
from tandem.train.config import TrainConfig  # noqa: E402
from tandem.train.export import locate, restore_params  # noqa: E402
from tandem.train.init_from import locate as locate_pretrained  # noqa: E402
from tandem.train.loop import run  # noqa: E402
from tandem.train.sft import ExampleEncoder  # noqa: E402

from .train_helpers import free_port, read_log, spawn_cli  # noqa: E402

SEQ, BATCH = 32, 4
RUN = [
    f"seq_len={SEQ}",
    f"batch_size={BATCH}",
    "mesh.data=1",
    "mesh.fsdp=4",
    "mesh.tensor=2",  # the weights land sharded two ways
    "learning_rate=1e-3",
    "warmup_steps=0",
    "log_every=1",
    "eval_every=0",
    "eval_batches=1",
    "checkpoint_every=1",
    "progress=false",
    "tensorboard=false",
    "compile_cache_dir=''",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LlamaForCausalLM built locally, with tandem's byte tokenizer files."""
    directory = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=264,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=256,
        eos_token_id=257,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    Tokenizer.byte().save(directory)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "jax", "flax", "mesh"]
    lines = [json.dumps({"text": " ".join(rng.choice(words, 60))}) for _ in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return path


def first_loss(run_dir: Path) -> float:
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 1
    return record["loss"]


def first_batch(corpus: Path, run_dir: Path) -> dict[str, np.ndarray]:
    """The batch the run's first step trained on, rebuilt with the run's own pipeline."""
    train_source, _ = tdata.load_sources(str(corpus), None, 20, "text")
    tokenizer = Tokenizer.from_dir(run_dir / "tokenizer")
    batches = tdata.PackedBatches(
        train_source,
        ExampleEncoder(tokenizer),
        seq_len=SEQ,
        batch_size=BATCH,
        rows=range(BATCH),
        seed=0,
    )
    return next(batches)


def mean_loss(logits_of_segment, batch: dict[str, np.ndarray]) -> float:
    """Weighted next-token cross-entropy, each packed document run on its own."""
    total, count = 0.0, 0.0
    for row in range(BATCH):
        for seg in np.unique(batch["segment_ids"][row]):
            where = batch["segment_ids"][row] == seg
            logits = logits_of_segment(batch["tokens"][row][where])  # [t, V]
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            targets, weights = batch["targets"][row][where], batch["weights"][row][where]
            total += float(-(logp[np.arange(len(targets)), targets] * weights).sum())
            count += float(weights.sum())
    return total / count


def test_first_loss_is_the_pretrained_models_loss_per_transformers(hf_dir, corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert train_main([f"init_from={hf_dir}", f"data={corpus}", f"run_dir={run_dir}",
                       "steps=1", *RUN]) == 0  # fmt: skip
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()

    def hf_logits(tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = hf_model(torch.as_tensor(tokens[None], dtype=torch.long)).logits[0]
        return out.numpy().astype(np.float64)

    expected = mean_loss(hf_logits, first_batch(corpus, run_dir))
    assert first_loss(run_dir) == pytest.approx(expected, rel=1e-5)
    saved = json.loads((run_dir / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved["bos_token"] == "<bos>"  # the model's own tokenizer came along


def test_bundle_and_checkpoint_sources(hf_dir, corpus, tmp_path):
    """A bundle of the same weights starts at the same loss; another run's checkpoint
    starts at that run's trained weights; resuming ignores init_from."""
    from_hf, from_bundle, from_run = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = [f"data={corpus}", "steps=1", *RUN]
    assert train_main([f"init_from={hf_dir}", f"run_dir={from_hf}", *common]) == 0
    bundle = import_hf(hf_dir, tmp_path / "bundle", dtype="float32")
    assert train_main([f"init_from={bundle}", f"run_dir={from_bundle}", *common]) == 0
    assert first_loss(from_bundle) == pytest.approx(first_loss(from_hf), rel=1e-6)

    assert train_main([f"init_from={from_hf}", f"run_dir={from_run}", *common]) == 0
    pretrained = locate_pretrained(str(hf_dir)).model
    model = model_from_tensors(pretrained, dict(restore_params(locate(from_hf), pretrained)))
    expected = mean_loss(
        lambda t: forward(model, t[None].astype(np.int32))[0].astype(np.float64),
        first_batch(corpus, from_run),
    )
    assert first_loss(from_run) == pytest.approx(expected, rel=1e-5)

    again = [*RUN, f"data={corpus}", "steps=2", f"run_dir={from_run}", f"init_from={hf_dir}"]
    resumed = run(dataclasses.replace(load_config(TrainConfig, "tiny", again), model=pretrained))
    assert resumed["resumed_from"] == 1 and resumed["step"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.d_model=32"], "model.d_model=32 is invalid: allowed the pretrained model's 64"),
        (["tokenizer=byte"], "tokenizer='byte' is invalid: allowed 'auto' with init_from"),
        (["init_from=/nonexistent/dir"], "init_from='/nonexistent/dir' is invalid"),
    ],
    ids=["shape-change", "other-tokenizer", "missing-path"],
)
def test_refusals_name_the_field(hf_dir, corpus, tmp_path, extra, message):
    with pytest.raises(ValueError) as err:
        train_main([f"init_from={hf_dir}", f"data={corpus}", f"run_dir={tmp_path}", *RUN, *extra])
    assert message in str(err.value)


def test_adjustable_fields_may_differ(hf_dir, corpus, tmp_path, monkeypatch):
    """dtype / remat / attention_impl are how the weights are computed: allowed."""
    seen = {}
    monkeypatch.setattr("tandem.train.loop.run", lambda cfg: seen.setdefault("cfg", cfg) and {})
    train_main([f"init_from={hf_dir}", f"data={corpus}", f"run_dir={tmp_path}", *RUN,
                "model.remat=full", "model.dtype=bfloat16"])  # fmt: skip
    model = seen["cfg"].model
    assert (model.remat, model.dtype, model.d_model, model.vocab_size) == (
        "full",
        "bfloat16",
        64,
        264,
    )


@pytest.mark.slow
def test_two_processes_start_from_the_same_weights(hf_dir, corpus, tmp_path):
    """2 processes x 2 CPU devices (gloo): each process streams the tensors and places only
    its own shards; the first loss is the single-process one."""
    single = tmp_path / "single"
    assert train_main([f"init_from={hf_dir}", f"data={corpus}", f"run_dir={single}",
                       "steps=1", *RUN]) == 0  # fmt: skip
    run_dir, port = tmp_path / "two", free_port()
    layout = ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2"]  # the later keys win over RUN's
    procs = [
        spawn_cli(
            run_dir,
            [f"init_from={hf_dir}", f"data={corpus}", "steps=1", *RUN, *layout],
            devices=2,
            log_name=f"p{i}",
            env={
                "TANDEM_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "TANDEM_NUM_PROCESSES": "2",
                "TANDEM_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, read_log(run_dir, f"p{i}")[-3000:]
    assert "over 4 devices, 2 process(es)" in read_log(run_dir, "p0")
    assert first_loss(run_dir) == pytest.approx(first_loss(single), rel=1e-5)


def test_resumed_finetune_equals_uninterrupted(hf_dir, tmp_path):
    """A fine-tune stopped after 2 steps and re-run continues from its own checkpoint (not
    from init_from again) and ends where the uninterrupted run ends."""
    records = [{"prompt": f"question {i}?", "completion": f" answer {i}."} for i in range(30)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = [f"init_from={hf_dir}", f"data={data}", *RUN, "lr_decay_steps=4"]  # one schedule
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_main([*common, f"run_dir={straight}", "steps=4"]) == 0
    assert train_main([*common, f"run_dir={resumed}", "steps=2"]) == 0
    assert train_main([*common, f"run_dir={resumed}", "steps=4"]) == 0
    losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").open()]
    again = [json.loads(line)["loss"] for line in (resumed / "metrics.jsonl").open()]
    assert again == losses  # same mesh, same batches: exactly equal
    pretrained = locate_pretrained(str(hf_dir)).model
    a = dict(restore_params(locate(straight), pretrained))
    b = dict(restore_params(locate(resumed), pretrained))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
