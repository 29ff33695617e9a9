"""Where the guest spends its time: sample its instruction pointer every few milliseconds.

A thread pauses the VCPU (`Connection.pause_vcpus`) at a fixed interval; the VCPU loop reads
CS and RIP at each pause and hands them to `Samples`, which counts them per 32-byte block of
linear address. The summary names the hottest blocks: on a host whose KVM emulates the
firmware's instructions one by one, those are its loops (memset, checksums, delays).
"""

from __future__ import annotations

import threading
from collections import Counter

from vmsuper.plugin import Connection

SAMPLE_TOKEN = 0x5A3B1E  # the pause token that marks a sample
BLOCK = 32


class Samples:
    """Counts of sampled linear instruction addresses, by block."""

    def __init__(self) -> None:
        self.blocks: Counter[int] = Counter()
        self.total = 0

    def add(self, cs_base: int, rip: int) -> None:
        self.blocks[(cs_base + rip) // BLOCK * BLOCK] += 1
        self.total += 1

    def summary(self, top: int = 8) -> str:
        if not self.total:
            return "no guest samples"
        hottest = ", ".join(
            f"{block:#x} {100 * count / self.total:.0f}%"
            for block, count in self.blocks.most_common(top)
        )
        return f"{self.total} guest samples, hottest {BLOCK}-byte blocks: {hottest}"


def start_sampling(conn: Connection, interval_s: float, stop: threading.Event) -> None:
    """Pause VCPU 0 with `SAMPLE_TOKEN` every `interval_s` until `stop` is set."""

    def loop() -> None:
        own = conn.new_connection()
        try:
            while not stop.wait(interval_s):
                own.pause_vcpus(1, SAMPLE_TOKEN)
        except OSError:
            pass  # the VM went down
        finally:
            own.close()

    threading.Thread(target=loop, name="guest-sampler", daemon=True).start()
