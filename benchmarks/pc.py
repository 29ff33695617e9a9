"""(f) The PC machine beside QEMU: SeaBIOS boots the same disk under `vmsuper-pc` and under
`qemu-system-x86_64 -accel kvm`, in the same run, alternating.

Each boot is timed from the harness's exec of the command to three points of the guest's
serial output (SeaBIOS's banner, "Booting from Hard Disk", the boot sector's own line) and to
the process's exit, whose status the disk's boot sector sets through isa-debug-exit (33).
For vmsuper, the VCPU's exits are counted by device (the plugin's own count) and by reserved
range (vmsuper's), and vmsuper-pc says which share of its run it spent serving exits (from
an exit's arrival to its answer). The disk is the demo disk of `configs/pc.toml`.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from vmsuper.pc.demo_disk import demo_image
from vmsuper.testing import VmSpec

from .context import Bench
from .stats import rounds, summarize
from .vmrun import RunError, vmsuper_command

BIOS: Final = Path("/usr/share/seabios/bios.bin")
QEMU: Final = "qemu-system-x86_64"
MARKS: Final = {
    "banner": b"SeaBIOS (version",
    "booting": b"Booting from Hard Disk",
    "boot_sector": b"Boot sector:",
}
EXPECTED_STATUS: Final = 33
MAX_REPEAT: Final = 5  # a boot takes seconds here, and the two machines differ by a few %
BOOT_TIMEOUT_S: Final = 300.0
_EXITS_LINE = re.compile(r"exits by device: (?P<counts>[^;]*);")
_HANDLING = re.compile(r"handling exits: (?P<ms>[0-9]+) ms of (?P<run_s>[0-9.]+) s")


@dataclass
class Boot:
    status: int
    marks_s: dict[str, float]
    exit_s: float
    stdout: bytes
    stderr: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    handling_pct: float | None = None  # vmsuper-pc: share of its run spent serving exits


def timed_boot(argv: Sequence[str], folder: Path, timeout: float = BOOT_TIMEOUT_S) -> Boot:
    """Run `argv`, stamping when each mark first appears on its stdout, and its exit."""
    stderr_path = folder / "stderr.txt"
    output = b""
    marks: dict[str, float] = {}
    with open(stderr_path, "wb") as stderr:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd=folder
        )
    assert proc.stdout is not None
    deadline = start + timeout
    try:
        fd = proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunError(f"{argv[0]} did not finish in {timeout:.0f} s")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            now = time.monotonic() - start
            if not chunk:
                break
            output += chunk
            for name, text in MARKS.items():
                if name not in marks and text in output:
                    marks[name] = now
        status = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        exit_s = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    stderr_text = stderr_path.read_text(errors="replace")
    if status != EXPECTED_STATUS or marks.keys() != MARKS.keys():
        raise RunError(
            f"{argv[0]} exited with status {status}, saw {sorted(marks)}; output:\n"
            f"{output[-2000:].decode(errors='replace')}\n{stderr_text[-2000:]}"
        )
    return Boot(status, marks, exit_s, output, stderr_text)


def vmsuper_boot(disk: Path, folder: Path) -> Boot:
    pc = Path(vmsuper_command()[0]).with_name("vmsuper-pc")
    spec = VmSpec(
        args=["--bios", str(BIOS), "--disk", str(disk), "--snapshot"],
        sandbox=True,
        mounts=[(disk.parent, None, False)],
    )
    config = folder / "vm.toml"
    config.write_text(spec.to_toml(pc, folder / "logs"))
    boot = timed_boot([*vmsuper_command(), "run", str(config)], folder)
    exits, boot.handling_pct = plugin_summary(boot.stderr)
    boot.extra.update(exits)
    boot.extra.update(_vmsuper_exit_counts(folder / "logs"))
    return boot


def plugin_summary(stderr: str) -> tuple[dict[str, int], float | None]:
    """From vmsuper-pc's last line: exits by device, and the % of its run spent serving them."""
    exits = {}
    found = _EXITS_LINE.search(stderr)
    if found:
        for item in found["counts"].split(","):
            name, _, count = item.strip().rpartition(" ")
            exits[f"exits:{name}"] = int(count)
    handling = _HANDLING.search(stderr)
    share = None
    if handling:
        share = 100 * float(handling["ms"]) / 1000 / float(handling["run_s"])
    return exits, share


def _vmsuper_exit_counts(logs: Path) -> dict[str, int]:
    """vmsuper's own counters of the VCPU's exits: by kind (async writes, unreserved...)."""
    counts: dict[str, int] = {}
    path = logs / "vcpu-0.jsonl"
    if not path.exists():
        return counts
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "vcpu_exit_counts":
            for kind, count in record.get("exits", {}).items():
                if count:
                    counts[f"kind:{kind}"] = count
    return counts


def qemu_boot(disk: Path, folder: Path) -> Boot:
    copy = folder / "disk.img"
    shutil.copyfile(disk, copy)
    argv = [
        QEMU,
        "-accel",
        "kvm",
        "-m",
        "128",
        "-nographic",
        "-no-reboot",
        "-drive",
        f"file={copy},format=raw,if=ide",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-display",
        "none",
        "-net",
        "none",
    ]
    return timed_boot(argv, folder)


def pc(bench: Bench) -> list[dict[str, Any]]:
    if shutil.which(QEMU) is None:
        raise RunError(f"{QEMU} is not installed (./dev bench installs qemu-system-x86)")
    disk = bench.work / "pc-demo.img"
    disk.write_bytes(demo_image())
    disk.chmod(0o644)
    boots: dict[str, list[Boot]] = {"vmsuper-pc": [], "qemu+kvm": []}
    machines = [
        ("vmsuper-pc", vmsuper_boot, "pc-vmsuper"),
        ("qemu+kvm", qemu_boot, "pc-qemu"),
    ]
    # Taking turns at going first; the target compares the two round by round.
    for order in rounds(min(bench.repeat, MAX_REPEAT), len(machines)):
        for machine, boot, name in (machines[i] for i in order):
            boots[machine].append(boot(disk, bench.folder(name)))
    rows = []
    for machine, runs in boots.items():
        row: dict[str, Any] = {"machine": machine}
        for mark in MARKS:
            row[f"to_{mark}_s"] = summarize([b.marks_s[mark] for b in runs])
        row["to_exit_s"] = summarize([b.exit_s for b in runs])
        shares = [b.handling_pct for b in runs if b.handling_pct is not None]
        if shares:
            row["plugin_share_pct"] = summarize(shares)
        exits: dict[str, int] = {}
        for key in sorted({k for b in runs for k in b.extra}):
            exits[key] = round(sum(b.extra.get(key, 0) for b in runs) / len(runs))
        if exits:
            row["exits"] = exits
        rows.append(row)
    return rows
