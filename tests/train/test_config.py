"""Bad configs fail at start-up with a message naming the field, before any compile."""

from __future__ import annotations

import pytest

from tandem.config import load_config
from tandem.train import loop
from tandem.train.config import TrainConfig
from tests.train.train_helpers import SMALL


@pytest.fixture
def no_compile(monkeypatch):
    """Any attempt to build the compiled Trainer fails the test."""

    def boom(*a, **k):
        raise AssertionError("a Trainer was built (compilation) before the config error")

    monkeypatch.setattr(loop, "Trainer", boom)


def _cfg(tmp_path, *overrides):
    return load_config(TrainConfig, "tiny", [*SMALL, f"run_dir={tmp_path}", *overrides])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["mesh.data=3"], "mesh.data=3"),
        (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=4"], "mesh.tensor=4"),
        (["batch_size=4", "mesh.fsdp=8"], "batch_size=4"),
        (["batch_size=8", "grad_accum=2", "mesh.fsdp=8"], "grad_accum=2"),
        (["data=/nonexistent/corpus.txt"], "data='/nonexistent/corpus.txt'"),
        (["eval_data=/nonexistent/eval"], "eval_data="),
        (["model.vocab_size=200"], "model.vocab_size=200"),
        (["mesh.dcn_data=2"], "mesh.dcn_data=2"),  # one process, no TPU slices
    ],
    ids=[
        "mesh-not-dividing",
        "mesh-product",
        "batch-vs-dp",
        "microbatch-vs-dp",
        "missing-data",
        "missing-eval-data",
        "vocab-too-small",
        "dcn-without-slices",
    ],
)
def test_startup_errors_name_the_field(tmp_path, no_compile, overrides, field):
    cfg = _cfg(tmp_path, *overrides)
    with pytest.raises(ValueError, match=r".*") as err:
        loop.run(cfg)
    assert field in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["batch_size=10", "grad_accum=4"], "batch_size=10"),
        (["seq_len=1024"], "seq_len=1024"),
        (["mesh.fsdp=-1", "mesh.data=-1"], "mesh.data"),
        (["mesh.tensor=0"], "mesh.tensor=0"),
        (["steps=0"], "steps=0"),
        (["distributed=maybe"], "distributed="),
        (["learning_rat=1"], "learning_rat"),
        (["mesh.dcn_data=0"], "mesh.dcn_data=0"),
    ],
    ids=[
        "accum",
        "seq-len",
        "two-fills",
        "zero-axis",
        "steps",
        "distributed",
        "unknown-key",
        "dcn-zero",
    ],
)
def test_config_errors_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError) as err:
        _cfg(tmp_path, *overrides)
    assert field in str(err.value), str(err.value)


def test_cli_reports_config_error(tmp_path, capsys, no_compile, monkeypatch):
    import sys

    from tandem.cli import run
    from tandem.train.__main__ import main

    with pytest.raises(ValueError, match="mesh.data=3"):  # the CLI layer prints it
        main(["tiny", f"run_dir={tmp_path}", *SMALL, "mesh.data=3"])
    monkeypatch.setattr(
        sys, "argv", ["train", "tiny", f"run_dir={tmp_path}", *SMALL, "mesh.data=3"]
    )
    assert run("train") == 1  # what `python -m tandem.train` and `tandem train` run
    assert "tandem train: error: mesh.data=3" in capsys.readouterr().err


def test_preset_and_roundtrip():
    cfg = load_config(TrainConfig, "small", ["steps=7", "mesh.tensor=2"])
    assert cfg.model.d_model == 768 and cfg.seq_len == 256 and cfg.steps == 7
    assert cfg.mesh.tensor == 2
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_bpe_tokenizer_is_trained_into_the_run_dir_at_startup(tmp_path, monkeypatch):
    """The default tokenizer path of run(): BPE on the embedded corpus' train split."""

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(loop, "Trainer", stop)
    with pytest.raises(Stop):
        loop.run(_cfg(tmp_path, "tokenizer=bpe", "model.vocab_size=512"))
    from tandem.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tmp_path / "tokenizer")
    assert tok.vocab_size == 512
    with pytest.raises(ValueError, match=r"model.vocab_size=300 is smaller"):
        loop.run(_cfg(tmp_path, "tokenizer=bpe", "model.vocab_size=300"))  # cached 512 one


def test_yaml_config_file_with_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("steps: 12\nmodel:\n  d_model: 64\n  n_layers: 2\nmesh:\n  fsdp: 4\n")
    cfg = load_config(TrainConfig, str(f), ["model.n_layers=3", "seed=5"])
    assert (cfg.steps, cfg.model.d_model, cfg.model.n_layers, cfg.mesh.fsdp, cfg.seed) == (
        12,
        64,
        3,
        4,
        5,
    )
