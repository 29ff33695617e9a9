"""The PS/2 controller (i8042) at 0x60/0x64 with a keyboard that answers, as far as a BIOS
needs to find and set it up: controller self-tests, the command byte, keyboard reset and the
usual keyboard commands. No keys are ever pressed, so no interrupts are raised; an auxiliary
(mouse) device answers its commands the same way. Pulsing output line 0 (command 0xfe) or
clearing it through the output port is a reset request, as on a PC.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .base import NO_ACTIONS, Actions, Device, PortRange, Reply, ResetRequest

DATA_PORT = 0x60
COMMAND_PORT = 0x64

STATUS_OBF = 0x01
STATUS_SYS = 0x04
STATUS_CMD = 0x08
STATUS_UNLOCKED = 0x10
STATUS_AUX = 0x20

CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20

ACK = 0xFA
SELF_TEST_OK = 0xAA
CONTROLLER_OK = 0x55
RESEND = 0xFE

# Keyboard/mouse commands followed by one parameter byte (LEDs, scan set, rate, resolution...).
WITH_PARAMETER = {0xED, 0xF0, 0xF3, 0xE8}


class I8042(Device):
    name = "i8042"

    def __init__(self) -> None:
        self.ctr = 0x45  # keyboard interrupt, system flag, scan-code translation
        self.output: deque[tuple[int, bool]] = deque()  # (byte, from the aux device)
        self.pending: int | None = None  # controller command waiting for its data byte
        self.device_parameter = {False: False, True: False}  # a device awaits its parameter
        self.last_was_command = False
        self.output_port = 0x03  # A20 on, not in reset

    def ranges(self) -> Sequence[PortRange]:
        return (PortRange(DATA_PORT, 1), PortRange(COMMAND_PORT, 1))

    def read(self, address: int, length: int) -> Reply:
        if address == COMMAND_PORT:
            return Reply(bytes([self._status()]) * length)
        value = self.output.popleft()[0] if self.output else 0
        return Reply(bytes([value]) * length)

    def write(self, address: int, data: bytes) -> Actions:
        value = data[0]
        if address == COMMAND_PORT:
            self.last_was_command = True
            return self._controller_command(value)
        self.last_was_command = False
        pending, self.pending = self.pending, None
        if pending == 0x60:
            self.ctr = value
        elif pending == 0xD1:
            self.output_port = value
            if not value & 0x01:
                return (ResetRequest(f"i8042 output port = {value:#04x}"),)
        elif pending == 0xD2:
            self.output.append((value, False))
        elif pending == 0xD3:
            self.output.append((value, True))
        elif pending == 0xD4:
            self._device_command(value, aux=True)
        else:
            self._device_command(value, aux=False)
        return NO_ACTIONS

    def _status(self) -> int:
        status = STATUS_SYS | STATUS_UNLOCKED
        if self.output:
            status |= STATUS_OBF | (STATUS_AUX if self.output[0][1] else 0)
        if self.last_was_command:
            status |= STATUS_CMD
        return status

    def _controller_command(self, command: int) -> Actions:
        if command == 0x20:
            self.output.append((self.ctr, False))
        elif command in (0x60, 0xD1, 0xD2, 0xD3, 0xD4):
            self.pending = command
        elif command == 0xA7:
            self.ctr |= CTR_AUX_DISABLE
        elif command == 0xA8:
            self.ctr &= ~CTR_AUX_DISABLE
        elif command in (0xA9, 0xAB):
            self.output.append((0x00, False))  # interface test passed
        elif command == 0xAA:
            self.output.append((CONTROLLER_OK, False))
        elif command == 0xAD:
            self.ctr |= CTR_KBD_DISABLE
        elif command == 0xAE:
            self.ctr &= ~CTR_KBD_DISABLE
        elif command == 0xC0:
            self.output.append((0x00, False))
        elif command == 0xD0:
            self.output.append((self.output_port, False))
        elif 0xF0 <= command <= 0xFE and not command & 0x01:
            return (ResetRequest(f"i8042 command {command:#04x}"),)
        return NO_ACTIONS

    def _device_command(self, value: int, *, aux: bool) -> None:
        if self.device_parameter[aux]:
            self.device_parameter[aux] = False
            self.output.append((ACK, aux))
            return
        if value == 0xFF:  # reset and self-test
            self.output.extend([(ACK, aux), (SELF_TEST_OK, aux)])
            if aux:
                self.output.append((0x00, aux))  # mouse ID
        elif value == 0xF2:  # identify
            ident = [0x00] if aux else [0xAB, 0x41]
            self.output.extend([(ACK, aux)] + [(b, aux) for b in ident])
        elif value == 0xEE and not aux:  # echo
            self.output.append((0xEE, aux))
        elif value in WITH_PARAMETER:
            self.device_parameter[aux] = True
            self.output.append((ACK, aux))
        elif value >= 0xE6:
            self.output.append((ACK, aux))
        else:
            self.output.append((RESEND, aux))
