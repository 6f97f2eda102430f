"""`python benchmarks/kernel_bench.py ARGS` = `python -m tandem.benchmarks.kernel_bench ARGS`.

The code is tandem/benchmarks/kernel_bench.py (installed with tandem; see docs/benchmarks.md).
"""

import runpy

runpy.run_module("tandem.benchmarks.kernel_bench", run_name="__main__", alter_sys=True)
