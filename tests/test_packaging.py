"""Packaging: only the vmsuper namespace is importable, the console script works, and the C
hot path is built by the package build."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vmsuper
from vmsuper.shared import hotpath_source

ROOT = Path(__file__).resolve().parent.parent


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


def test_cffi_builds_the_hot_path_and_runs_it() -> None:
    """cffi is needed at build time (the build runs without isolation, from the lock) and at
    run time (the compiled module imports `_cffi_backend`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirement = re.compile(r"cffi\b")
    assert any(requirement.match(r) for r in project["build-system"]["requires"])
    assert any(requirement.match(r) for r in project["project"]["dependencies"])
    assert 'cffi_modules=["shared/hotpath_build.py:ffibuilder"]' in (ROOT / "setup.py").read_text()


def test_dev_rebuilds_the_hot_path_when_a_source_changes() -> None:
    """`./dev` recompiles when any file the module's digest covers is newer than its stamp;
    a file missing here would leave a stale module that `hotpath` then refuses."""
    dev = (ROOT / "dev").read_text()
    for name in hotpath_source.SOURCES:
        assert f"[ shared/{name} -nt $built ]" in dev, name
