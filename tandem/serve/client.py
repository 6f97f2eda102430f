"""Python client for tandem.v1.Generation, and `tandem generate` (streams to the terminal).

client = TandemClient("127.0.0.1:50051")
for chunk in client.generate("Once upon a time", max_tokens=32, temperature=0.8, seed=1):
    print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from tandem.proto.v1 import generate_pb2 as pb
from tandem.proto.v1 import generate_pb2_grpc as pb_grpc


class TandemClient:
    """Thin wrapper over the generated stub: keyword sampling args, optional TLS/token."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        if tls:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    @staticmethod
    def request(prompt: str | Sequence[int], **sampling: Any) -> pb.GenerateRequest:
        """A GenerateRequest from a text (or token ids) and GenerateRequest field values."""
        if isinstance(prompt, str):
            return pb.GenerateRequest(prompt=prompt, **sampling)
        return pb.GenerateRequest(prompt_token_ids=list(prompt), **sampling)

    def generate(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **sampling: Any
    ) -> Iterator[pb.GenerateResponse]:
        """Streams responses; stop early with `.cancel()` on the returned iterator.
        `sampling` takes GenerateRequest fields (max_tokens, temperature, stop, seed ...)."""
        return self.stub.Generate(
            self.request(prompt, **sampling),
            timeout=timeout or self.timeout,
            metadata=self._metadata,
        )

    def generate_text(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **sampling: Any
    ) -> pb.GenerateResponse:
        """The whole generation in one response (GenerateUnary)."""
        return self.stub.GenerateUnary(
            self.request(prompt, **sampling),
            timeout=timeout or self.timeout,
            metadata=self._metadata,
        )

    def tokenize(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        resp = self.stub.Tokenize(
            pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
            timeout=self.timeout,
            metadata=self._metadata,
        )
        return list(resp.token_ids)

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(
            pb.ModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem generate", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of a tandem server")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-tokens", type=int, default=0, help="0 = server default")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--logprobs", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--token", default=None, help="bearer token")
    p.add_argument("--tls", action="store_true", help="use TLS (system roots or --ca-cert)")
    p.add_argument("--ca-cert", default=None, help="PEM file of the server's CA")
    p.add_argument("--json", action="store_true", help="print each response as a JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    """`tandem generate --target HOST:PORT --prompt TEXT [sampling flags] [--json]`."""
    args = _parser().parse_args(argv)
    from google.protobuf import json_format

    sampling: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "stop": args.stop,
        "logprobs": args.logprobs,
        "ignore_eos": args.ignore_eos,
    }
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    if args.seed is not None:
        sampling["seed"] = args.seed
    roots = open(args.ca_cert, "rb").read() if args.ca_cert else None  # noqa: SIM115
    with TandemClient(
        args.target, token=args.token, tls=args.tls or roots is not None,
        root_certificates=roots, timeout=args.timeout,
    ) as client:  # fmt: skip
        try:
            last = None
            for resp in client.generate(args.prompt, **sampling):
                last = resp
                if args.json:
                    line = json_format.MessageToDict(resp, preserving_proto_field_name=True)
                    sys.stdout.write(json.dumps(line) + "\n")
                else:
                    sys.stdout.write(resp.text)
                sys.stdout.flush()
            if not args.json:
                sys.stdout.write("\n")
                if last is not None:
                    print(
                        f"[finish_reason={last.finish_reason} "
                        f"prompt_tokens={last.usage.prompt_tokens} "
                        f"completion_tokens={last.usage.completion_tokens}]",
                        file=sys.stderr,
                    )
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
