"""Run mypy over the whole project as the import names see it.

The code folders map to import names (supervisor/ is vmsuper.supervisor, ...) through
setuptools' package-dir, which mypy cannot follow in an editable install. So this lays out
.typecheck/vmsuper/ as symlinks to the real folders and checks that tree, plus tests/,
benchmarks/ and scripts/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = {"supervisor": "supervisor", "workers": "workers", "shared": "shared"}


def build_tree() -> Path:
    tree = ROOT / ".typecheck"
    pkg = tree / "vmsuper"
    pkg.mkdir(parents=True, exist_ok=True)
    wanted = {p.name: p for p in (ROOT / "vmsuper").iterdir() if p.name != "__pycache__"}
    wanted.update({name: ROOT / folder for name, folder in SUBPACKAGES.items()})
    for entry in pkg.iterdir():
        if entry.name not in wanted:
            entry.unlink()
    for name, target in wanted.items():
        link = pkg / name
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
    return tree


def main() -> int:
    tree = build_tree()
    targets = [str(tree / "vmsuper")]
    for folder in ("tests", "benchmarks", "scripts"):
        if any((ROOT / folder).glob("**/*.py")):
            targets.append(str(ROOT / folder))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *targets]
    env = {**os.environ, "MYPYPATH": str(tree)}
    return subprocess.call(cmd, cwd=tree, env=env)


if __name__ == "__main__":
    sys.exit(main())
