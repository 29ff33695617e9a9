"""`vmsuper check`: can this host run vmsuper?

Opens the KVM device, creates a throw-away VM and reports, one line each, the capabilities
vmsuper needs (exit status 1 when any is missing) and the optional ones (Hyper-V for plugins
that ask for it, tap devices for networking). Dirty logging has no capability of its own, so
it is tried for real on one page. The plugin sandbox, which the default config asks for, is
tried for real too: bwrap started exactly as for a plugin (unprivileged user namespaces and
all), running `true`.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from vmsuper.shared import kvm
from vmsuper.supervisor import cgroups

TUN_PATH = "/dev/net/tun"

REQUIRED_CAPS: tuple[tuple[str, str], ...] = (
    ("in-kernel irqchip", "KVM_CAP_IRQCHIP"),
    ("PIT2", "KVM_CAP_PIT2"),
    ("ioeventfd", "KVM_CAP_IOEVENTFD"),
    ("irqfd", "KVM_CAP_IRQFD"),
    ("irqfd with resample", "KVM_CAP_IRQFD_RESAMPLE"),
    ("GSI routing", "KVM_CAP_IRQ_ROUTING"),
    ("immediate exit", "KVM_CAP_IMMEDIATE_EXIT"),
    ("user memory", "KVM_CAP_USER_MEMORY"),
    ("read-only memory", "KVM_CAP_READONLY_MEM"),
    ("identity-map address", "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
)

OPTIONAL_CAPS: tuple[tuple[str, str], ...] = (
    ("Hyper-V SynIC", "KVM_CAP_HYPERV_SYNIC"),
    ("Hyper-V SynIC2", "KVM_CAP_HYPERV_SYNIC2"),
    ("Hyper-V CPUID", "KVM_CAP_HYPERV_CPUID"),
)


@dataclass(frozen=True)
class Result:
    """One line of the report."""

    label: str
    detail: str
    required: bool
    ok: bool

    def line(self) -> str:
        if self.ok:
            status = "ok"
        elif self.required:
            status = "MISSING"
        else:
            status = "absent (optional)"
        return f"  {status:<4} {self.label} ({self.detail})"


def summarize(results: Sequence[Result]) -> tuple[list[str], bool]:
    """The report lines and whether every required item holds."""
    missing = [r for r in results if r.required and not r.ok]
    lines = ["required:"]
    lines += [r.line() for r in results if r.required]
    lines.append("optional:")
    lines += [r.line() for r in results if not r.required]
    if missing:
        noun = "capability" if len(missing) == 1 else "capabilities"
        lines.append(f"not ready: {len(missing)} required {noun} missing")
    else:
        lines.append("ready: every required capability is present")
    return lines, not missing


def _capability(vm: kvm.Vm, system: kvm.Kvm, name: str) -> bool:
    cap: int = getattr(kvm, name)
    try:
        # Ask the VM where the kernel supports it: some answers depend on the VM.
        return vm.check_extension(cap) > 0
    except kvm.KvmError:
        return system.check_extension(cap) > 0


def _dirty_log_works(vm: kvm.Vm) -> tuple[bool, str]:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    pinned = ctypes.c_char.from_buffer(page)
    address = ctypes.addressof(pinned)
    try:
        vm.set_user_memory_region(0, kvm.KVM_MEM_LOG_DIRTY_PAGES, 0, mmap.PAGESIZE, address)
        vm.get_dirty_log(0, bytearray(kvm.dirty_log_size(mmap.PAGESIZE)))
        vm.set_user_memory_region(0, 0, 0, 0, address)
    except kvm.KvmError as exc:
        return False, str(exc)
    finally:
        del pinned
        page.close()
    return True, "KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG"


def _device_openable(path: str) -> tuple[bool, str]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{path}: {exc.strerror}"
    os.close(fd)
    return True, path


def _sandbox_works() -> tuple[bool, str]:
    """Start the plugin sandbox around `true`, as a run starts it around the plugin."""
    from vmsuper.supervisor.config import PluginConfig
    from vmsuper.supervisor.sandbox import Sandbox, SandboxError

    true = shutil.which("true") or "/bin/true"
    try:
        Sandbox.for_plugin(PluginConfig(path=Path(true))).check()
    except SandboxError as exc:
        said = str(exc)
        if "sandbox = false" not in said:
            said += " (needed unless [plugin] sandbox = false)"
        return False, said
    return True, "bwrap with unprivileged user namespaces"


def probe(system: kvm.Kvm, vm: kvm.Vm, *, tun_path: str = TUN_PATH) -> list[Result]:
    results = [
        Result(label, name, True, _capability(vm, system, name)) for label, name in REQUIRED_CAPS
    ]
    works, detail = _dirty_log_works(vm)
    results.append(Result("dirty page logging", detail, True, works))
    works, detail = _sandbox_works()
    results.append(Result("plugin sandbox", detail, True, works))
    results += [
        Result(label, name, False, _capability(vm, system, name)) for label, name in OPTIONAL_CAPS
    ]
    works, detail = _device_openable(tun_path)
    results.append(Result("tap devices", detail, False, works))
    # Needed unless the config sets [limits] plugin_memory, plugin_processes and plugin_cpu to 0.
    works, detail = cgroups.probe()
    results.append(Result("plugin limits (cgroups)", detail, False, works))
    return results


def run_check(kvm_path: str, *, tun_path: str = TUN_PATH, out: TextIO, err: TextIO) -> int:
    try:
        system = kvm.Kvm(kvm_path)
    except kvm.KvmUnavailable as exc:
        print(f"vmsuper check: {exc}", file=err)
        print(
            "  (is the kvm module loaded, and may this user read and write the device?)",
            file=err,
        )
        return 1
    with system:
        print(f"KVM device {kvm_path}: accessible (read/write)", file=out)
        print(f"KVM API version: {system.api_version()}", file=out)
        try:
            vm = system.create_vm()
        except kvm.KvmError as exc:
            print(f"vmsuper check: cannot create a VM: {exc}", file=err)
            return 1
        with vm:
            results = probe(system, vm, tun_path=tun_path)
    lines, ready = summarize(results)
    for line in lines:
        print(line, file=out)
    return 0 if ready else 1


def main(argv: list[str] | None = None, *, kvm_path: str = "/dev/kvm") -> int:
    """Entry point of `vmsuper check`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="vmsuper check",
        description="Report whether this host's KVM has what vmsuper needs.",
    )
    parser.add_argument(
        "--device", default=kvm_path, help=f"KVM device to check (default: {kvm_path})"
    )
    args = parser.parse_args([] if argv is None else argv)
    return run_check(args.device, out=sys.stdout, err=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
