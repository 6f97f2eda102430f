"""The committed generated stubs must be exactly what protoc makes from the committed .proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = Path("proto/tandem/v1")
GENERATED = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    (tmp_path / PROTO_DIR).mkdir(parents=True)
    shutil.copy(REPO / PROTO_DIR / "generate.proto", tmp_path / PROTO_DIR / "generate.proto")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        "--python_out=.",
        "--pyi_out=.",
        "--grpc_python_out=.",
        str(PROTO_DIR / "generate.proto"),
    ]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True)
    for name in GENERATED:
        fresh = (tmp_path / PROTO_DIR / name).read_text()
        committed = (REPO / PROTO_DIR / name).read_text()
        assert fresh == committed, (
            f"{PROTO_DIR / name} is stale: regenerate with `python -m grpc_tools.protoc -I . "
            f"--python_out=. --pyi_out=. --grpc_python_out=. {PROTO_DIR / 'generate.proto'}`"
        )


def test_generated_modules_import_as_package() -> None:
    from proto.tandem.v1 import generate_pb2, generate_pb2_grpc

    assert generate_pb2.DESCRIPTOR.package == "tandem.v1"
    service = generate_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert [m.name for m in service.methods] == [
        "Generate",
        "GenerateUnary",
        "Tokenize",
        "ModelInfo",
    ]
    assert hasattr(generate_pb2_grpc, "GenerationStub")
