"""tandem serving: engine (KV-cache slots), continuous-batching orchestrator, gRPC server.

Entry points: `tandem serve` / `python -m serve` (serve/__main__.py) and `tandem generate`
(serve/client.py). See docs/serving.md for the API and serve/engine_api.py for the
engine contract.
"""
