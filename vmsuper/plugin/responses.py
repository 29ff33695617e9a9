"""Checking a server response the same way on the main connection and the VCPU channels."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message

from .errors import PluginError, ProtocolError

ResponseT = TypeVar("ResponseT", bound=Message)


def checked_response(data: bytes, response: ResponseT, case: str, name: str) -> ResponseT:
    """Parse `data` into `response`; it must carry `case` and a non-negative errno.

    A non-zero errno raises PluginError; anything malformed raises ProtocolError. `name` is
    the request's name used in the errors.
    """
    kind = type(response).__name__
    try:
        response.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError, or others on malformed input
        raise ProtocolError(f"undecodable {kind}: {exc}", name) from exc
    got = response.WhichOneof("message")
    err: int = getattr(response, "errno")  # noqa: B009 - a field named like the module
    if got != case:
        raise ProtocolError(f"response case {got!r} (errno {err}) to a {case!r} request", name)
    if err < 0:
        raise ProtocolError(f"negative errno {err} (must be positive)", name)
    if err:
        raise PluginError(err, request=name)
    return response
