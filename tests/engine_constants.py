"""The exit engine's tuning constants (`#define`s of shared/hotpath.c), read from its source
for the tests that check the engine against them."""

from __future__ import annotations

import re
from pathlib import Path

from vmsuper.shared import hotpath_source


def engine_constant(name: str) -> int:
    """The value of `#define NAME <digits>u` in hotpath.c."""
    source = (Path(hotpath_source.__file__).parent / "hotpath.c").read_text()
    found = re.search(rf"^#define {name} (\d+)u\b", source, re.MULTILINE)
    assert found, f"no #define {name} in hotpath.c"
    return int(found.group(1))
