"""The host-wide runtime folder (shared/runtime.py): where it is, for whom."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from vmsuper.shared import runtime


@pytest.fixture
def user(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A non-root user without the override or XDG_RUNTIME_DIR."""
    monkeypatch.delenv(runtime.RUNTIME_VARIABLE, raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(runtime.os, "geteuid", lambda: 1234)
    return monkeypatch


def test_the_override_wins(user: pytest.MonkeyPatch) -> None:
    user.setenv(runtime.RUNTIME_VARIABLE, "/somewhere/else")
    user.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert runtime.runtime_folder() == "/somewhere/else"
    assert runtime.runtime_dir() == Path("/somewhere/else")


def test_root_uses_run(user: pytest.MonkeyPatch) -> None:
    user.setattr(runtime.os, "geteuid", lambda: 0)
    user.setenv("XDG_RUNTIME_DIR", "/run/user/0")
    assert runtime.runtime_folder() == "/run/vmsuper"


def test_a_user_uses_xdg_runtime_dir_else_the_temporary_folder(user: pytest.MonkeyPatch) -> None:
    assert runtime.runtime_folder() == f"{tempfile.gettempdir()}/vmsuper-1234"
    user.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert runtime.runtime_folder() == "/run/user/1234/vmsuper"
    assert runtime.runtime_dir() == Path("/run/user/1234/vmsuper")
