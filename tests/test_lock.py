"""The dependency lock: it matches pyproject.toml, pins with hashes, and is what is installed."""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import lock  # noqa: E402

# Installed beside the lock by `python3 -m venv` (pip) and by `pip install -e .` (vmsuper).
NOT_LOCKED = {"pip", "vmsuper"}


def test_lock_was_made_from_the_current_pyproject() -> None:
    assert lock.recorded_digest() == lock.digest(), (
        "pyproject.toml's dependencies changed since requirements.lock was compiled: run ./dev lock"
    )


def test_digest_follows_every_input(tmp_path: Path) -> None:
    text = (ROOT / "pyproject.toml").read_text()
    changed = tmp_path / "pyproject.toml"
    for old, new in [
        ('"psutil>=6"', '"psutil>=7"'),
        ('"ruff==0.17.6"', '"ruff==0.17.7"'),
        ('"setuptools>=68"', '"setuptools>=69"'),
    ]:
        assert old in text
        changed.write_text(text.replace(old, new))
        assert lock.digest(changed) != lock.digest()


def test_every_requirement_is_pinned_within_its_range() -> None:
    pins = lock.pins()
    for group, requirements in lock.inputs().items():
        for line in requirements:
            requirement = Requirement(line)
            name = lock.normalise(requirement.name)
            assert name in pins, f"{group}: {name} is not in requirements.lock"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{group}: {line} does not admit the locked {name}=={pins[name]}"
            )


def test_every_pin_has_hashes() -> None:
    entries = lock.LOCK.read_text().split("\n")
    pinned = [i for i, line in enumerate(entries) if "==" in line and not line.startswith(" ")]
    assert len(pinned) == len(lock.pins()) > 10
    for i in pinned:
        assert entries[i].endswith("\\") and "--hash=sha256:" in entries[i + 1], entries[i]


def test_ci_gates_are_pinned_exactly() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["test"]
    for name in ("ruff", "mypy"):
        (line,) = [r for r in extras if Requirement(r).name == name]
        assert str(Requirement(line).specifier).startswith("=="), line


def test_the_environment_is_exactly_the_lock() -> None:
    """./dev installs the lock and nothing else; the suite runs in that environment."""
    pins = lock.pins()
    installed = {
        lock.normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }
    assert {n: v for n, v in installed.items() if n in pins} == pins
    assert set(installed) - set(pins) == NOT_LOCKED


def test_pins_parses_the_lock_format(tmp_path: Path) -> None:
    sample = tmp_path / "requirements.lock"
    sample.write_text(
        f"{lock.DIGEST_PREFIX}abc\n"
        "Typing_Extensions==4.16.0 \\\n"
        "    --hash=sha256:00\n"
        "    # via mypy\n"
        "zope.interface==7.0 ; python_version >= '3.11' \\\n"
        "    --hash=sha256:11\n"
    )
    assert lock.pins(sample) == {"typing-extensions": "4.16.0", "zope-interface": "7.0"}
    assert lock.recorded_digest(sample) == "abc"
