"""`python benchmarks/paged_bench.py ARGS` = `python -m tandem.benchmarks.paged_bench ARGS`.

The code is tandem/benchmarks/paged_bench.py (installed with tandem; see docs/benchmarks.md).
"""

import runpy

runpy.run_module("tandem.benchmarks.paged_bench", run_name="__main__", alter_sys=True)
