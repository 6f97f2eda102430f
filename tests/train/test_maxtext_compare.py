"""benchmarks/maxtext_compare.py: the config mapping and the missing-MaxText exit."""

from __future__ import annotations

import sys
from typing import get_args

from tandem.benchmarks.maxtext_compare import REMAT, main, maxtext_flags
from tandem.model.config import ModelConfig, Remat


def test_every_remat_policy_has_a_maxtext_equivalent() -> None:
    assert set(REMAT) == set(get_args(Remat))


def test_flags_describe_the_preset_and_batch() -> None:
    cfg = ModelConfig.preset("small")
    flags = dict(f.split("=", 1) for f in maxtext_flags(cfg, batch=4, seq=256))
    assert flags["base_emb_dim"] == "768" and flags["base_num_decoder_layers"] == "12"
    assert (flags["base_num_query_heads"], flags["base_num_kv_heads"]) == ("12", "4")
    assert (flags["base_mlp_dim"], flags["vocab_size"]) == ("2048", "32000")
    assert flags["logits_via_embedding"] == "true"  # small ties its embeddings
    assert (flags["per_device_batch_size"], flags["max_target_length"]) == ("4", "256")


def test_missing_maxtext_is_a_clear_error(capsys) -> None:
    assert main(["--maxtext-python", sys.executable, "--presets", "tiny"]) == 1
    assert "MaxText is not importable" in capsys.readouterr().err
