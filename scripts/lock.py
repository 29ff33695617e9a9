"""The dependency lock: what `./dev lock` writes and what the tests hold it to.

`requirements.lock` pins, with hashes, every distribution of the runtime and test environment
plus the build backend, for CPython 3.11 on x86-64 Linux. `./dev` installs exactly it
(``pip install --require-hashes --no-deps``) and then vmsuper itself without dependencies, so
a fresh clone gets the same environment tomorrow as today.

The lock's first line records a digest of the inputs it was made from (the dependency lists
of pyproject.toml), so a change to those lists without a new lock is caught by a test rather
than by a surprise on a fresh machine.

    python scripts/lock.py digest          print the digest of pyproject.toml's inputs
    python scripts/lock.py stamp FILE      prepend the digest line to a freshly compiled FILE
    python scripts/lock.py build-requires  print [build-system] requires, one a line
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
DIGEST_PREFIX = "# inputs-sha256: "
# The extras locked beside the runtime dependencies.
EXTRAS = ("test",)


def inputs(pyproject: Path = PYPROJECT) -> dict[str, list[str]]:
    """The requirement lists the lock is compiled from."""
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    found = {
        "dependencies": list(project.get("dependencies", [])),
        "build-system": list(data["build-system"]["requires"]),
    }
    for extra in EXTRAS:
        found[f"extra:{extra}"] = list(project["optional-dependencies"][extra])
    return found


def digest(pyproject: Path = PYPROJECT) -> str:
    canonical = json.dumps(inputs(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def recorded_digest(lock: Path = LOCK) -> str | None:
    """The digest on the lock's first line, or None when it has none."""
    with lock.open() as f:
        first = f.readline()
    return first.removeprefix(DIGEST_PREFIX).strip() if first.startswith(DIGEST_PREFIX) else None


def pins(lock: Path = LOCK) -> dict[str, str]:
    """Normalised distribution name -> pinned version, from the lock's ``name==version`` lines."""
    found: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if not line or line[0] in " #\t-":
            continue
        requirement = line.split(";")[0].split("\\")[0].strip()
        name, sep, version = requirement.partition("==")
        if sep:
            found[normalise(name)] = version.strip()
    return found


def normalise(name: str) -> str:
    """PEP 503 name normalisation."""
    return "-".join(name.replace("_", "-").replace(".", "-").lower().split("-"))


def stamp(path: Path) -> None:
    text = path.read_text()
    path.write_text(f"{DIGEST_PREFIX}{digest()}\n{text}")


def main(argv: list[str]) -> int:
    if argv == ["digest"]:
        print(digest())
    elif len(argv) == 2 and argv[0] == "stamp":
        stamp(Path(argv[1]))
    elif argv == ["build-requires"]:
        print("\n".join(inputs()["build-system"]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
