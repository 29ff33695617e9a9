"""The VM every run starts from, made as soon as the plugin has been started.

A run makes its VM right after it spawns the plugin (supervisor/launch.py), before it imports
structlog and the runner, rather than once those imports are made: closing a VM whose in-kernel
irqchip was just made waits for the kernel to settle it (10 to 15 ms here), and a VM made that
much earlier has mostly settled by the time a plugin that exits at once has ended. The PIT's
release may still wait (its interrupt reinjection is turned off then, which waits for grace
periods of the kernel's). Measured in docs/performance.md ("Start-up").
"""

from __future__ import annotations

from typing import NamedTuple

from vmsuper.shared import kvm

# Where KVM needs three pages for the real-mode TSS on Intel hosts; high and out of the way,
# as other VMMs place it.
TSS_ADDRESS = 0xFFFBD000


class MachineError(Exception):
    """/dev/kvm could not be opened or the VM made; the message says which and why."""


class Machine(NamedTuple):
    """/dev/kvm and the VM made from it."""

    system: kvm.Kvm
    vm: kvm.Vm

    def close(self) -> None:
        self.vm.close()
        self.system.close()


def open_machine() -> Machine:
    """Open /dev/kvm and make the run's VM (`create_machine`)."""
    try:
        system = kvm.Kvm()
    except OSError as exc:
        raise MachineError(f"cannot open /dev/kvm: {exc}") from exc
    try:
        vm = create_machine(system)
    except OSError as exc:
        system.close()
        raise MachineError(f"cannot create the VM: {exc}") from exc
    return Machine(system, vm)


def create_machine(system: kvm.Kvm) -> kvm.Vm:
    """The VM every run starts from, before the plugin asks for anything: its TSS address, the
    in-kernel irqchip and the PIT, as crosvm's plugin mode made them."""
    vm = system.create_vm()
    try:
        vm.set_tss_addr(TSS_ADDRESS)
        vm.create_irqchip()
        vm.create_pit2()
    except BaseException:
        vm.close()
        raise
    return vm
