"""The plugin's sandbox: a bubblewrap (bwrap) command line built from the config.

The plugin is untrusted; crosvm ran it jailed by default and so does vmsuper. bwrap gives it
new user, pid, mount, ipc, uts, network and (where the kernel allows) cgroup namespaces, no
capabilities, a new session (no controlling terminal), and a root that holds only:

- read-only: /usr and the /bin, /sbin, /lib* entries (as the symlinks they are on merged-/usr
  systems), a few files of /etc the C library and interpreters read (`ETC_FILES`);
- the root itself is a read-only tmpfs;
- a private /dev (bwrap's: null, zero, full, random, urandom, tty, a private devpts and an
  empty /dev/shm; no /dev/kvm, no /dev/net/tun), a /proc of its own pid namespace (its
  /proc/sys, sysrq-trigger, irq and bus read-only), and an empty private /tmp;
- read-only: the plugin's folder, and for a script its interpreter (the #! line, through
  ``/usr/bin/env NAME`` and symlinks) with the installation prefix it lives in; for Python,
  also the base installation a venv points to, the folders its .pth files and editable
  installs name, and PYTHONPATH; for any plugin, LD_LIBRARY_PATH;
- the config's ``[[plugin.mounts]]``, read-only unless ``writable = true``.

Only the loopback interface exists. The seccomp filter of `seccomp.py` applies to the plugin
and its children. Its fds (the main socket, and whatever later requests hand it) work as
before: namespaces do not affect fds.

The plugin runs as an unprivileged host user (`sandbox_user.py`), never as host root.

A derived folder that would expose too much — the root, a parent of system folders, /tmp,
/etc, /run, /var, /opt, a home folder and the like — is never bound whole: the plugin's file
or interpreter is then bound alone, and a search path or .pth entry is refused with an error
saying to use [[plugin.mounts]]. The log root (every run's log folder) is hidden under an
empty tmpfs when it lies inside a bound folder.
"""

from __future__ import annotations

