"""The wire schema: committed generated code is fresh, the upb backend is in use, and the
project's .proto matches crosvm's plugin.proto field for field and number for number."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.internal import api_implementation
from grpc_tools import protoc

from vmsuper.shared import plugin_pb2

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ROOT.parent / "shared" / "plugin.proto"


def test_generated_code_is_fresh() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_upb_backend_in_use() -> None:
    assert api_implementation.Type() == "upb"


def _shape(fds: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    """Every message, field and enum by name (package stripped) -> what goes on the wire."""
    shape: dict[str, object] = {}

    def walk_enum(prefix: str, enum: descriptor_pb2.EnumDescriptorProto) -> None:
        shape[f"{prefix}{enum.name}"] = sorted((v.name, v.number) for v in enum.value)

    def walk(prefix: str, msg: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}{msg.name}"
        oneofs = [o.name for o in msg.oneof_decl]
        shape[name] = sorted(
            (
                f.name,
                f.number,
                f.type,
                f.label,
                f.type_name.rsplit(".", 1)[-1],
                oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
            )
            for f in msg.field
        )
        for nested in msg.nested_type:
            walk(f"{name}.", nested)
        for enum in msg.enum_type:
            walk_enum(f"{name}.", enum)

    for msg in fds.message_type:
        walk("", msg)
    for enum in fds.enum_type:
        walk_enum("", enum)
    return shape


def test_schema_matches_crosvm_plugin_proto(tmp_path: Path) -> None:
    if not UPSTREAM.exists():
        pytest.fail(f"the reference schema {UPSTREAM} is missing")
    out = tmp_path / "upstream.pb"
    rc = protoc.main(
        ["protoc", f"-I{UPSTREAM.parent}", f"--descriptor_set_out={out}", str(UPSTREAM)]
    )
    assert rc == 0
    upstream = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    ours = descriptor_pb2.FileDescriptorProto()
    plugin_pb2.DESCRIPTOR.CopyToProto(ours)
    assert _shape(ours) == _shape(upstream)
    assert ours.syntax == upstream.syntax == "proto3"


def test_messages_round_trip_and_errno_is_zigzag() -> None:
    response = plugin_pb2.MainResponse(errno=22)
    response.reserve_range.SetInParent()
    data = response.SerializeToString()
    # sint32 22 is zigzag-encoded as 44, and the empty oneof case is still on the wire.
    assert data == b"\x08\x2c\x5a\x00"
    assert plugin_pb2.MainResponse.FromString(data).WhichOneof("message") == "reserve_range"
