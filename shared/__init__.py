"""What every part of vmsuper shares: KVM bindings, wire framing, the schema, shared memory."""

from vmsuper.shared.deferred_imports import PROTOBUF_PURE_PYTHON, defer

# Before anything here imports the schema (shared/plugin_pb2.py): see deferred_imports.py.
defer(PROTOBUF_PURE_PYTHON)
