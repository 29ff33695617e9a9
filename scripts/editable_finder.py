"""Rewrite the import finder of vmsuper's editable install (`./dev`) as one that imports nothing.

vmsuper's packages live in folders of other names (pyproject.toml's package-dir), so setuptools
installs a checkout with an import finder, which a `.pth` file imports at every start of the
environment's interpreter. setuptools' finder imports pathlib and importlib.util for it: about
half of a bare interpreter's start here, which a regular install never pays, and which the
served `vmsuper run` (supervisor/serve_client.py) needs nothing of. The finder written here maps
the same packages to the same folders with the import system's own machinery, loaded before
any `.pth` file is read.

`./dev` runs it after each editable install. It rewrites, and compiles, the module setuptools
wrote, keeping its name, its `install()` and its `MAPPING` (which the sandbox reads to bind
the checkout for a Python plugin: `sandbox.finder_mapping`), so the `.pth` file and pip's
record of the install stay as they are.
"""

from __future__ import annotations

import py_compile
import sys
import sysconfig
from pathlib import Path

from vmsuper.supervisor.sandbox import finder_mapping

FINDER_GLOB = "__editable___vmsuper_*_finder.py"

# `_frozen_importlib_external` is importlib's path machinery, which the interpreter loads before
# `site`: importing it costs nothing.
TEMPLATE = '''\
"""vmsuper's checkout as an installed package, written by vmsuper's scripts/editable_finder.py
in place of setuptools' finder, which imports pathlib at every start of the interpreter."""

import sys

from _frozen_importlib_external import PathFinder, spec_from_file_location

MAPPING = {mapping!r}


class _CheckoutFinder:
    """The mapped packages, from their folders; their modules are found through each
    package's __path__, as for any installed package."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        folder = MAPPING.get(fullname)
        if folder is not None:
            return spec_from_file_location(
                fullname, folder + "/__init__.py", submodule_search_locations=[folder]
            )
        # A folder of the package's name on sys.path (a plugin's own `vmsuper` folder, say)
        # makes the package a namespace package there, which hides the mapped one: its
        # modules are then looked for in the mapped folder too, as setuptools' finder does.
        parent = fullname.rpartition(".")[0]
        if parent in MAPPING:
            return PathFinder.find_spec(fullname, [MAPPING[parent]])
        return None


def install():
    if _CheckoutFinder not in sys.meta_path:
        sys.meta_path.append(_CheckoutFinder)
'''


class FinderError(Exception):
    """The environment holds no finder that this script can rewrite."""


def render(mapping: dict[str, str]) -> str:
    """The lean finder's source for `mapping` (package name -> folder of its __init__.py)."""
    for package, folder in mapping.items():
        if not Path(folder, "__init__.py").is_file():  # a namespace package: not mapped here
            raise FinderError(f"package {package} maps to {folder}, which has no __init__.py")
    return TEMPLATE.format(mapping=dict(sorted(mapping.items())))


def rewrite(site_packages: Path) -> Path:
    """Rewrite and compile vmsuper's one finder in `site_packages`; returns its path."""
    finders = sorted(site_packages.glob(FINDER_GLOB))
    if len(finders) != 1:
        raise FinderError(f"{len(finders)} files match {site_packages}/{FINDER_GLOB}, not 1")
    finder = finders[0]
    mapping = finder_mapping(finder)
    if not mapping:
        raise FinderError(f"{finder} maps no package to a folder (no MAPPING)")
    text = render(mapping)
    if finder.read_text() != text:
        finder.write_text(text)
    # The interpreter runs with PYTHONDONTWRITEBYTECODE in places: compile it once, here.
    py_compile.compile(str(finder), doraise=True)
    return finder


def main() -> int:
    try:
        rewrite(Path(sysconfig.get_paths()["purelib"]))
    except (FinderError, OSError, py_compile.PyCompileError) as exc:
        print(f"editable_finder: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
