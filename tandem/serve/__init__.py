"""tandem serving: engine (KV-cache slots), continuous-batching orchestrator, gRPC server.

Entry points: `tandem serve` / `python -m tandem.serve` (tandem/serve/__main__.py) and `tandem generate`
(tandem/serve/client.py). See docs/serving.md for the API and tandem/serve/engine_api.py for the
engine contract.
"""
