"""`tandem serve --bundle B --port P [--metrics-port M] [--max-slots N]` / `python -m serve`.

Loads a bundle written by model/bundle.py, compiles every shape (health reports
NOT_SERVING meanwhile), serves tandem.v1.Generation on 127.0.0.1 by default, and drains
in-flight streams on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

log = logging.getLogger("serve")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem serve", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="serving bundle directory (tandem export)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    p.add_argument("--max-slots", type=int, default=None, help="concurrent sequences")
    p.add_argument("--max-len", type=int, default=None, help="positions per slot")
    p.add_argument("--max-prompt-len", type=int, default=None)
    p.add_argument(
        "--max-queue", type=int, default=None, help="waiting requests before RESOURCE_EXHAUSTED"
    )
    p.add_argument("--tensor-parallel", type=int, default=None, help="0 = all devices that fit")
    p.add_argument("--config", default=None, help="ServeConfig YAML/JSON file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ServeConfig override (repeatable)",
    )
    p.add_argument("--grace", type=float, default=30.0, help="seconds to drain on SIGTERM")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding the bearer token clients must send",
    )
    p.add_argument("--log-level", default="INFO")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from model.config import load_config
    from serve.config import ServeConfig
    from serve.engine import JaxEngine
    from serve.server import TandemServer, serve_until_signal

    overrides = list(args.set)
    for flag, key in (
        ("max_slots", "max_slots"),
        ("max_len", "max_len"),
        ("max_prompt_len", "max_prompt_len"),
        ("max_queue", "max_queue"),
        ("tensor_parallel", "tensor_parallel"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    scfg = load_config(ServeConfig, args.config or {}, overrides)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    token = args.token_file.read_text().strip() if args.token_file else None
    engine = JaxEngine.from_bundle(args.bundle, scfg)
    server = TandemServer(
        engine,
        engine.serve_cfg,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        token=token,
        tls_cert=args.tls_cert.read_bytes() if args.tls_cert else None,
        tls_key=args.tls_key.read_bytes() if args.tls_key else None,
    )
    asyncio.run(serve_until_signal(server, grace=args.grace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
