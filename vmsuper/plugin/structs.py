"""Kernel structs on the wire: state travels as the exact bytes of the kernel's struct."""

from __future__ import annotations

import ctypes
from typing import TypeVar

from .errors import ProtocolError

S = TypeVar("S", bound=ctypes.Structure)

StructLike = ctypes.Structure | bytes | bytearray | memoryview


def struct_from_bytes(cls: type[S], data: bytes, request: str) -> S:
    """Decode state returned by the server; a size other than the struct's is a protocol error."""
    size = ctypes.sizeof(cls)
    if len(data) != size:
        raise ProtocolError(f"{cls.__name__} is {size} bytes, the server sent {len(data)}", request)
    return cls.from_buffer_copy(data)


def struct_to_bytes(cls: type[ctypes.Structure], value: StructLike) -> bytes:
    """Encode state to send: an instance of `cls`, or raw bytes of exactly its size."""
    size = ctypes.sizeof(cls)
    if isinstance(value, ctypes.Structure):
        if not isinstance(value, cls):
            raise TypeError(f"expected {cls.__name__}, got {type(value).__name__}")
        return bytes(value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if len(data) != size:
            raise ValueError(f"{cls.__name__} is {size} bytes, got {len(data)}")
        return data
    raise TypeError(f"expected {cls.__name__} or bytes, got {type(value).__name__}")
