"""Whether the kernel can execute the plugin file at all, checked before anything starts it.

A file marked executable that is neither a native program nor a script with a ``#!`` line
makes `execve` fail with ENOEXEC. Unsandboxed, that is what vmsuper reports. Sandboxed, the
plugin is started by a shell inside bwrap, and a shell that meets ENOEXEC runs the file as a
shell script instead: the user saw a syntax error and exit status 2, which reads as "bad
config". So both modes check first, and both report what `execve` would.

Formats the kernel learns at run time (binfmt_misc) are not recognised here: such a plugin
needs a ``#!`` wrapper script.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from vmsuper.supervisor.plugin_process import PluginStartError

__all__ = ["check_exec_format"]

ELF_MAGIC = b"\x7fELF"
SHEBANG = b"#!"


def check_exec_format(path: Path) -> None:
    """Raise `PluginStartError` (with execve's own words) for a file that is neither ELF nor
    a ``#!`` script; a file that cannot be read is left to the start itself to report."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(ELF_MAGIC))
    except OSError:
        return
    if head.startswith((ELF_MAGIC, SHEBANG)):
        return
    raise PluginStartError(f"cannot start plugin {path}: {os.strerror(errno.ENOEXEC)}")
