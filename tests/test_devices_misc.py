"""The small devices (debug exit, debugcon, port 0x92, i8042) and the bus that routes to them."""

import pytest

from vmsuper.devices import (
    I8042,
    Bus,
    BusError,
    DebugCon,
    DebugExit,
    Device,
    ExitRun,
    Log,
    PortA,
    PortRange,
    Reply,
    ResetRequest,
)
from vmsuper.devices import i8042 as k
from vmsuper.plugin import Space


def test_debug_exit_status_is_value_shifted_with_bit_0():
    dev = DebugExit()
    (action,) = dev.write(0xF4, b"\x10")
    assert isinstance(action, ExitRun)
    assert action.status == 33
    assert dev.write(0xF4, b"\x00")[0].status == 1  # type: ignore[union-attr]
    assert dev.write(0xF4, b"\x01\x00\x00\x00")[0].status == 3  # type: ignore[union-attr]
    (claimed,) = dev.ranges()
    assert (claimed.start, claimed.length, claimed.async_write) == (0xF4, 4, True)


def test_debugcon_reads_back_e9_and_logs_lines():
    dev = DebugCon()
    assert dev.read(0x402, 1).data == b"\xe9"
    assert dev.write(0x402, b"Sea") == ()
    assert dev.write(0x402, b"BIOS\r\nnext") == (Log("debugcon", "SeaBIOS"),)
    assert dev.write(0x402, b"\n") == (Log("debugcon", "next"),)


def test_port_a_keeps_a20_and_resets_on_bit_0():
    dev = PortA()
    assert dev.read(0x92, 1).data == b"\x02"
    assert dev.write(0x92, b"\x00") == ()
    assert dev.read(0x92, 1).data == b"\x00"
    (action,) = dev.write(0x92, b"\x03")
    assert isinstance(action, ResetRequest)
    assert dev.read(0x92, 1).data == b"\x02"


def status(dev: I8042) -> int:
    return dev.read(k.COMMAND_PORT, 1).data[0]


def answers(dev: I8042) -> list[int]:
    out = []
    while status(dev) & k.STATUS_OBF:
        out.append(dev.read(k.DATA_PORT, 1).data[0])
    return out


def test_i8042_self_tests_and_command_byte():
    dev = I8042()
    assert status(dev) & k.STATUS_OBF == 0
    dev.write(k.COMMAND_PORT, b"\xaa")
    assert answers(dev) == [k.CONTROLLER_OK]
    dev.write(k.COMMAND_PORT, b"\xab")
    assert answers(dev) == [0x00]
    dev.write(k.COMMAND_PORT, b"\x60")
    dev.write(k.DATA_PORT, b"\x61")
    dev.write(k.COMMAND_PORT, b"\x20")
    assert answers(dev) == [0x61]


def test_keyboard_reset_and_parameter_commands_as_seabios_sends_them():
    dev = I8042()
    dev.write(k.DATA_PORT, b"\xff")
    assert answers(dev) == [k.ACK, k.SELF_TEST_OK]
    dev.write(k.DATA_PORT, b"\xf0")  # set scan code set ...
    dev.write(k.DATA_PORT, b"\x02")  # ... 2: the parameter is acknowledged too
    assert answers(dev) == [k.ACK, k.ACK]
    dev.write(k.DATA_PORT, b"\xf4")
    assert answers(dev) == [k.ACK]
    dev.write(k.DATA_PORT, b"\x00")  # not a keyboard command
    assert answers(dev) == [k.RESEND]


def test_aux_bytes_are_flagged_and_reset_pulse_is_a_reset():
    dev = I8042()
    dev.write(k.COMMAND_PORT, b"\xd4")
    dev.write(k.DATA_PORT, b"\xf2")
    assert status(dev) & k.STATUS_AUX
    assert answers(dev) == [k.ACK, 0x00]
    (action,) = dev.write(k.COMMAND_PORT, b"\xfe")
    assert isinstance(action, ResetRequest)


class Probe(Device):
    name = "probe"

    def __init__(self, start: int, length: int) -> None:
        self.claimed = PortRange(start, length)
        self.seen: list[tuple[int, bytes]] = []

    def ranges(self):
        return (self.claimed,)

    def read(self, address, length):
        return Reply(bytes([address & 0xFF]) * length)

    def write(self, address, data):
        self.seen.append((address, data))
        return ()


def test_bus_routes_by_range_and_answers_for_empty_addresses():
    low, high = Probe(0x10, 4), Probe(0x20, 2)
    bus = Bus([high, low])
    assert bus.read(Space.IOPORT, 0x13, 1).data == b"\x13"
    assert bus.find(Space.IOPORT, 0x14) is None
    assert bus.read(Space.IOPORT, 0x14, 2).data == b"\xff\xff"
    assert bus.read(Space.MMIO, 0x10, 2).data == b"\0\0"
    bus.write(Space.IOPORT, 0x21, b"x")
    bus.write(Space.IOPORT, 0x22, b"y")  # past the end: dropped
    assert high.seen == [(0x21, b"x")] and low.seen == []
    assert [r.start for r, _ in bus.ranges()] == [0x10, 0x20]


def test_bus_rejects_overlaps():
    bus = Bus([Probe(0x10, 4)])
    for start, length in ((0x13, 1), (0x0F, 2), (0x08, 0x20)):
        with pytest.raises(BusError, match="overlaps"):
            bus.add(Probe(start, length))
    bus.add(Probe(0x14, 1))
