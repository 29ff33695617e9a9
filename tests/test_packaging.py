"""Packaging: only the vmsuper namespace is importable, and the console script works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import vmsuper


@pytest.mark.parametrize("name", ["supervisor", "workers", "shared"])
def test_no_top_level_module_leaks(tmp_path: Path, name: str) -> None:
    # From a neutral folder, so the repository itself is not on sys.path.
    proc = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "ModuleNotFoundError" in proc.stderr


@pytest.mark.parametrize(
    "name",
    ["vmsuper.supervisor.cli", "vmsuper.workers.main_worker", "vmsuper.shared.kvm"],
)
def test_namespaced_modules_import(tmp_path: Path, name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_console_script_reports_version(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "vmsuper"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert vmsuper.__version__ in proc.stdout
