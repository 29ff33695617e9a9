"""Modules that a library imports at its top but vmsuper's path never uses, imported on first use.

protobuf's `descriptor_pool` and `builder` import its pure-Python message module
(`google.protobuf.internal.python_message`, which brings `text_format`, `pickle`, `calendar`
and more: about a tenth of `vmsuper run`'s imports) even when the upb backend makes every
message class and never calls it. `defer` puts a stand-in in `sys.modules` under the module's
name; the first attribute read from the stand-in imports the real module (the stand-in leaves
`sys.modules` then) and returns the real attribute, so whoever does need the module (the
pure-Python backend, a message printed as text) gets it, only later.

`NotInstalled` is for a module a library imports only if it is installed, and does without
otherwise: for the library's import it is not installed.
"""

from __future__ import annotations

import importlib
import sys
import types

TYPE_CHECKING = False  # importing typing costs `vmsuper run` milliseconds before its hand-over
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class ImportedOnFirstUse(types.ModuleType):
    """Stands in for a module not imported yet; reading any of its attributes imports the real
    module and reads the attribute from it."""

    def __getattr__(self, name: str) -> Any:
        name_of_module = self.__name__
        if sys.modules.get(name_of_module) is self:
            del sys.modules[name_of_module]
        return getattr(importlib.import_module(name_of_module), name)


class _InPlaceOf:
    """Within the block, each of `names` not imported yet is `stand_in(name)` in `sys.modules`;
    afterwards each entry still the block's leaves (a stand-in that imported its module, or
    something put there since, stays). A class rather than a contextlib generator: this module
    is on the way to a served run's hand-over, which imports no contextlib (tests/test_cli.py)."""

    def __init__(self, names: tuple[str, ...], stand_in: Callable[[str], object]) -> None:
        self._entries = {name: stand_in(name) for name in names if name not in sys.modules}

    def __enter__(self) -> None:
        sys.modules.update(self._entries)  # type: ignore[arg-type]  # None: see NotInstalled

    def __exit__(self, *_: object) -> None:
        for name, entry in self._entries.items():
            if name in sys.modules and sys.modules[name] is entry:
                del sys.modules[name]


class NotInstalled(_InPlaceOf):
    """Within the block, an import of any of `names` not imported yet raises ImportError, as
    if it were not installed (`None` in `sys.modules`); afterwards it imports as usual."""

    def __init__(self, *names: str) -> None:
        super().__init__(names, lambda _name: None)


class OnFirstUse(_InPlaceOf):
    """Within the block, an import of any of `names` not imported yet gets a stand-in
    (`ImportedOnFirstUse`); afterwards an import gets the real module, and the stand-ins that
    something took meanwhile import it when first used."""

    def __init__(self, *names: str) -> None:
        super().__init__(names, ImportedOnFirstUse)


def defer(name: str) -> None:
    """Import module `name` on first use rather than when something imports it (if it is not
    imported already)."""
    if name not in sys.modules:
        sys.modules[name] = ImportedOnFirstUse(name)


PROTOBUF_PURE_PYTHON = "google.protobuf.internal.python_message"
"""protobuf's pure-Python messages: see the module's docstring."""
