"""``vmsuper-pc``: the PC machine as a vmsuper plugin.

    vmsuper-pc --bios FILE --disk FILE [--memory MIB] [--snapshot] [--serial PATH]
               [--serial-input PATH] [--debugcon] [--sample-ms MS]

Run it as the ``[plugin] path`` of a vmsuper config (configs/pc.toml). COM1 goes to standard
output (and to ``--serial PATH``); a write to the isa-debug-exit port (0xf4) ends the run
with that port's status, which vmsuper passes on. Bad arguments and unusable files are
reported before the VM is touched, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence
from typing import BinaryIO

from vmsuper.devices import DiskError, ImageDisk

from .machine import PcMachine, PcOptions

USAGE_ERROR = 2
MIB = 1 << 20
MIN_MEMORY_MIB = 2
MAX_MEMORY_MIB = 3072  # all RAM below the PCI hole
FIRMWARE_UNIT = 0x10000
MAX_FIRMWARE = 16 * MIB


class UsageError(Exception):
    """A bad argument or file; the message is for the user."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmsuper-pc",
        description="A PC (i440FX, PIIX3 IDE, COM1) that boots a BIOS image and a raw disk.",
    )
    parser.add_argument("--bios", required=True, help="firmware image, e.g. SeaBIOS's bios.bin")
    parser.add_argument("--disk", required=True, help="raw disk image (a multiple of 512 bytes)")
    parser.add_argument(
        "--memory",
        type=int,
        default=128,
        metavar="MIB",
        help=f"RAM in MiB, {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB} (default 128)",
    )
    parser.add_argument(
        "--snapshot", action="store_true", help="keep disk writes in memory; the image is unchanged"
    )
    parser.add_argument("--serial", metavar="PATH", help="also write COM1 output to this file")
    parser.add_argument(
        "--serial-input",
        metavar="PATH",
        help="feed COM1's input from this file or FIFO (vmsuper gives plugins no stdin)",
    )
    parser.add_argument(
        "--debugcon",
        action="store_true",
        help="enable the debug console at port 0x402 (SeaBIOS's log, on stderr)",
    )
    parser.add_argument(
        "--sample-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="sample the guest's instruction pointer every MS ms; summary on stderr at the end",
    )
    return parser


def read_firmware(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FIRMWARE + 1)
    except OSError as exc:
        raise UsageError(f"--bios {path}: {exc.strerror}") from None
    if not data or len(data) % FIRMWARE_UNIT or len(data) > MAX_FIRMWARE:
        raise UsageError(
            f"--bios {path}: {len(data)} bytes; a firmware image is a multiple of 64 KiB, "
            "at most 16 MiB"
        )
    return data


def serial_input_fd() -> int | None:
    """Standard input feeds COM1 when it is a terminal or a pipe (not a file or /dev/null)."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return None
    if os.isatty(0) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return 0
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    serial_files: list[BinaryIO] = []
    try:
        if args.sample_ms < 0:
            raise UsageError(f"--sample-ms {args.sample_ms}: expected a positive interval")
        if not MIN_MEMORY_MIB <= args.memory <= MAX_MEMORY_MIB:
            raise UsageError(f"--memory {args.memory}: expected {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}")
        firmware = read_firmware(args.bios)
        try:
            disk = ImageDisk(args.disk, snapshot=args.snapshot)
        except DiskError as exc:
            raise UsageError(f"--disk: {exc}") from None
        input_fd = serial_input_fd()
        if args.serial_input:
            try:
                input_fd = os.open(args.serial_input, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise UsageError(f"--serial-input {args.serial_input}: {exc.strerror}") from None
        if args.serial:
            try:
                serial_files.append(open(args.serial, "ab"))  # noqa: SIM115
            except OSError as exc:
                raise UsageError(f"--serial {args.serial}: {exc.strerror}") from None
    except UsageError as exc:
        print(f"vmsuper-pc: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    from vmsuper.plugin import Connection, PluginError

    try:
        conn = Connection.from_env()
    except PluginError as exc:
        print(f"vmsuper-pc: error: {exc}: run it as a vmsuper plugin", file=sys.stderr)
        return USAGE_ERROR
    vcpus = conn.get_vcpus()  # as many CPUs as the config's [vm] vcpus
    options = PcOptions(
        firmware=firmware,
        disk=disk,
        ram_size=args.memory * MIB,
        cpus=len(vcpus),
        serial_files=serial_files,
        serial_input=input_fd,
        debugcon=args.debugcon,
        sample_interval_s=args.sample_ms / 1000,
    )
    machine = PcMachine(conn, options)
    conn.start()
    try:
        status = machine.run(vcpus)
    finally:
        sys.stdout.flush()
        print(f"vmsuper-pc: {machine.exit_summary()}", file=sys.stderr, flush=True)
    disk.flush()
    return status


def entry() -> None:
    sys.exit(main())
