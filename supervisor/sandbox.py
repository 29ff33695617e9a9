"""The plugin's sandbox: a bubblewrap (bwrap) command line built from the config.

The plugin is untrusted; crosvm ran it jailed by default and so does vmsuper. bwrap gives it
new user, pid, mount, ipc, uts, network and (where the kernel allows) cgroup namespaces, no
capabilities, a new session (no controlling terminal), and a root that holds only:

- read-only: /usr and the /bin, /sbin, /lib* entries (as the symlinks they are on merged-/usr
  systems), a few files of /etc the C library and interpreters read (`ETC_FILES`);
- the root itself is a read-only tmpfs;
- a private /dev (bwrap's: null, zero, full, random, urandom, tty, a private devpts and an
  empty /dev/shm; no /dev/kvm, no /dev/net/tun), a /proc of its own pid namespace, and an
  empty private /tmp;
- read-only: the plugin's folder, and for a script its interpreter (the #! line, through
  ``/usr/bin/env NAME`` and symlinks) with the installation prefix it lives in; for Python,
  also the base installation a venv points to, the folders its .pth files and editable
  installs name, and PYTHONPATH; for any plugin, LD_LIBRARY_PATH;
- the config's ``[[plugin.mounts]]``, read-only unless ``writable = true``.

Only the loopback interface exists. The seccomp filter of `seccomp.py` applies to the plugin
and its children. Its fds (the main socket, and whatever later requests hand it) work as
before: namespaces do not affect fds.

A folder that would expose too much — the root or a home folder — is never bound whole: the
file in question is bound alone instead.
"""

from __future__ import annotations

import ast
import contextlib
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from vmsuper.supervisor import seccomp
from vmsuper.supervisor.config import PluginConfig
from vmsuper.supervisor.plugin_process import PluginStartError

SYSTEM_DIRS = ("/usr",)
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/localtime",
)
NAMESPACES = (
    "--unshare-user",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-net",
    "--unshare-cgroup-try",
)
MAX_SCRIPT_DEPTH = 4  # as the kernel: an interpreter may itself be a script, a few times over
START_TIMEOUT = 10.0
STARTER_SHELL = "/bin/sh"
_READY = "vmsuper: sandbox ready"
_MISSING = "vmsuper: not executable: "
# Runs inside the sandbox before the plugin: "$1" executables to check, then the plugin's argv.
# It checks them, says on stderr that all is well (or which is missing), and becomes the plugin.
_STARTER_SCRIPT = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do '
    f'[ -x "$1" ] || {{ printf "{_MISSING}%s\\n" "$1" >&2; exit 3; }}; n=$((n - 1)); shift; '
    f"done; printf '{_READY}\\n' >&2; exec \"$@\""
)