import ast
import contextlib
import os
import pwd
import select
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from vmsuper.supervisor import sandbox_user, seccomp
from vmsuper.supervisor.config import PluginConfig
from vmsuper.supervisor.plugin_process import PluginStartError
from vmsuper.supervisor.sandbox_user import PluginUser
from vmsuper.supervisor.which import which

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
# Kernel knobs under the sandbox's /proc, read-only (as bwrap makes them only without a user
# namespace). Bound from the host's /proc: their contents do not depend on the pid namespace.
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")
# Never bound whole by a derived bind (nor any folder holding one of them); user mounts may.
BROAD_FOLDERS = (
    "/tmp",
    "/etc",
    "/run",
    "/var",
    "/var/tmp",
    "/var/lib",
    "/var/log",
    "/var/cache",
    "/var/spool",
    "/var/mail",
    "/var/backups",
    "/var/www",
    "/opt",
    "/srv",
    "/mnt",
    "/media",
    "/boot",
    "/home",
    "/root",
    "/lost+found",
    "/snap",
    "/proc",
    "/sys",
    "/dev",
)
# Kernel and runtime trees (sockets, devices): nothing below them is ever a derived bind.
RUNTIME_TREES = ("/proc", "/sys", "/dev", "/run", "/var/run")
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
_REFUSED = "vmsuper: refused: "
# Runs inside the sandbox, as the plugin's user, before the plugin: pairs of a test(1) operator
# (-x, -r, -w) and a path, then "--" and the plugin's argv. It checks each, says on stderr that
# all is well (or which failed, and whether the path is there at all), and becomes the plugin.
_STARTER_SCRIPT = (
    'while [ "$1" != -- ]; do [ "$1" "$2" ] || { '
    # There but refused, or hidden by a folder on its way that is closed to this user.
    'if [ -e "$2" ] || { [ -d "${2%/*}" ] && ! [ -x "${2%/*}" ]; }; then w=denied; '
    "else w=missing; fi; "
    f'printf "{_REFUSED}%s %s %s\\n" "$w" "$1" "$2" >&2; exit 3; }}; shift 2; '
    f"done; shift; printf '{_READY}\\n' >&2; exec \"$@\""
)
_ACCESS = {"-x": "executable", "-r": "readable", "-w": "writable"}


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
    # Scripts among them, which must also be readable.
    scripts: tuple[str, ...] = ()
    # Host folders inside bound ones that the plugin must not see (the log root): each is
    # covered by an empty read-only tmpfs, in the staging namespace or else by bwrap.
    hidden: tuple[str, ...] = ()
    # Who the plugin runs as; None: the invoking user, as for a Sandbox made by hand.
    user: PluginUser | None = None
    # Each bind's source resolved once, when the binds were checked (see `sources`).
    resolved: tuple[str, ...] = ()

    @classmethod
    def for_plugin(
        cls,
        plugin: PluginConfig,
        *,
        environ: Mapping[str, str] | None = None,
        bwrap: str | None = None,
        hidden: Sequence[Path] = (),
    ) -> Sandbox:
        """The sandbox for `plugin`, started with `environ` plus the config's env; `hidden`
        are host folders the plugin must not see even inside a bound folder (the log root)."""
        env = dict(os.environ if environ is None else environ)
        env.update(plugin.env)
        found = bwrap or which("bwrap", path=env.get("PATH"))
        if found is None:
            raise SandboxError(
                "bwrap (bubblewrap) is not installed: install it (Debian: apt-get install "
                "bubblewrap) or set [plugin] sandbox = false to run the plugin unconfined"
            )
        try:
            user = sandbox_user.plugin_user(plugin.user)
        except sandbox_user.UserError as exc:
            raise SandboxError(str(exc)) from None
        problem = sandbox_user.user_namespace_problem()
        if problem is not None:
            raise SandboxError(problem)
        path = str(plugin.path)
        interpreters = script_interpreters(path, env)
        wanted = [_plugin_folder(path)]
        for interpreter in interpreters:
            wanted += interpreter_folders(interpreter)
        pythons = [p for p in (path, *interpreters) if _is_python(p)]
        if pythons:
            wanted += python_folders(pythons, env)
        wanted += _search_path_folders("LD_LIBRARY_PATH", env.get("LD_LIBRARY_PATH", ""))
        user_binds = [Bind(str(m.src), str(m.dst or m.src), m.writable) for m in plugin.mounts]
        binds = _order(wanted, user_binds)
        executables = (path, *interpreters)
        scripts = tuple(p for p in executables if _shebang(p) is not None)
        shown_hidden = _hidden_inside(binds, [str(h) for h in hidden])
        resolved = tuple(os.path.realpath(b.src) for b in binds)
        return cls(found, binds, executables, scripts, shown_hidden, user, resolved)

    @property
    def staged(self) -> bool:
        """Whether the bind sources are staged by the supervisor's child (see sandbox_user)."""
        return self.user is not None and self.user.switch

    def sources(self) -> list[str]:
        """The distinct bind sources, resolved, in the order `stage_path` numbers them.

        Resolved when the binds were checked, not again in the child: the child refuses a
        source that leads elsewhere by then (a symlink put on the way).
        """
        found: list[str] = []
        for real in self._resolved():
            if real not in found:
                found.append(real)
        return found

    def _resolved(self) -> tuple[str, ...]:
        if len(self.resolved) == len(self.binds):
            return self.resolved
        return tuple(os.path.realpath(b.src) for b in self.binds)

    def argv(self, seccomp_fd: int | None, info_fd: int | None = None) -> list[str]:
        """The bwrap command line up to (and including) the "--" before the plugin's path;
        bwrap writes the host pid of its namespace's init to `info_fd` (`--info-fd`) if given."""
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
        args += ["--dev", "/dev", "--proc", "/proc"]
        for path in PROC_READ_ONLY:
            args += ["--ro-bind-try", path, path]
        args += ["--tmpfs", "/tmp"]
        sources = self.sources()
        mounts: list[tuple[str, list[str]]] = []
        for bind, real in zip(self.binds, self._resolved(), strict=True):
            src = bind.src
            if self.staged:
                src = sandbox_user.stage_path(sources.index(real))
            mounts.append((bind.dst, Bind(src, bind.dst, bind.writable).args()))
        # Staged, the hidden folders are covered before the sources are bound (by root, who
        # may enter them); else bwrap covers them where they appear inside.
        masks = [] if self.staged else self.masks()
        mounts += [(mask, ["--tmpfs", mask]) for mask in masks]
        # Parents first, so that a nested mount is not hidden by its parent's (stable: a mask
        # comes after a bind of the same depth).
        for _, mount_args in sorted(mounts, key=lambda m: m[0].rstrip("/").count("/")):
            args += mount_args
        for mask in masks:
            args += ["--remount-ro", mask]
        args += ["--remount-ro", "/"]  # the root tmpfs; /tmp, /dev and writable binds stay
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        if info_fd is not None:
            args += ["--info-fd", str(info_fd)]
        return [*args, "--"]

    def enter(self) -> None:
        """Runs in the forked child before it executes bwrap: stages the bind sources and
        becomes the plugin's user if the supervisor is root, and sets no_new_privs."""
        user = self.user or PluginUser("", os.getuid(), os.getgid(), switch=False)
        if self.staged:
            sandbox_user.enter(user, self.sources(), self.hidden)
        else:
            sandbox_user.enter(user, (), ())

    def masks(self) -> list[str]:
        """Where the hidden folders appear inside the sandbox, through the binds."""
        found: list[str] = []
        for folder in self.hidden:
            for bind in self.binds:
                src = os.path.realpath(bind.src)
                if _inside(folder, src):
                    mask = os.path.normpath(os.path.join(bind.dst, os.path.relpath(folder, src)))
                    if mask not in found:
                        found.append(mask)
        return found

    @contextlib.contextmanager
    def launch(self, info_fd: int | None = None) -> Iterator[tuple[list[str], int]]:
        """Yield (command prefix, fd the child must inherit) with the seccomp program loaded;
        `info_fd` as in `argv` (the child must inherit it too).

        The fd is a memfd holding the filter; bwrap reads and closes its copy, and the
        caller's copy is closed on leaving the block.
        """
        fd = os.memfd_create("vmsuper-seccomp", os.MFD_CLOEXEC)
        try:
            os.write(fd, seccomp.build_filter())
            os.lseek(fd, 0, os.SEEK_SET)
            yield self.argv(fd, info_fd), fd
        finally:
            os.close(fd)

    def starter(self) -> list[str]:
        """The command that runs first inside the sandbox, to put before the plugin's argv.

        A shell, already the plugin's user, checks that the plugin and its interpreters are
        there to execute (scripts to read too) and that writable mounts are writable, writes a
        line to stderr saying so (or naming what failed), and executes the plugin in its own
        place: same pid, argv and environment. `wait_started` reads that line, so a sandbox
        that cannot be set up is an error naming the cause before the plugin runs, rather than
        a plugin that seems to exit with status 1 and a line from bwrap.
        """
        checks: list[str] = []
        for path in self.executables:
            checks += ["-x", path]
        for path in self.scripts:
            checks += ["-r", path]
        for bind in self.binds:
            if bind.writable:
                checks += ["-w", bind.dst]
        return [STARTER_SHELL, "-c", _STARTER_SCRIPT, "sh", *checks, "--"]

    def wait_started(
        self, stderr_fd: int, reap: Callable[[], int], *, timeout: float = START_TIMEOUT
    ) -> None:
        """Wait until the `starter` in a launched sandbox is about to execute the plugin.

        `stderr_fd` is the sandbox's stderr (a pipe); only the starter's line is taken from it,
        so everything the plugin writes stays for the caller. `reap` waits for the sandbox once
        it has ended and returns its exit code. Raises `SandboxError` saying why the sandbox did
        not start: bwrap's own complaint (namespaces the kernel refuses, a bind source that
        vanished, a mount point that cannot be made), a source that could not be staged, an
        executable not visible or not allowed inside, or `timeout` seconds without an answer.
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
                raise self._start_failure(seen, reap())
            seen += chunk
        if len(seen) > len(ready):
            # Anything bwrap said before the sandbox started: passed on, as the plugin's would be.
            with contextlib.suppress(OSError):
                os.write(2, seen[: -len(ready)])

    def check(self) -> None:
        """Start the sandbox once with only the `starter` in it; raises `SandboxError` as
        `wait_started` does."""
        import subprocess  # only here: a run's spawn is plugin_process's

        with self.launch() as (prefix, fd):
            try:
                proc = subprocess.Popen(
                    [*prefix, *self.starter()],
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    preexec_fn=self.enter,
                )
            except OSError as exc:
                raise SandboxError(f"cannot run {self.bwrap}: {exc.strerror}") from exc
        assert proc.stderr is not None
        with proc, contextlib.ExitStack() as stack:
            stack.callback(proc.kill)  # a no-op once it has ended
            self.wait_started(proc.stderr.fileno(), proc.wait)
            proc.wait()

    def _who(self) -> str:
        if self.user is not None:
            return self.user.label()
        try:
            return f"uid {os.getuid()} ({pwd.getpwuid(os.getuid()).pw_name})"
        except KeyError:
            return f"uid {os.getuid()}"

    def _start_failure(self, output: bytes, status: int) -> SandboxError:
        text = output.decode("utf-8", "replace")
        _, staged, cause = text.partition(sandbox_user.STAGE_FAILED)
        if staged:
            return SandboxError(f"cannot show the binds: {cause.strip()}")
        _, refused, what = text.partition(_REFUSED)
        if refused:
            verdict, test, path = what.removesuffix("\n").split(" ", 2)
            access = _ACCESS.get(test, test)
            if verdict == "missing":
                return SandboxError(
                    f"{path} is not {access} inside the sandbox; bind its folder with "
                    "[[plugin.mounts]]"
                )
            advice = (
                "give that user write access to the mount's source"
                if test == "-w"
                else f"make it, and the folders on its way, {access} for that user"
            )
            return SandboxError(
                f"{path} is not {access} by the plugin's user, {self._who()}: {advice}, "
                "or name another user with [plugin] user"
            )
        said = text.strip() or f"status {status}"
        return SandboxError(f"bwrap cannot set up the sandbox: {said}")


def _partial_match(data: bytes, marker: bytes) -> int:
    """The length of the longest start of `marker` that `data` ends with."""
    for size in range(min(len(data), len(marker) - 1), 0, -1):
        if data.endswith(marker[:size]):
            return size
    return 0


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
            resolved = None if command is None else which(command, path=env.get("PATH"))
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


class Wanted(NamedTuple):
    """A folder the plugin needs, why (for an error), and the file to bind alone instead
    should the folder be too broad to show (None: refuse)."""

    folder: str
    what: str
    fallback: str | None = None


def interpreter_folders(interpreter: str) -> list[Wanted]:
    """The installation of `interpreter` and of every symlink it goes through."""
    return [
        Wanted(_prefix(hop), f"the installation of {hop}", fallback=hop)
        for hop in _symlink_chain(interpreter)
    ]


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


def python_folders(interpreters: Sequence[str], env: Mapping[str, str]) -> list[Wanted]:
    """What a Python interpreter imports from outside its own prefix."""
    wanted: list[Wanted] = []
    prefixes: list[str] = []
    for interpreter in interpreters:
        wanted += interpreter_folders(interpreter)
        prefixes += [_prefix(hop) for hop in _symlink_chain(interpreter)]
    for prefix in list(prefixes):
        home = _venv_home(prefix)
        if home is not None:
            prefixes.append(_prefix(os.path.join(home, "python")))
            what = f"the base installation of the venv {prefix}, from its pyvenv.cfg"
            wanted.append(Wanted(prefixes[-1], what))
    for prefix in prefixes:
        for site in sorted(Path(prefix).glob("lib/python3*/site-packages")):
            what = f"from a .pth file or editable install in {site}"
            wanted += [Wanted(p, what) for p in site_folders(site)]
    wanted += _search_path_folders("PYTHONPATH", env.get("PYTHONPATH", ""))
    return wanted


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
        folders += finder_mapping(finder).values()
    return [f for f in folders if os.path.isdir(f) and not _inside(f, str(site))]


def finder_mapping(finder: Path) -> dict[str, str]:
    """The folders an editable install's finder maps packages to (its MAPPING literal, as
    setuptools writes it); empty when there is none to read."""
    try:
        tree = ast.parse(finder.read_text())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return {}
    for node in tree.body:
        target = getattr(node, "target", None) or next(iter(getattr(node, "targets", [])), None)
        if isinstance(target, ast.Name) and target.id == "MAPPING":
            value = getattr(node, "value", None)
            with contextlib.suppress(ValueError):
                mapping = ast.literal_eval(value) if value is not None else None
                if isinstance(mapping, dict):
                    pairs = mapping.items()
                    return {k: v for k, v in pairs if isinstance(k, str) and isinstance(v, str)}
    return {}


def _search_path_folders(variable: str, value: str) -> list[Wanted]:
    what = f"from {variable}"
    return [Wanted(p, what) for p in value.split(":") if p and os.path.isdir(p)]


def _plugin_folder(path: str) -> Wanted:
    return Wanted(os.path.dirname(path), "the plugin's folder", fallback=path)


def too_broad(folder: str) -> bool:
    """Whether showing `folder` whole would show the host's system, runtime or home folders:
    it is one of `BROAD_FOLDERS` or a home folder, holds one, or lies in a runtime tree. Both
    the path as written and where its symlinks lead are checked."""
    broad = {*BROAD_FOLDERS, *SYSTEM_DIRS, *SYSTEM_LINKS, *_home_folders()}
    for path in {os.path.normpath(folder), os.path.realpath(folder)}:
        if any(_inside(b, path) for b in broad) or any(_inside(path, t) for t in RUNTIME_TREES):
            return True
        if os.path.dirname(path) == "/home":  # a home folder, in the passwd database or not
            return True
    return False


def _home_folders() -> set[str]:
    homes = {os.path.expanduser("~"), os.environ.get("HOME", "/root")}
    with contextlib.suppress(OSError):
        homes.update(entry.pw_dir for entry in pwd.getpwall())
    return {os.path.normpath(h) for h in homes if h.startswith("/") and h != "/"}


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _order(wanted: Sequence[Wanted], user: Sequence[Bind]) -> tuple[Bind, ...]:
    """The derived (identity, read-only) binds that add something, then the user's, sorted
    parents first so that a nested bind is not hidden by its parent's. A wanted folder that
    is too broad is replaced by its fallback file, or refused."""
    covering = [b.dst for b in user if b.src == b.dst]

    def shown(path: str) -> bool:
        real = os.path.realpath(path)
        if any(_inside(real, d) for d in (*SYSTEM_DIRS, *SYSTEM_LINKS)):
            return True  # the system binds show it already
        return any(_inside(path, c) for c in covering)  # the user's mount shows it, as asked

    derived: list[str] = []
    for want in wanted:
        path = os.path.normpath(want.folder)
        if shown(path):
            continue
        if too_broad(path):
            if want.fallback is None:
                raise SandboxError(
                    f"{want.folder} ({want.what}) is too broad to show the plugin whole: it is "
                    "or holds a system, runtime or home folder; narrow it, or show what the "
                    "plugin needs with [[plugin.mounts]]"
                )
            path = os.path.normpath(want.fallback)
            if shown(path):
                continue
        derived.append(path)
    kept: list[Bind] = []
    for path in derived:
        if any(o != path and _inside(path, o) for o in derived):
            continue  # a broader derived bind shows it
        if Bind(path, path) not in kept:
            kept.append(Bind(path, path))
    binds = [*kept, *user]
    return tuple(sorted(binds, key=lambda b: b.dst.rstrip("/").count("/")))


def _hidden_inside(binds: Sequence[Bind], hidden: Sequence[str]) -> tuple[str, ...]:
    """The `hidden` host folders (resolved) that some bind would show; a bind whose source
    lies in a hidden folder is refused."""
    found: list[str] = []
    for folder in hidden:
        real = os.path.realpath(folder)
        for bind in binds:
            src = os.path.realpath(bind.src)
            if _inside(src, real):
                raise SandboxError(
                    f"{bind.src} lies in {folder}, where every run's log folder is made, "
                    "which the plugin must not see: move it, or the logs ([log] dir)"
                )
            if _inside(real, src) and real not in found:
                found.append(real)
    return tuple(found)
