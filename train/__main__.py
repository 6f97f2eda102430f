"""`tandem train [CONFIG] [key=value ...]` (= `python -m tandem.train`).

CONFIG is a preset name (tiny, small, llama3-1b, llama3-8b; default tiny) or a YAML/JSON
file holding TrainConfig fields; every following `key=value` overrides one field (dotted
keys reach the nested model and mesh configs: `model.d_model=64 mesh.fsdp=4`).
Re-running the same command resumes from the newest checkpoint in run_dir.
"""

from __future__ import annotations

import logging
import sys

from tandem.config import parse_command_line


def main(argv: list[str] | None = None) -> int:
    from tandem.train.config import TrainConfig

    cfg = parse_command_line(
        TrainConfig,
        sys.argv[1:] if argv is None else argv,
        prog="tandem train",
        description=__doc__,
        default_source="tiny",
    )
    from tandem.train.loop import run

    # A bad config found at start-up (before any compile) raises ValueError; the CLI
    # prints it as one line and exits non-zero.
    summary = run(cfg)
    logging.getLogger(__name__).info("done: %s", summary)
    return 0


if __name__ == "__main__":
    from tandem.cli import run as run_command

    sys.exit(run_command("train"))
