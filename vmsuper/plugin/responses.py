"""Checking a server response the same way on the main connection and the VCPU channels."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from .errors import PluginError, ProtocolError

ResponseT = TypeVar("ResponseT", bound=Message)


def checked_response(
    data: bytes, response: ResponseT, case: str, name: str, *, log: ServerLog
) -> ResponseT:
    """Parse `data` into `response`; it must carry `case` and a non-negative errno.

    A non-zero errno raises PluginError, whose text says where the server logged its reason
    (`log`): the wire carries only the errno. Anything malformed raises ProtocolError. `name`
    is the request's name used in the errors.
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
        raise PluginError(err, f"{os.strerror(err)}; {log.where(case)}", name)
    return response


@dataclass(frozen=True)
class ServerLog:
    """Where the server logs why it refused a request: a file of the run's log folder, the
    event name, and the level (below which a run does not keep it)."""

    file: str
    event: str
    level: str

    def where(self, case: str) -> str:
        return (
            f"the server logs why as {self.event} (request={case}) in the run's {self.file},"
            f" at level {self.level}"
        )


MAIN_LOG = ServerLog("supervisor.jsonl", "main_request_failed", "info")
"""The supervisor's record of a refused main request."""


def vcpu_log(index: int) -> ServerLog:
    """A VCPU worker's record of a refused VCPU request."""
    return ServerLog(f"vcpu-{index}.jsonl", "request_failed", "warning")
