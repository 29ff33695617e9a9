"""The 16550A UART model: registers, transmission, reception and its interrupt line."""

from vmsuper.devices import SetIrq, Transmit, Uart16550
from vmsuper.devices import uart as u

BASE = u.COM1


def read(dev: Uart16550, offset: int) -> int:
    return dev.read(BASE + offset, 1).data[0]


def test_thr_write_transmits_and_the_transmitter_is_always_empty():
    dev = Uart16550()
    assert dev.write(BASE, b"A") == (Transmit("uart", b"A"),)
    assert read(dev, u.LSR) & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT
    assert dev.write(BASE, b"hi") == (Transmit("uart", b"hi"),)  # string output: every byte


def test_divisor_latch_shares_thr_and_ier_when_dlab_is_set():
    dev = Uart16550()
    dev.write(BASE + u.LCR, bytes([u.LCR_DLAB | 0x03]))
    assert dev.write(BASE, b"\x01") == ()  # DLL, not output
    dev.write(BASE + u.IER, b"\x02")  # DLM
    assert dev.divisor == 0x0201
    assert (read(dev, 0), read(dev, u.IER)) == (0x01, 0x02)
    dev.write(BASE + u.LCR, b"\x03")
    assert read(dev, u.IER) == 0  # the real IER was never written
    assert read(dev, u.LCR) == 0x03


def test_scratch_and_mcr_read_back():
    dev = Uart16550()
    dev.write(BASE + u.SCR, b"\x5a")
    dev.write(BASE + u.MCR, b"\xff")
    assert read(dev, u.SCR) == 0x5A
    assert read(dev, u.MCR) == 0x1F


def test_received_bytes_are_read_in_order_and_raise_the_line():
    dev = Uart16550()
    assert dev.write(BASE + u.IER, bytes([u.IER_RDA])) == ()
    assert dev.receive(b"ok") == (SetIrq(u.COM1_IRQ, True),)
    assert read(dev, u.LSR) & u.LSR_DR
    assert read(dev, u.IIR_FCR) & 0x0F == u.IIR_RDA
    assert dev.read(BASE, 1).data == b"o"
    reply = dev.read(BASE, 1)
    assert reply.data == b"k"
    assert reply.actions == (SetIrq(u.COM1_IRQ, False),)
    assert not read(dev, u.LSR) & u.LSR_DR
    assert read(dev, u.IIR_FCR) & 0x0F == u.IIR_NONE


def test_thr_empty_interrupt_is_acknowledged_by_reading_iir_and_rearmed_by_a_write():
    dev = Uart16550()
    assert dev.write(BASE + u.IER, bytes([u.IER_THRE])) == (SetIrq(u.COM1_IRQ, True),)
    reply = dev.read(BASE + u.IIR_FCR, 1)
    assert reply.data[0] & 0x0F == u.IIR_THRE
    assert reply.actions == (SetIrq(u.COM1_IRQ, False),)
    assert dev.write(BASE, b"x") == (Transmit("uart", b"x"), SetIrq(u.COM1_IRQ, True))


def test_fifo_enable_shows_in_iir_and_clear_drops_input():
    dev = Uart16550()
    dev.receive(b"abc")
    dev.write(BASE + u.IIR_FCR, bytes([u.FCR_ENABLE | u.FCR_CLEAR_RX]))
    assert read(dev, u.IIR_FCR) & 0xC0 == 0xC0
    assert not read(dev, u.LSR) & u.LSR_DR


def test_loopback_echoes_output_and_maps_modem_lines():
    dev = Uart16550()
    dev.write(BASE + u.MCR, bytes([u.MCR_LOOP | u.MCR_RTS | u.MCR_OUT2]))
    assert dev.write(BASE, b"z") == ()  # nothing leaves the machine
    assert dev.read(BASE, 1).data == b"z"
    msr = read(dev, u.MSR)
    assert msr & 0xF0 == u.MSR_CTS | u.MSR_DCD


def test_msr_reports_a_connected_line_outside_loopback():
    assert read(Uart16550(), u.MSR) & 0xF0 == u.MSR_LINES


def test_input_beyond_the_limit_overruns():
    dev = Uart16550()
    dev.receive(bytes(u.RX_LIMIT + 1))
    assert not dev.wants_input()
    assert read(dev, u.LSR) & u.LSR_OE
    assert not read(dev, u.LSR) & u.LSR_OE  # reading LSR clears it


def test_async_transmit_splits_the_data_register_off():
    ranges = Uart16550(async_transmit=True).ranges()
    assert [(r.start, r.length, r.async_write) for r in ranges] == [
        (BASE, 1, True),
        (BASE + 1, 7, False),
    ]
    assert [(r.start, r.length) for r in Uart16550().ranges()] == [(BASE, 8)]
