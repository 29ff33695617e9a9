"""The import helpers of `shared/deferred_imports.py` (their use on a run's path is checked by
tests/test_cli.py and tests/test_config.py)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsuper.shared.deferred_imports import ImportedOnFirstUse, NotInstalled, OnFirstUse


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of a module on the path that nothing has imported."""
    name = f"vmsuper_probe_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_module_not_installed_for_the_block_imports_afterwards(probe: str) -> None:
    with NotInstalled(probe), pytest.raises(ImportError):
        importlib.import_module(probe)
    assert probe not in sys.modules
    assert importlib.import_module(probe).VALUE == 7


def test_a_module_imported_already_stays_usable_in_the_block(probe: str) -> None:
    module = importlib.import_module(probe)
    with NotInstalled(probe):
        assert importlib.import_module(probe) is module
    assert sys.modules[probe] is module


def test_what_the_block_put_in_its_place_is_left_alone(probe: str) -> None:
    stand_in = type(sys)(probe)
    with NotInstalled(probe):
        sys.modules[probe] = stand_in
    assert sys.modules[probe] is stand_in


def test_a_stand_in_taken_in_the_block_imports_its_module_on_first_use(probe: str) -> None:
    with OnFirstUse(probe):
        stand_in = importlib.import_module(probe)
    assert isinstance(stand_in, ImportedOnFirstUse)
    assert probe not in sys.modules  # the block took its stand-in back
    assert stand_in.VALUE == 7  # imported now
    assert sys.modules[probe].VALUE == 7 and sys.modules[probe] is not stand_in
