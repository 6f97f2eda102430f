"""The committed generated stubs must be exactly what protoc makes from the committed .proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "tandem/proto/v1"
GENERATED = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(
        ["bash", str(REPO / "scripts/gen_proto.sh"), str(tmp_path)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (PROTO_DIR / name).read_text()
        assert fresh == committed, f"{PROTO_DIR / name} is stale: run `bash scripts/gen_proto.sh`"


def test_generated_modules_import_as_package() -> None:
    from tandem.proto.v1 import generate_pb2, generate_pb2_grpc

    assert generate_pb2.DESCRIPTOR.package == "tandem.v1"
    service = generate_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert [m.name for m in service.methods] == [
        "Generate",
        "GenerateUnary",
        "Tokenize",
        "ModelInfo",
    ]
    assert hasattr(generate_pb2_grpc, "GenerationStub")
