"""`tandem train [CONFIG] [key=value ...]` (= `python -m tandem.train`).

CONFIG is a preset name (tiny, small, llama3-1b, llama3-8b; default tiny) or a YAML/JSON
file holding TrainConfig fields; every following `key=value` overrides one field (dotted
keys reach the nested model and mesh configs: `model.d_model=64 mesh.fsdp=4`).
Re-running the same command resumes from the newest checkpoint in run_dir.

With `init_from=PATH` (a HF model dir, a bundle or another run's checkpoints) the model
and its tokenizer come from PATH: a preset then only lends its training defaults, and
`model.*` may only change dtype, param_dtype, remat and attention_impl.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from tandem.config import load_config, split_command_line
from tandem.train.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    source, overrides = split_command_line(
        TrainConfig,
        sys.argv[1:] if argv is None else argv,
        prog="tandem train",
        description=__doc__,
        default_source="tiny",
    )
    cfg = load_config(TrainConfig, source, overrides)
    if cfg.init_from:
        cfg = _with_pretrained_model(cfg, source)
    from tandem.train.loop import run

    # A bad config found at start-up (before any compile) raises ValueError; the CLI
    # prints it as one line and exits non-zero.
    summary = run(cfg)
    logging.getLogger(__name__).info("done: %s", summary)
    return 0


def _with_pretrained_model(cfg: TrainConfig, source: str | None) -> TrainConfig:
    """`cfg` with its model taken from init_from. A preset's model settings are not
    requests (the preset lends training defaults); a config file's or a `model.*`
    override's are, and each must be one init_from allows."""
    from tandem.model.config import ModelConfig
    from tandem.train import init_from

    is_preset = source is not None and not source.endswith((".yaml", ".yml", ".json"))
    base = TrainConfig.preset(source).model if is_preset else ModelConfig()
    pretrained = init_from.locate(cfg.init_from)
    model = init_from.resolve_model(cfg.model, base, pretrained.model)
    return dataclasses.replace(cfg, model=model)


if __name__ == "__main__":
    from tandem.cli import run as run_command

    sys.exit(run_command("train"))
