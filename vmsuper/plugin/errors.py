"""Exceptions of the plugin SDK.

Every failure the server reports becomes a `PluginError` carrying the server's errno, so a
plugin can catch one type and still tell ``EEXIST`` from ``EPERM``. Failures of the other side
to follow the protocol are kept apart (`ProtocolError`), as are mistakes in how the plugin uses
the SDK (`VcpuStateError`): those point at a bug, not at a refused request.
"""

from __future__ import annotations

import errno as _errno
import os


class PluginError(OSError):
    """A request failed; ``errno`` is the (positive) errno, ``request`` the request's name."""

    request: str

    def __init__(self, code: int, message: str | None = None, request: str = "") -> None:
        text = message if message is not None else os.strerror(code)
        if request:
            text = f"{request}: {text}"
        super().__init__(code, text)
        self.request = request


class ProtocolError(PluginError):
    """The server's answer broke the protocol (malformed, wrong case, wrong fds or sizes)."""

    def __init__(self, message: str, request: str = "") -> None:
        super().__init__(_errno.EPROTO, message, request)


class ConnectionClosedError(PluginError):
    """The server hung up this connection or VCPU channel (normally: the VM shut down)."""

    def __init__(
        self, message: str = "the server closed the connection", request: str = ""
    ) -> None:
        super().__init__(_errno.EPIPE, message, request)


class VcpuStateError(PluginError):
    """A VCPU call was made in a state where the protocol forbids it (e.g. a get while it runs).

    Raised locally, before anything is sent, so the channel stays usable.
    """

    def __init__(self, message: str, request: str = "") -> None:
        super().__init__(_errno.EINVAL, message, request)
