"""What every benchmark section shares: the built programs, the work folder and the settings,
plus the command lines of the two plugins and of the C reference."""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from . import guest
from .build import Programs
from .vmrun import RunSpec

SDK_PLUGIN = Path(__file__).resolve().parent / "sdk_plugin.py"
PLUGINS = ("native", "sdk")
TRANSPORTS = ("socket", "pipes")
DEFAULT_PATH: Final = "c+poll"
# The ways vmsuper can serve an exit, as `[vm]` settings. The default leaves the key out
# (vmsuper's own default: worker and runner poll for each other); `c` does not poll
# (`poll_us = 0`): every hand-off that waits is a sleep, in a read of a bell's pipe or of the
# channel. (Runs before the exit engine also had `python`, every exit in Python; the committed
# figures keep its rows.)
PATHS: Final[dict[str, dict[str, Any]]] = {
    DEFAULT_PATH: {},
    "c": {"poll_us": 0},
}


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

    def spec(self, plugin: str, mode: str, exits: int = 1, **settings: Any) -> RunSpec:
        """A run of the `native` or `sdk` plugin in `mode`, guest of `exits` loop writes."""
        return RunSpec(plugin=self.plugin(plugin, mode, exits), mounts=(self.work,), **settings)

    def plugin(self, plugin: str, mode: str, exits: int = 1) -> list[str]:
        """argv of the `native` or `sdk` plugin in `mode` with a guest of `exits` loop writes."""
        if plugin == "native":
            prefix = [str(self.programs.native_plugin)]
        elif plugin == "sdk":
            prefix = [str(self._sdk_script())]
        else:
            raise ValueError(f"unknown plugin {plugin!r}")
        if mode == "trivial":
            return [*prefix, "trivial"]
        return [*prefix, mode, str(exits), str(self.guest(exits)), *guest.port_args()]

    def _sdk_script(self) -> Path:
        """sdk_plugin.py as an executable script run by this interpreter: a plugin the sandbox
        knows how to set up (it binds a script's interpreter and its installation)."""
        path = self.work / SDK_PLUGIN.name
        if not path.exists():
            path.write_text(f"#!{sys.executable}\n{SDK_PLUGIN.read_text()}")
            path.chmod(0o755)
        return path

    def reference(self, mode: str, vcpus: int, exits: int) -> list[str]:
        return [
            str(self.programs.reference),
            mode,
            str(vcpus),
            str(exits),
            str(self.guest(exits)),
            *guest.port_args(),
        ]
