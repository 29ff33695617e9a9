"""Who the sandboxed plugin runs as, and how a root supervisor hands the sandbox over to it.

bwrap started by root with --unshare-user maps the plugin's uid 0 to host uid 0: the kernel
then treats it as host root wherever it checks the euid rather than capabilities (sysctl
writes, files owned by root in writable mounts, setuid-root programs). So a root supervisor
never starts bwrap as root. The child it forks:

1. stages the bind sources: in a mount namespace of its own it opens each source as root and
   binds it below a fresh tmpfs on `STAGE` (so bwrap, no longer root, can reach sources below
   folders that user may not enter, such as a Python under /root/.pyenv with /root mode 0700;
   files there are still read with the plugin user's own permissions);
2. becomes the plugin user: supplementary groups cleared, real, effective and saved gid and
   uid set, which also empties its capability sets;
3. sets no_new_privs, so no exec (bwrap's or the plugin's) can gain privileges back;

and then executes bwrap, which maps that user to itself in the sandbox's user namespace.
An unprivileged supervisor skips 1 and 2: bwrap runs as the invoking user, as before.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from vmsuper.shared.libc_calls import check
from vmsuper.shared.prctl import PR_SET_NO_NEW_PRIVS, prctl

DEFAULT_USERS = ("vmsuper", "nobody")
# Where the child stages bind sources. bwrap mounts its own root on /tmp and finds the sources
# below its old root, so a tmpfs here hides nothing bwrap uses.
STAGE = "/tmp"
STAGE_FAILED = "vmsuper: cannot stage the sandbox: "

_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)


class UserError(Exception):
    """No usable user to run the plugin as; the message says why."""


class PluginUser(NamedTuple):
    """The host user the sandboxed plugin runs as; `switch`: the supervisor must become it."""

    name: str
    uid: int
    gid: int
    switch: bool

    def label(self) -> str:
        return f"uid {self.uid} ({self.name})"


def plugin_user(configured: str | None) -> PluginUser:
    """The user for `[plugin] user` (None: the first of `DEFAULT_USERS` this host has).

    Only a root supervisor can switch users; an unprivileged one runs the plugin as itself,
    and refuses a configured user other than itself rather than ignoring the config.
    """
    return host_user(configured, key="[plugin] user", defaults=DEFAULT_USERS, who="the plugin")


def host_user(configured: str | None, *, key: str, defaults: Sequence[str], who: str) -> PluginUser:
    """The unprivileged host user config `key` names (None: the first of `defaults` this host
    has) for `who` ("the plugin", "the VCPU workers") to run as; see `plugin_user`."""
    if os.geteuid() != 0:
        me = _entry(os.getuid())
        if configured is not None and configured != me.pw_name:
            raise UserError(
                f"{key} = {configured!r} needs vmsuper to run as root; "
                f"it runs as {me.pw_name}, and so would {who}"
            )
        return PluginUser(me.pw_name, os.getuid(), os.getgid(), switch=False)
    for name in (configured,) if configured is not None else defaults:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise UserError(f"{key}: {name} has uid or gid 0: {who} would be root")
        return PluginUser(name, entry.pw_uid, entry.pw_gid, switch=True)
    if configured is not None:
        raise UserError(f"{key}: no user {configured!r} in the passwd database")
    raise UserError(
        f"none of the users {', '.join(defaults)} exists to run {who} as: "
        f"create one or name another with {key}"
    )


def _entry(uid: int) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return pwd.struct_passwd((str(uid), "x", uid, os.getgid(), "", "/", ""))


def user_namespace_problem(proc_sys: Path = Path("/proc/sys")) -> str | None:
    """Why this kernel refuses an unprivileged user namespace, or None if it allows one."""
    settings = (
        ("user/max_user_namespaces", "user.max_user_namespaces", "0"),
        ("kernel/unprivileged_userns_clone", "kernel.unprivileged_userns_clone", "0"),
    )
    for path, name, refusing in settings:
        try:
            value = (proc_sys / path).read_text().strip()
        except OSError:
            continue
        if value == refusing:
            return (
                f"the kernel refuses unprivileged user namespaces ({name} = {value}); the "
                "sandbox runs the plugin as an unprivileged user in a user namespace of its "
                "own: allow them (sysctl), or set [plugin] sandbox = false to run it unconfined"
            )
    return None


def stage_path(index: int) -> str:
    """Where the child stages the `index`th bind source, for bwrap to bind from."""
    return f"{STAGE}/{index}"


def enter(user: PluginUser, sources: Sequence[str], hidden: Sequence[str]) -> None:
    """In the forked child, before executing bwrap: cover `hidden` folders with an empty
    read-only tmpfs and stage `sources` (whose binds then carry those covers along), become
    `user`, set no_new_privs. On failure, writes the cause to stderr and ends the child, so
    the parent reads it where it reads bwrap's own complaints."""
    try:
        if user.switch:
            _stage(sources, hidden)
            os.setgroups([])
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
        check(prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
    except OSError as exc:
        cause = exc.strerror or str(exc)
        if exc.filename is not None:
            cause = f"{exc.filename}: {cause}"
        os.write(2, f"{STAGE_FAILED}{cause}\n".encode())
        os._exit(126)


def _stage(sources: Sequence[str], hidden: Sequence[str]) -> None:
    check(_libc.unshare(_CLONE_NEWNS), "unshare the mount namespace")
    check(_libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    for folder in hidden:
        if os.path.isdir(folder):
            check(
                _libc.mount(b"tmpfs", folder.encode(), b"tmpfs", flags | _MS_RDONLY, b"mode=0755"),
                folder,
            )
    # Opened before the tmpfs covers STAGE, so sources below it stay reachable.
    fds = []
    for source in sources:
        fd = os.open(source, os.O_PATH | os.O_CLOEXEC)
        fds.append(fd)
        opened = os.readlink(f"/proc/self/fd/{fd}")
        if opened != source:  # a symlink put on the way since the parent resolved it
            raise OSError(0, f"{source} now leads to {opened}")
    check(_libc.mount(b"tmpfs", STAGE.encode(), b"tmpfs", flags, b"mode=0755"), "mount " + STAGE)
    for index, fd in enumerate(fds):
        target = stage_path(index)
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.mkdir(target)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        origin = f"/proc/self/fd/{fd}".encode()
        check(_libc.mount(origin, target.encode(), None, _MS_BIND | _MS_REC, None), sources[index])
        os.close(fd)
