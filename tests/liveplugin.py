"""A VM that keeps running until told to stop, steered through a FIFO: for tests that look at
a run while it goes on (`vmsuper stats`, `vmsuper top`).

The guest writes port 0x10 in a loop; the plugin reserves that port, so every write is an exit
forwarded to the plugin and resumed. Commands, one per line on the FIFO:

- ``hold``: answer the next exit only after ``release`` (the VCPU waits on the plugin);
- ``pause``: pause VCPU 0; its User event is answered only after ``release``;
- ``release``: let the held exit or the pause go;
- ``quit``: shut the VM down.

The plugin says what it did by creating files in the marks folder (``holding``, ``paused``),
so a test waits for the event itself, with a deadline.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen

from vmsuper.testing import VmRunner, VmSpec, write_python_plugin

SOURCE = r"""
import os, sys, threading
from pathlib import Path
from vmsuper.plugin import Connection, Init, Io, Space, User
from vmsuper.shared import kvm
from vmsuper.shared.asm import assemble

LOAD = 0x1000
PORT = 0x10
control, marks = sys.argv[1], Path(sys.argv[2])
hold = threading.Event()
release = threading.Event()


def mark(name):
    (marks / (name + ".tmp")).write_text("")
    os.rename(marks / (name + ".tmp"), marks / name)


def held(name):
    mark(name)
    if not release.wait(120):
        os._exit(3)
    release.clear()
    os.unlink(marks / name)


def serve(vcpu):
    while True:
        event = vcpu.wait()
        if isinstance(event, Init):
            sregs = vcpu.get_sregs()
            for segment in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
                segment.base = 0
                segment.selector = 0
            vcpu.set_sregs(sregs)
            vcpu.set_regs(kvm.kvm_regs(rip=LOAD, rsp=0x8000, rflags=0x2))
        elif isinstance(event, Io) and hold.is_set():
            hold.clear()
            held("holding")
        elif isinstance(event, User):
            held("paused")
        vcpu.resume()


guest = assemble("mov $0x10, %dx\nloop:\nout %al, %dx\njmp loop\n", origin=LOAD)
conn = Connection.from_env()
memory = conn.create_memory(0, 0x10000)
memory.mmap[LOAD : LOAD + len(guest)] = guest
conn.reserve_range(Space.IOPORT, PORT, 1)
(vcpu,) = conn.get_vcpus()
conn.start()
threading.Thread(target=serve, args=(vcpu,), daemon=True).start()
mark("started")
with open(control) as commands:
    for line in commands:
        command = line.strip()
        if command == "hold":
            hold.set()
        elif command == "pause":
            conn.pause_vcpus(1, 7)
        elif command == "release":
            release.set()
        elif command == "quit":
            break
os._exit(0)
"""

DEADLINE = 30.0


def wait_for(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Poll `predicate` until true; fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class LiveVm:
    """One running VM of the plugin above; `close()` stops it and checks it ended cleanly."""

    def __init__(self, folder: Path, spec: VmSpec | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.marks = folder / "marks"
        self.marks.mkdir()
        self.fifo = folder / "control"
        os.mkfifo(self.fifo)
        plugin = write_python_plugin(folder, SOURCE, name="live_plugin.py")
        spec = dataclasses.replace(
            spec or VmSpec(sandbox=False), args=[str(self.fifo), str(self.marks)]
        )
        self.proc: Popen[str]
        self.proc, self.config, self.log_dir = VmRunner(folder / "runs").start(plugin, spec)
        wait_for(lambda: (self.marks / "started").exists(), "the plugin to start the VM")
        self._fd = -1
        wait_for(self._open_control, "the plugin to open its control FIFO")
        os.set_blocking(self._fd, True)
        self._control = os.fdopen(self._fd, "w")

    def _open_control(self) -> bool:
        try:
            self._fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:  # ENXIO: no reader yet
            if exc.errno != errno.ENXIO or self.proc.poll() is not None:
                raise
            return False
        return True

    def send(self, command: str) -> None:
        self._control.write(command + "\n")
        self._control.flush()

    def wait_mark(self, name: str) -> None:
        wait_for(lambda: (self.marks / name).exists(), f"the plugin's {name!r} mark")

    def close(self) -> str:
        """Stop the VM; returns vmsuper's stderr."""
        try:
            self.send("release")
            self.send("quit")
            self._control.close()
        except BrokenPipeError:
            pass
        try:
            _, err = self.proc.communicate(timeout=DEADLINE)
        except BaseException:
            self.proc.kill()
            self.proc.communicate()
            raise
        return err
