"""Finding a command on PATH: what shutil.which finds, without importing it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vmsuper.supervisor.which import which


def _tool(folder: Path, name: str, mode: int = 0o755) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def test_the_first_executable_on_the_path_is_found(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    _tool(first, "tool", 0o644)  # not executable: skipped
    (first / "dir").mkdir()
    found = _tool(second, "tool")
    path = os.pathsep.join(["", str(first), str(second)])
    assert which("tool", path) == str(found) == shutil.which("tool", path=path)
    assert which("dir", path) is None is shutil.which("dir", path=path)
    assert which("missing", path) is None


def test_a_name_with_a_slash_is_checked_as_it_is(tmp_path: Path) -> None:
    tool = _tool(tmp_path / "a", "tool")
    assert which(str(tool), "/nowhere") == str(tool)
    assert which(str(tmp_path / "a" / "other"), "/nowhere") is None


def test_the_environment_s_path_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = _tool(tmp_path / "bin", "only-here")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert which("only-here") == str(tool)
