"""Python modules generated from proto/*.proto, made on first import.

    from services.protos import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc

grpcio-tools compiles proto/ into this package (git-ignored) whenever a .proto is newer
than its generated module, so a fresh checkout needs no extra step. protoc sees proto/
as `services/protos/`, so the generated modules import each other by their package path
and Ray's proxy actors can import them wherever the project is installed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
PROTO_DIR = _HERE.parents[1] / "proto"
PROTOS = ("gateway.proto", "worker.proto")


def _stale(proto: Path) -> bool:
    stem = proto.name.removesuffix(".proto")
    outputs = [_HERE / f"{stem}_pb2.py", _HERE / f"{stem}_pb2_grpc.py"]
    return any(not out.exists() or out.stat().st_mtime < proto.stat().st_mtime for out in outputs)


def generate() -> None:
    """Compile every stale .proto; written to a temporary directory first and renamed into
    place, so processes importing this at the same time never see half a module."""
    if not any(_stale(PROTO_DIR / name) for name in PROTOS):
        return
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(dir=_HERE) as tmp:
        args = ["protoc", f"-Iservices/protos={PROTO_DIR}", f"-I{_grpc_tools_include()}", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}", *(f"{PROTO_DIR / name}" for name in PROTOS)]  # fmt: skip
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR}: see the messages above")
        for generated in (Path(tmp) / "services" / "protos").glob("*.py"):
            os.replace(generated, _HERE / generated.name)


def _grpc_tools_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")  # google/protobuf/*.proto


generate()

from services.protos import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

__all__ = ["gateway_pb2", "gateway_pb2_grpc", "worker_pb2", "worker_pb2_grpc"]
