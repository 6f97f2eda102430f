"""`tandem` console script: one entry point, each subcommand owned by its package.

Logging goes to stderr at INFO (TANDEM_LOG_LEVEL=WARNING quiets it). Subcommands are
imported lazily so `tandem generate` does not pay for importing the
trainer, and train/serve stay independent of each other.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# subcommand -> ("module", "function"), each function is main(argv) -> exit code
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("train.__main__", "main", "train a model (python -m train)"),
    "export": ("train.export", "main", "export a training checkpoint to a serving bundle"),
    "import-hf": ("model.hf", "main", "import a Hugging Face Llama directory as a bundle"),
    "tokenizer": ("model.tokenizer", "main", "train a BPE tokenizer on local files"),
    "serve": ("serve.__main__", "main", "serve a bundle over gRPC (python -m serve)"),
    "generate": ("serve.client", "main", "stream a completion from a running server"),
    "bench": ("benchmarks.cli", "main", "run a benchmark (bench serve | train | kernels)"),
}


def _usage() -> str:
    lines = ["usage: tandem <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tandem: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    level = os.environ.get("TANDEM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # jax logs its backend probing at INFO; Orbax (through absl) logs every file it touches
    # and warns about optional metadata it does not find.
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    module, function, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), function)(rest) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Bad input: one clear line on stderr and a non-zero exit, no traceback.
        print(f"tandem {name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
