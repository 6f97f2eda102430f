"""`python benchmarks/step_bench.py ARGS` = `python -m tandem.benchmarks.step_bench ARGS`.

The code is tandem/benchmarks/step_bench.py (installed with tandem; see docs/benchmarks.md).
"""

import runpy

runpy.run_module("tandem.benchmarks.step_bench", run_name="__main__", alter_sys=True)
