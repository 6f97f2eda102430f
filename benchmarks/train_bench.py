"""`python benchmarks/train_bench.py ARGS` = `python -m tandem.benchmarks.train_bench ARGS`.

The code is tandem/benchmarks/train_bench.py (installed with tandem; see docs/benchmarks.md).
"""

import runpy

runpy.run_module("tandem.benchmarks.train_bench", run_name="__main__", alter_sys=True)
