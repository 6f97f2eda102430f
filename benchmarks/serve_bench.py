"""`python benchmarks/serve_bench.py ARGS` = `python -m tandem.benchmarks.serve_bench ARGS`.

The code is tandem/benchmarks/serve_bench.py (installed with tandem; see docs/benchmarks.md).
"""

import runpy

runpy.run_module("tandem.benchmarks.serve_bench", run_name="__main__", alter_sys=True)
