"""The `tandem` command: one entry point, each subcommand owned by its package.

This is the one place that sets up logging and turns errors into exit codes, for
`tandem <command>` and for `python -m tandem.train` / `python -m tandem.serve` alike:
bad input (ValueError, a missing file) is one line on stderr and exit 1, a malformed
command line exit 2, never a traceback. Subcommands are imported lazily, so
`tandem generate` does not pay for importing the trainer.

Logging goes to stderr at INFO; `--log-level LEVEL` (anywhere on the line) or
TANDEM_LOG_LEVEL changes it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# subcommand -> (module, help); each module has main(argv) -> exit code
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("tandem.train.__main__", "train a model (python -m tandem.train)"),
    "export": ("tandem.train.export", "export a training checkpoint to a serving bundle"),
    "import-hf": ("tandem.model.hf", "import a Hugging Face Llama directory as a bundle"),
    "tokenizer": ("tandem.model.tokenizer", "train a BPE tokenizer on local files"),
    "serve": ("tandem.serve.__main__", "serve a bundle over gRPC (python -m tandem.serve)"),
    "generate": ("tandem.serve.client", "stream a completion from a running server"),
    "bench": ("tandem.benchmarks.cli", "run a benchmark (bench serve | train | kernels)"),
}

# Libraries that log at INFO what a user never needs: jax its backend probing, Orbax
# (through absl) every file it touches and optional metadata it does not find.
_QUIET = {"jax": logging.WARNING, "absl": logging.ERROR, "orbax": logging.WARNING}


def _usage() -> str:
    lines = ["usage: tandem [--log-level LEVEL] <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _pop_log_level(argv: list[str]) -> str:
    level = os.environ.get("TANDEM_LOG_LEVEL", "INFO")
    for i, arg in enumerate(argv):
        if arg == "--log-level" and i + 1 < len(argv):
            level = argv[i + 1]
            del argv[i : i + 2]
            break
        if arg.startswith("--log-level="):
            level = arg.partition("=")[2]
            del argv[i]
            break
    return level.upper()


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, quiet in _QUIET.items():
        logging.getLogger(name).setLevel(max(quiet, logging.getLogger().level))


def run(name: str, argv: list[str] | None = None, *, log_level: str | None = None) -> int:
    """Runs subcommand `name` with `argv` (default: the process's arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    found = _pop_log_level(argv)
    try:
        setup_logging(log_level or found)
    except ValueError as err:
        print(f"tandem {name}: error: --log-level: {err}", file=sys.stderr)
        return 2
    module, _ = COMMANDS[name]
    try:
        return int(importlib.import_module(module).main(argv) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Bad input: one clear line on stderr and a non-zero exit, no traceback.
        print(f"tandem {name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    log_level = _pop_log_level(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tandem: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run(name, rest, log_level=log_level)
