"""What every benchmark section shares: the built programs, the work folder and the settings,
plus the command lines of the two plugins and of the C reference."""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import guest
from .build import Programs

SDK_PLUGIN = Path(__file__).resolve().parent / "sdk_plugin.py"
PLUGINS = ("native", "sdk")
TRANSPORTS = ("socket", "pipes")


@dataclass
class Bench:
    programs: Programs
    work: Path
    exits: int
    repeat: int
    quick: bool
    low_latency: tuple[bool, ...] = (False, True)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def folder(self, name: str) -> Path:
        """A fresh folder for one run."""
        path = self.work / f"{next(self._ids):04d}-{name}"
        path.mkdir(parents=True)
        return path

    def guest(self, exits: int) -> Path:
        return guest.write_guest(exits, self.work)

    def plugin(self, plugin: str, mode: str, exits: int = 1) -> list[str]:
        """argv of the `native` or `sdk` plugin in `mode` with a guest of `exits` loop writes."""
        if plugin == "native":
            prefix = [str(self.programs.native_plugin)]
        elif plugin == "sdk":
            prefix = [sys.executable, str(SDK_PLUGIN)]
        else:
            raise ValueError(f"unknown plugin {plugin!r}")
        if mode == "trivial":
            return [*prefix, "trivial"]
        return [*prefix, mode, str(exits), str(self.guest(exits)), *guest.port_args()]

    def reference(self, mode: str, vcpus: int, exits: int) -> list[str]:
        return [
            str(self.programs.reference),
            mode,
            str(vcpus),
            str(exits),
            str(self.guest(exits)),
            *guest.port_args(),
        ]
