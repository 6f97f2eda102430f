"""`python benchmarks/vllm_compare.py ARGS` = `python -m tandem.benchmarks.vllm_compare ARGS`.

The code is tandem/benchmarks/vllm_compare.py (installed with tandem; see docs/benchmarks.md).
"""

import runpy

runpy.run_module("tandem.benchmarks.vllm_compare", run_name="__main__", alter_sys=True)
