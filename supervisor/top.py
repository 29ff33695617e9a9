"""`vmsuper top`: every VCPU of every live run on this host, refreshed about once a second.

One table (rich's `Live` display: a table redrawn in place, no application framework), one row
per VCPU: its run, state, how long it has waited on the plugin, exits, exits per second since
the last refresh and the plugin's response-time percentiles. ``s`` toggles the sort between
exits per second and time waiting on the plugin; ``q`` quits. Runs that start are picked up at
the next refresh, runs that end drop out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from rich.console import Console
from rich.live import Live
from rich.table import Table

from vmsuper.shared.shm import RegionView
from vmsuper.shared.shm_layout import ShmError
from vmsuper.shared.shm_slot import VcpuReading
from vmsuper.supervisor import runinfo
from vmsuper.supervisor.runinfo import RunInfo
from vmsuper.supervisor.stats import PERCENTILES, percentile_ns, state_name

__all__ = ["Row", "Top", "main"]

SORTS: Final = ("exits/s", "waiting")
REFRESH: Final = 1.0


@dataclass
class Row:
    pid: int
    vcpu: int
    state: str
    waiting_s: float | None
    exits: int
    rate: float | None
    percentiles_s: dict[str, float | None]
    poll_window_s: float


class Top:
    """The rows of every live run, from one refresh to the next (sans terminal)."""

    def __init__(self) -> None:
        self._views: dict[tuple[int, int], tuple[RunInfo, RegionView]] = {}
        self._last: dict[tuple[int, int, int], tuple[float, int]] = {}
        self.sort = SORTS[0]

    def toggle_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]

    def _refresh_runs(self) -> None:
        live = {(info.pid, info.start_ticks): info for info in runinfo.find_runs()}
        for key in list(self._views):
            if key not in live:
                self._views.pop(key)[1].close()
        for key, info in live.items():
            if key not in self._views:
                with contextlib.suppress(OSError, ShmError):
                    self._views[key] = (info, RegionView.open(info.pid, info.shm_fd))

    def rows(self) -> list[Row]:
        self._refresh_runs()
        now = time.monotonic()
        rows = []
        for (pid, ticks), (_, view) in sorted(self._views.items()):
            for vcpu in range(view.vcpus):
                rows.append(self._row(pid, ticks, vcpu, view.reading(vcpu), now))
        if self.sort == "waiting":
            rows.sort(key=lambda r: -(r.waiting_s or 0.0))
        else:
            rows.sort(key=lambda r: -(r.rate or 0.0))
        return rows

    def _row(self, pid: int, ticks: int, vcpu: int, reading: VcpuReading, now: float) -> Row:
        exits = sum(reading.exits.values())
        before = self._last.get((pid, ticks, vcpu))
        self._last[(pid, ticks, vcpu)] = (now, exits)
        rate = None
        if before is not None and now > before[0]:
            rate = (exits - before[1]) / (now - before[0])
        percentiles: dict[str, float | None] = {}
        for name, fraction in PERCENTILES:
            ns = percentile_ns(reading.buckets, fraction, reading.response_max_ns)
            percentiles[name] = None if ns is None else ns / 1e9
        percentiles["max"] = reading.response_max_ns / 1e9 if reading.responses else None
        return Row(
            pid=pid,
            vcpu=vcpu,
            state=state_name(reading.state),
            waiting_s=None if reading.waiting_ns is None else reading.waiting_ns / 1e9,
            exits=exits,
            rate=rate,
            percentiles_s=percentiles,
            poll_window_s=reading.poll_ns / 1e9,
        )

    def table(self) -> Table:
        rows = self.rows()
        runs = len(self._views)
        table = Table(
            title=f"vmsuper top: {runs} live run{'s' if runs != 1 else ''}, sorted by {self.sort}",
            caption="s: sort by exits/s or waiting   q: quit",
        )
        for name in ("run", "vcpu", "state", "waiting ms", "exits", "exits/s"):
            table.add_column(name, justify="left" if name in ("run", "state") else "right")
        for name in (*dict(PERCENTILES), "max"):
            table.add_column(f"{name} ms", justify="right")
        table.add_column("poll us", justify="right")
        for row in rows:
            table.add_row(
                str(row.pid),
                str(row.vcpu),
                row.state,
                _ms(row.waiting_s),
                str(row.exits),
                "-" if row.rate is None else f"{row.rate:.0f}",
                *(_ms(row.percentiles_s[name]) for name in (*dict(PERCENTILES), "max")),
                f"{row.poll_window_s * 1e6:.0f}",
            )
        return table

    def close(self) -> None:
        for _, view in self._views.values():
            view.close()
        self._views.clear()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


@contextlib.contextmanager
def _keys(fd: int) -> Iterator[None]:
    """Single keys without echo (cbreak) while the view runs, if stdin is a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read_keys(fd: int, timeout: float) -> str:
    """Keys typed within `timeout` seconds ("" if none; "q" at end of input)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return ""
    data = os.read(fd, 64)
    return data.decode(errors="replace") if data else "q"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmsuper top",
        description="A live view of every VCPU of every vmsuper run on this host. "
        "Keys: s toggles the sort (exits/s, time waiting on the plugin), q quits.",
    )
    parser.add_argument(
        "--interval", type=float, default=REFRESH, metavar="S", help="seconds between refreshes"
    )
    args = parser.parse_args(argv)
    if not 0.1 <= args.interval <= 60:
        print("vmsuper top: error: --interval must be within 0.1..60 s", file=sys.stderr)
        return 2
    top = Top()
    stdin = sys.stdin.fileno()
    console = Console()
    try:
        with _keys(stdin), Live(top.table(), console=console, auto_refresh=False) as live:
            while True:
                deadline = time.monotonic() + args.interval
                while (left := deadline - time.monotonic()) > 0:
                    keys = _read_keys(stdin, left)
                    if "q" in keys:
                        return 0
                    if "s" in keys:
                        top.toggle_sort()
                        live.update(top.table(), refresh=True)
                live.update(top.table(), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        top.close()