class SandboxError(PluginStartError):
    """The sandbox cannot be set up; the message says why and what to change."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot sandbox the plugin: {reason}")
        self.reason = reason


# Records here are NamedTuples rather than frozen dataclasses: creating a dataclass runs
# generated code through exec, about 0.4 ms each on every start of vmsuper.


class Bind(NamedTuple):
    """A host path made visible inside the sandbox at `dst`."""

    src: str
    dst: str
    writable: bool = False

    def args(self) -> list[str]:
        return ["--bind" if self.writable else "--ro-bind", self.src, self.dst]


class Sandbox(NamedTuple):
    """Everything needed to start the plugin in its sandbox."""

    bwrap: str
    binds: tuple[Bind, ...]
    # Paths that must be executable inside (the plugin and its interpreters), checked first.
    executables: tuple[str, ...]

    @classmethod
    def for_plugin(
        cls,
        plugin: PluginConfig,
        *,
        environ: Mapping[str, str] | None = None,
        bwrap: str | None = None,
    ) -> Sandbox:
        """The sandbox for `plugin`, started with `environ` plus the config's env."""
        env = dict(os.environ if environ is None else environ)
        env.update(plugin.env)
        found = bwrap or shutil.which("bwrap", path=env.get("PATH"))
        if found is None:
            raise SandboxError(
                "bwrap (bubblewrap) is not installed: install it (Debian: apt-get install "
                "bubblewrap) or set [plugin] sandbox = false to run the plugin unconfined"
            )
        path = str(plugin.path)
        interpreters = script_interpreters(path, env)
        binds = [_plugin_bind(path)]
        for interpreter in interpreters:
            binds += interpreter_binds(interpreter)
        pythons = [p for p in (path, *interpreters) if _is_python(p)]
        if pythons:
            binds += python_binds(pythons, env)
        binds += _search_path_binds(env.get("LD_LIBRARY_PATH", ""))
        user = [Bind(str(m.src), str(m.dst or m.src), m.writable) for m in plugin.mounts]
        return cls(found, _order(binds, user), (path, *interpreters))

    def argv(self, seccomp_fd: int | None) -> list[str]:
        """The bwrap command line up to (and including) the "--" before the plugin's path."""
        args = [self.bwrap, *NAMESPACES, "--die-with-parent", "--new-session"]
        args += ["--cap-drop", "ALL"]
        for path in SYSTEM_DIRS:
            if os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in SYSTEM_LINKS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in ETC_FILES:
            args += ["--ro-bind-try", path, path]
        args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        for bind in self.binds:
            args += bind.args()
        args += ["--remount-ro", "/"]  # the root tmpfs; /tmp, /dev and writable binds stay
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        return [*args, "--"]

    @contextlib.contextmanager
    def launch(self) -> Iterator[tuple[list[str], int]]:
        """Yield (command prefix, fd the child must inherit) with the seccomp program loaded.

        The fd is a memfd holding the filter; bwrap reads and closes its copy, and the
        caller's copy is closed on leaving the block.
        """
        fd = os.memfd_create("vmsuper-seccomp", os.MFD_CLOEXEC)
        try:
            os.write(fd, seccomp.build_filter())
            os.lseek(fd, 0, os.SEEK_SET)
            yield self.argv(fd), fd
        finally:
            os.close(fd)

    def starter(self) -> list[str]:
        """The command that runs first inside the sandbox, to put before the plugin's argv.

        A shell checks that the plugin and its interpreters are there to execute, writes a line
        to stderr saying so (or naming what is missing), and executes the plugin in its own
        place: same pid, argv and environment. `wait_started` reads that line, so a sandbox
        that cannot be set up is an error naming the cause before the plugin runs, rather than
        a plugin that seems to exit with status 1 and a line from bwrap.
        """
        return [
            STARTER_SHELL,
            "-c",
            _STARTER_SCRIPT,
            "sh",
            str(len(self.executables)),
            *self.executables,
        ]

    def wait_started(
        self, stderr_fd: int, reap: Callable[[], int], *, timeout: float = START_TIMEOUT
    ) -> None:
        """Wait until the `starter` in a launched sandbox is about to execute the plugin.

        `stderr_fd` is the sandbox's stderr (a pipe); only the starter's line is taken from it,
        so everything the plugin writes stays for the caller. `reap` waits for the sandbox once
        it has ended and returns its exit code. Raises `SandboxError` saying why the sandbox did
        not start: bwrap's own complaint (namespaces the kernel refuses, a bind source that
        vanished, a mount point that cannot be made), an executable not visible inside, or
        `timeout` seconds without an answer.
        """
        ready = (_READY + "\n").encode()
        deadline = time.monotonic() + timeout
        seen = b""
        while not seen.endswith(ready):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([stderr_fd], [], [], remaining)[0]:
                raise SandboxError(f"bwrap did not start in {timeout:g} s")
            try:
                # Never past the end of the line: what follows it is the plugin's.
                chunk = os.read(stderr_fd, len(ready) - _partial_match(seen, ready))
            except BlockingIOError:
                continue
            if not chunk:
                raise _start_failure(seen, reap())
            seen += chunk
        if len(seen) > len(ready):
            # Anything bwrap said before the sandbox started: passed on, as the plugin's would be.
            with contextlib.suppress(OSError):
                os.write(2, seen[: -len(ready)])

    def check(self) -> None:
        """Start the sandbox once with only the `starter` in it; raises `SandboxError` as
        `wait_started` does."""
        with self.launch() as (prefix, fd):
            try:
                proc = subprocess.Popen(
                    [*prefix, *self.starter()],
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            except OSError as exc:
                raise SandboxError(f"cannot run {self.bwrap}: {exc.strerror}") from exc
        assert proc.stderr is not None
        with proc, contextlib.ExitStack() as stack:
            stack.callback(proc.kill)  # a no-op once it has ended
            self.wait_started(proc.stderr.fileno(), proc.wait)
            proc.wait()


def _partial_match(data: bytes, marker: bytes) -> int:
    """The length of the longest start of `marker` that `data` ends with."""
    for size in range(min(len(data), len(marker) - 1), 0, -1):
        if data.endswith(marker[:size]):
            return size
    return 0


def _start_failure(output: bytes, status: int) -> SandboxError:
    text = output.decode("utf-8", "replace")
    _, found, missing = text.partition(_MISSING)
    if found:
        path = missing.removesuffix("\n")
        return SandboxError(
            f"{path} is not executable inside the sandbox; bind its folder with [[plugin.mounts]]"
        )
    said = text.strip() or f"status {status}"
    return SandboxError(f"bwrap cannot set up the sandbox: {said}")


# -- what the plugin needs -----------------------------------------------------------------------


def script_interpreters(path: str, env: Mapping[str, str]) -> list[str]:
    """The interpreters that run `path`, outermost first: its #! line, resolved like exec."""
    found: list[str] = []
    current = path
    for _ in range(MAX_SCRIPT_DEPTH):
        line = _shebang(current)
        if line is None:
            break
        words = line.split(None, 1)
        if not words:
            break
        interpreter = words[0]
        found.append(interpreter)
        if os.path.basename(interpreter) == "env" and len(words) > 1:
            command = _env_command(words[1])
            resolved = None if command is None else shutil.which(command, path=env.get("PATH"))
            if resolved is not None:
                found.append(os.path.abspath(resolved))
                interpreter = found[-1]
        current = interpreter
    return found


def _shebang(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    return head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def _env_command(rest: str) -> str | None:
    """The command of ``#!/usr/bin/env [-S] [-options] [NAME=value...] command args``."""
    for word in rest.split():
        if word.startswith("-") or "=" in word:
            continue
        return word
    return None


def interpreter_binds(interpreter: str) -> list[Bind]:
    """The installation of `interpreter` and of every symlink it goes through."""
    binds = []
    for hop in _symlink_chain(interpreter):
        binds.append(_identity(_prefix(hop), fallback=hop))
    return binds


def _symlink_chain(path: str) -> list[str]:
    chain = [os.path.abspath(path)]
    for _ in range(40):  # the kernel's own limit on symlinks followed
        if not os.path.islink(chain[-1]):
            break
        target = os.readlink(chain[-1])
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), target)))
    return chain


