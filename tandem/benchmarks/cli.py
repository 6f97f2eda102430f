"""`tandem bench {serve,train,paged,step} ...`: the benchmarks behind one subcommand."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "serve": "tandem.benchmarks.serve_bench",
    "train": "tandem.benchmarks.train_bench",
    "paged": "tandem.benchmarks.paged_bench",
    "step": "tandem.benchmarks.step_bench",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: tandem bench {{{','.join(BENCHMARKS)}}} [args...]", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:]) or 0)
