"""The wire schema: committed generated code is fresh, the upb backend is in use, and the
project's .proto matches crosvm's plugin.proto field for field and number for number."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.internal import api_implementation
from grpc_tools import protoc

from vmsuper.shared import plugin_pb2

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ROOT.parent / "shared" / "plugin.proto"
REFERENCE_SHAPE = Path(__file__).resolve().parent / "data" / "plugin_proto_shape.json"
"""The wire shape (`_shape`) of crosvm's plugin.proto: names, numbers, types, oneofs."""


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


def _as_json(shape: dict[str, object]) -> dict[str, object]:
    return json.loads(json.dumps(shape, sort_keys=True))


def _upstream_shape(tmp_path: Path) -> dict[str, object]:
    out = tmp_path / "upstream.pb"
    rc = protoc.main(
        ["protoc", f"-I{UPSTREAM.parent}", f"--descriptor_set_out={out}", str(UPSTREAM)]
    )
    assert rc == 0
    upstream = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    assert upstream.syntax == "proto3"
    return _as_json(_shape(upstream))


def test_schema_matches_crosvm_plugin_proto(tmp_path: Path) -> None:
    """Against the reference .proto beside the checkout when it is there; the wire shape it
    gives is also committed (REFERENCE_SHAPE, checked to be current whenever the reference is
    at hand), so a checkout on its own still checks every field and number."""
    committed = json.loads(REFERENCE_SHAPE.read_text())
    if UPSTREAM.exists():
        reference = _upstream_shape(tmp_path)
        assert committed == reference, f"{REFERENCE_SHAPE} is stale: regenerate it from {UPSTREAM}"
    ours = descriptor_pb2.FileDescriptorProto()
    plugin_pb2.DESCRIPTOR.CopyToProto(ours)
    assert ours.syntax == "proto3"
    assert _as_json(_shape(ours)) == committed


def test_messages_round_trip_and_errno_is_zigzag() -> None:
    response = plugin_pb2.MainResponse(errno=22)
    response.reserve_range.SetInParent()
    data = response.SerializeToString()
    # sint32 22 is zigzag-encoded as 44, and the empty oneof case is still on the wire.
    assert data == b"\x08\x2c\x5a\x00"
    assert plugin_pb2.MainResponse.FromString(data).WhichOneof("message") == "reserve_range"