def _prefix(path: str) -> str:
    """/opt/python/bin/python3 -> /opt/python; /opt/tool/run -> /opt/tool."""
    folder = os.path.dirname(path)
    if os.path.basename(folder) in ("bin", "sbin"):
        return os.path.dirname(folder)
    return folder


def _is_python(path: str) -> bool:
    return any(os.path.basename(hop).startswith("python") for hop in _symlink_chain(path))


def python_binds(interpreters: Sequence[str], env: Mapping[str, str]) -> list[Bind]:
    """What a Python interpreter imports from outside its own prefix."""
    binds: list[Bind] = []
    prefixes: list[str] = []
    for interpreter in interpreters:
        binds += interpreter_binds(interpreter)
        prefixes += [_prefix(hop) for hop in _symlink_chain(interpreter)]
    for prefix in list(prefixes):
        home = _venv_home(prefix)
        if home is not None:
            prefixes.append(_prefix(os.path.join(home, "python")))
            binds.append(_identity(prefixes[-1], fallback=home))
    for prefix in prefixes:
        for site in sorted(Path(prefix).glob("lib/python3*/site-packages")):
            binds += [_identity(p, fallback=p) for p in site_folders(site)]
    binds += _search_path_binds(env.get("PYTHONPATH", ""))
    return binds


def _venv_home(prefix: str) -> str | None:
    try:
        text = Path(prefix, "pyvenv.cfg").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "home":
            return value.strip()
    return None


def site_folders(site: Path) -> list[str]:
    """Folders outside `site` that its .pth files and editable-install finders point to."""
    folders: list[str] = []
    for pth in sorted(site.glob("*.pth")):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for line in pth.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith(("#", "import ", "import\t")):
                    folders.append(os.path.normpath(os.path.join(site, line)))
    for finder in sorted(site.glob("__editable__*finder.py")):
        folders += _finder_mapping(finder)
    return [f for f in folders if os.path.isdir(f) and not _inside(f, str(site))]


def _finder_mapping(finder: Path) -> list[str]:
    """The folders setuptools' editable finder maps packages to (its MAPPING literal)."""
    try:
        tree = ast.parse(finder.read_text())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    for node in tree.body:
        target = getattr(node, "target", None) or next(iter(getattr(node, "targets", [])), None)
        if isinstance(target, ast.Name) and target.id == "MAPPING":
            value = getattr(node, "value", None)
            with contextlib.suppress(ValueError):
                mapping = ast.literal_eval(value) if value is not None else None
                if isinstance(mapping, dict):
                    return [v for v in mapping.values() if isinstance(v, str)]
    return []


def _search_path_binds(value: str) -> list[Bind]:
    return [_identity(p, fallback=p) for p in value.split(":") if p and os.path.isdir(p)]


def _plugin_bind(path: str) -> Bind:
    return _identity(os.path.dirname(path), fallback=path)


def _identity(folder: str, *, fallback: str) -> Bind:
    """`folder` bound at itself, unless it is too broad: then `fallback` alone."""
    folder = os.path.normpath(folder)
    chosen = fallback if _too_broad(folder) else folder
    return Bind(chosen, chosen)


def _too_broad(folder: str) -> bool:
    homes = {"/root", "/home", os.path.expanduser("~")}
    return folder == "/" or folder in homes or os.path.dirname(folder) == "/home"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _order(derived: Sequence[Bind], user: Sequence[Bind]) -> tuple[Bind, ...]:
    """The derived (identity, read-only) binds that add something, then the user's, sorted
    parents first so that a nested bind is not hidden by its parent's."""
    covering = [b.dst for b in user if b.src == b.dst]
    kept: list[Bind] = []
    for bind in derived:
        real = os.path.realpath(bind.dst)
        if any(_inside(real, d) for d in (*SYSTEM_DIRS, *SYSTEM_LINKS)):
            continue  # the system binds show it already
        if any(_inside(bind.dst, c) for c in covering):
            continue  # the user's own mount shows it, as the user asked
        if any(o.dst != bind.dst and _inside(bind.dst, o.dst) for o in derived):
            continue  # a broader derived bind shows it
        if bind not in kept:
            kept.append(bind)
    binds = [*kept, *user]
    return tuple(sorted(binds, key=lambda b: b.dst.rstrip("/").count("/")))
