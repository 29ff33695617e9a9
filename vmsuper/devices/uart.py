"""A 16550A UART, as the PC's COM ports: what SeaBIOS, a boot sector or Linux program.

Transmission is instant: a byte written to THR becomes a `Transmit` action at once, so the
transmitter is always empty (LSR THRE|TEMT) and a THR-empty interrupt is pending again right
after each write. Received bytes come from `receive` (the machine's stdin) into a FIFO.
The interrupt output follows the highest-priority pending source, like QEMU's model (not
gated by MCR OUT2); it is returned as `SetIrq` actions when it changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .base import NO_ACTIONS, Action, Actions, Device, PortRange, Reply, SetIrq, Transmit

COM1 = 0x3F8
COM1_IRQ = 4

# Register offsets.
RBR_THR = 0  # DLL when LCR.DLAB
IER = 1  # DLM when LCR.DLAB
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01
IER_THRE = 0x02
IER_RLS = 0x04
IER_MS = 0x08

IIR_NONE = 0x01
IIR_MS = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_FIFO_ON = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_LINES = MSR_CTS | MSR_DSR | MSR_DCD  # a connected terminal

RX_LIMIT = 4096  # bytes held for the guest before input overruns


class Uart16550(Device):
    """One COM port at `base` raising `irq`."""

    name = "uart"

    def __init__(self, base: int = COM1, irq: int = COM1_IRQ, *, async_transmit: bool = False):
        self.base = base
        self.irq = irq
        self.async_transmit = async_transmit
        self.divisor = 12  # 9600 baud
        self.ier = 0
        self.lcr = 0x03
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fifo_enabled = False
        self.overrun = False
        self.thre_pending = False
        self.msr_delta = 0
        self.rx: deque[int] = deque()
        self._irq_level = False

    def ranges(self) -> Sequence[PortRange]:
        """With ``async_transmit`` THR writes do not stop the VCPU; RBR/DLL then read zeros."""
        if self.async_transmit:
            return (PortRange(self.base, 1, async_write=True), PortRange(self.base + 1, 7))
        return (PortRange(self.base, 8),)

    # --- guest accesses ----------------------------------------------------------------------

    def read(self, address: int, length: int) -> Reply:
        offset = address - self.base
        value, actions = self._read_register(offset)
        return Reply(bytes([value]) * length, actions)

    def write(self, address: int, data: bytes) -> Actions:
        offset = address - self.base
        if offset == RBR_THR and not self.lcr & LCR_DLAB:
            return self._transmit(data)  # string output: every byte goes out
        actions: list[Action] = []
        for byte in data:  # an `outw` writes two registers
            actions += self._write_register(offset, byte)
            offset += 1
            if offset > SCR:
                break
        return tuple(actions)

    # --- input from the host -----------------------------------------------------------------

    def receive(self, data: bytes) -> Actions:
        """Bytes arriving on the line; beyond `RX_LIMIT` they are lost (LSR overrun)."""
        for byte in data:
            if len(self.rx) >= RX_LIMIT:
                self.overrun = True
                break
            self.rx.append(byte)
        return self._update_irq()

    def wants_input(self) -> bool:
        return len(self.rx) < RX_LIMIT

    # --- registers ---------------------------------------------------------------------------

    def _read_register(self, offset: int) -> tuple[int, Actions]:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                return self.divisor & 0xFF, NO_ACTIONS
            value = self.rx.popleft() if self.rx else 0
            return value, self._update_irq()
        if offset == IER:
            return (self.divisor >> 8 if dlab else self.ier), NO_ACTIONS
        if offset == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRE:
                self.thre_pending = False  # reading IIR acknowledges THR empty
            value = iir | (IIR_FIFO_ON if self.fifo_enabled else 0)
            return value, self._update_irq()
        if offset == LCR:
            return self.lcr, NO_ACTIONS
        if offset == MCR:
            return self.mcr, NO_ACTIONS
        if offset == LSR:
            value = (
                LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0) | (LSR_OE if self.overrun else 0)
            )
            self.overrun = False
            return value, self._update_irq()
        if offset == MSR:
            value = self._msr_lines() | self.msr_delta
            self.msr_delta = 0
            return value, self._update_irq()
        return self.scr, NO_ACTIONS

    def _write_register(self, offset: int, value: int) -> Actions:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
                return NO_ACTIONS
            return self._transmit(bytes([value]))
        if offset == IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | value << 8
                return NO_ACTIONS
            was = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_THRE and not was & IER_THRE:
                self.thre_pending = True  # the transmitter is empty: say so at once
            return self._update_irq()
        if offset == IIR_FCR:
            self.fifo_enabled = bool(value & FCR_ENABLE)
            if value & FCR_CLEAR_RX:
                self.rx.clear()
            return self._update_irq()
        if offset == LCR:
            self.lcr = value
            return NO_ACTIONS
        if offset == MCR:
            old_lines = self._msr_lines()
            self.mcr = value & 0x1F
            changed = (old_lines ^ self._msr_lines()) >> 4
            self.msr_delta |= changed & 0x0B  # delta CTS, DSR, DCD (RI counts trailing edges)
            if old_lines & MSR_RI and not self._msr_lines() & MSR_RI:
                self.msr_delta |= 0x04
            return self._update_irq()
        if offset == SCR:
            self.scr = value
        return NO_ACTIONS

    def _transmit(self, data: bytes) -> Actions:
        self.thre_pending = bool(self.ier & IER_THRE)
        if self.mcr & MCR_LOOP:
            for byte in data:
                if len(self.rx) < RX_LIMIT:
                    self.rx.append(byte)
            return self._update_irq()
        irq = self._update_irq()
        return (Transmit(self.name, bytes(data)), *irq)

    def _msr_lines(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return (
                (MSR_CTS if m & MCR_RTS else 0)
                | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0)
                | (MSR_DCD if m & MCR_OUT2 else 0)
            )
        return MSR_LINES

    def _iir(self) -> int:
        if self.ier & IER_RLS and self.overrun:
            return IIR_RLS
        if self.ier & IER_RDA and self.rx:
            return IIR_RDA
        if self.ier & IER_THRE and self.thre_pending:
            return IIR_THRE
        if self.ier & IER_MS and self.msr_delta:
            return IIR_MS
        return IIR_NONE

    def _update_irq(self) -> Actions:
        level = self._iir() != IIR_NONE
        if level == self._irq_level:
            return NO_ACTIONS
        self._irq_level = level
        return (SetIrq(self.irq, level),)
