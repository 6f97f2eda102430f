"""`python benchmarks/maxtext_compare.py ARGS` = `python -m tandem.benchmarks.maxtext_compare ARGS`.

The code is tandem/benchmarks/maxtext_compare.py (installed with tandem; see docs/benchmarks.md).
"""

import runpy

runpy.run_module("tandem.benchmarks.maxtext_compare", run_name="__main__", alter_sys=True)
