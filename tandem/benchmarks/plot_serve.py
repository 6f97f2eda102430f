"""Plots `serve_bench` JSON lines: output throughput vs latency, one curve per mode.

    python -m tandem.benchmarks.plot_serve results.jsonl --out docs/img/serve_cpu.png

Each point is one benchmark run (one request rate, annotated); runs are grouped by `mode`
and joined in order of increasing request rate.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_serve", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="serve_bench --out JSONL files")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="tandem serving, CPU")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for path in args.results:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if "mode" in row and "e2e_ms" in row:
                rate = float(row.get("request_rate", "inf"))
                points[row["mode"]].append(
                    (rate, row["output_throughput"], row["e2e_ms"]["p50"], row["e2e_ms"]["p99"])
                )
    fig, (ax50, ax99) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in sorted(points.items()):
        rows.sort()
        for ax, col in ((ax50, 2), (ax99, 3)):
            ax.plot([r[1] for r in rows], [r[col] for r in rows], "o-", label=mode)
            for r in rows:
                label = "burst" if r[0] == float("inf") else f"{r[0]:g}/s"
                ax.annotate(
                    label, (r[1], r[col]), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    for ax, q in ((ax50, "p50"), (ax99, "p99")):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"end-to-end latency {q} (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
