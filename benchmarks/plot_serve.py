"""`python benchmarks/plot_serve.py ARGS` = `python -m tandem.benchmarks.plot_serve ARGS`.

The code is tandem/benchmarks/plot_serve.py (installed with tandem; see docs/benchmarks.md).
"""

import runpy

runpy.run_module("tandem.benchmarks.plot_serve", run_name="__main__", alter_sys=True)
