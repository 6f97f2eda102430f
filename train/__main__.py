"""`python -m train CONFIG key=value ...` (also `tandem train ...`).

CONFIG is a preset name (tiny, small, llama3-1b, llama3-8b) or a YAML/JSON file holding
TrainConfig fields; every following `key=value` overrides one field (dotted keys reach the
nested model and mesh configs: `model.d_model=64 mesh.fsdp=4`). Re-running the same command
resumes from the newest checkpoint in run_dir.
"""

from __future__ import annotations

import logging
import sys

USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if "=" in argv[0]:
        source, overrides = "tiny", argv
    else:
        source, overrides = argv[0], argv[1:]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("jax", "absl", "orbax"):  # backend probing; Orbax logs every file it writes
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from model.config import load_config
    from train.config import TrainConfig

    cfg = load_config(TrainConfig, source, overrides)
    from train.loop import run

    # ValueError (a bad config, found at start-up before any compile) propagates: the CLI
    # wrappers (`tandem train`, `python -m train`) print it as one line and exit non-zero.
    summary = run(cfg)
    logging.getLogger("train").info("done: %s", summary)
    return 0


def _cli() -> int:
    try:
        return main()
    except ValueError as err:
        print(f"python -m train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
