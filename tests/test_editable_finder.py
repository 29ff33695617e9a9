"""scripts/editable_finder.py: the checkout's import finder that `./dev` installs in place of
setuptools', which imported pathlib at every start of the environment's interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmsuper.supervisor.sandbox import finder_mapping

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import editable_finder  # noqa: E402

FINDER_NAME = "__editable___vmsuper_9_9_finder"

# The shape of setuptools' own finder, as an editable install writes it (abridged): an
# annotated MAPPING, and pathlib among its imports.
SETUPTOOLS_FINDER = """\
from __future__ import annotations
import sys
from pathlib import Path

MAPPING: dict[str, str] = {mapping!r}
NAMESPACES: dict[str, list[str]] = {{}}


def install():
    raise AssertionError("setuptools' finder was not replaced")
"""


def _checkout(root: Path) -> dict[str, str]:
    """A package `demo` whose subpackage `demo.inner` lives in a folder of another name, as
    vmsuper's do (pyproject.toml's package-dir)."""
    (root / "demo").mkdir()
    (root / "demo" / "__init__.py").write_text("NAME = 'demo'\n")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "__init__.py").write_text("")
    (root / "elsewhere" / "leaf.py").write_text("VALUE = 42\n")
    return {"demo": str(root / "demo"), "demo.inner": str(root / "elsewhere")}


def _site(tmp_path: Path, mapping: dict[str, str]) -> Path:
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / f"{FINDER_NAME}.py").write_text(SETUPTOOLS_FINDER.format(mapping=mapping))
    return site


def _fresh_interpreter(site: Path, code: str) -> object:
    """What `code` prints as JSON, run by an interpreter without `site` (`-S`, `-I`) that then
    imports the finder as the install's .pth file does."""
    prelude = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "before = set(sys.modules)\n"
        f"import {FINDER_NAME} as finder\n"
        "finder.install()\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_rewritten_finder_imports_the_mapped_packages_and_nothing_else(
    tmp_path: Path,
) -> None:
    mapping = _checkout(tmp_path)
    site = _site(tmp_path, mapping)
    editable_finder.rewrite(site)
    got = _fresh_interpreter(
        site,
        f"loaded = sorted(set(sys.modules) - before - {{{FINDER_NAME!r}}})\n"
        "import demo.inner.leaf\n"
        "print(json.dumps([loaded, demo.NAME, demo.inner.leaf.VALUE,\n"
        "                  demo.inner.leaf.__file__, demo.inner.__path__]))\n",
    )
    assert got == [
        [],
        "demo",
        42,
        str(tmp_path / "elsewhere" / "leaf.py"),
        [str(tmp_path / "elsewhere")],
    ]


def test_a_folder_of_the_package_s_name_on_the_path_does_not_hide_its_modules(
    tmp_path: Path,
) -> None:
    """A plugin script beside a `vmsuper` folder (a test's run folder, say) imports
    `vmsuper.plugin`: the folder, first on sys.path, makes `vmsuper` a namespace package."""
    mapping = _checkout(tmp_path)
    (tmp_path / "demo" / "mod.py").write_text("VALUE = 7\n")
    shadow = tmp_path / "scripts"
    (shadow / "demo").mkdir(parents=True)  # no __init__.py: a namespace portion
    site = _site(tmp_path, mapping)
    editable_finder.rewrite(site)
    got = _fresh_interpreter(
        site,
        f"sys.path.insert(0, {str(shadow)!r})\n"
        "import demo.mod, demo.inner.leaf\n"
        "print(json.dumps([list(demo.__path__), demo.mod.VALUE, demo.inner.leaf.VALUE]))\n",
    )
    assert got == [[str(shadow / "demo")], 7, 42]


def test_an_unmapped_package_is_left_to_the_other_finders(tmp_path: Path) -> None:
    site = _site(tmp_path, _checkout(tmp_path))
    editable_finder.rewrite(site)
    got = _fresh_interpreter(
        site,
        "try:\n"
        "    import elsewhere\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(json.dumps(exc.name))\n",
    )
    assert got == "elsewhere"


def test_the_sandbox_still_reads_the_folders_to_bind(tmp_path: Path) -> None:
    """A sandboxed Python plugin of the checkout needs its folders (sandbox.site_folders)."""
    mapping = _checkout(tmp_path)
    finder = editable_finder.rewrite(_site(tmp_path, mapping))
    assert finder_mapping(finder) == mapping


def test_a_second_rewrite_changes_nothing_and_compiles_the_module(tmp_path: Path) -> None:
    site = _site(tmp_path, _checkout(tmp_path))
    finder = editable_finder.rewrite(site)
    text, mtime = finder.read_text(), finder.stat().st_mtime_ns
    compiled = list((site / "__pycache__").glob(f"{FINDER_NAME}.*.pyc"))
    assert len(compiled) == 1
    compiled[0].unlink()
    assert editable_finder.rewrite(site) == finder
    assert (finder.read_text(), finder.stat().st_mtime_ns) == (text, mtime)
    assert len(list((site / "__pycache__").glob(f"{FINDER_NAME}.*.pyc"))) == 1


def test_refuses_a_folder_that_is_no_regular_package(tmp_path: Path) -> None:
    mapping = {**_checkout(tmp_path), "demo.space": str(tmp_path)}  # no __init__.py there
    with pytest.raises(editable_finder.FinderError, match=r"demo\.space maps to .*no __init__"):
        editable_finder.rewrite(_site(tmp_path, mapping))


@pytest.mark.parametrize("count", [0, 2])
def test_refuses_anything_but_one_finder(tmp_path: Path, count: int) -> None:
    site = tmp_path / "site-packages"
    site.mkdir()
    for n in range(count):
        (site / f"__editable___vmsuper_{n}_finder.py").write_text("MAPPING = {}\n")
    with pytest.raises(editable_finder.FinderError, match=f"^{count} files match"):
        editable_finder.rewrite(site)


def test_refuses_a_finder_without_a_mapping(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / f"{FINDER_NAME}.py").write_text("import sys\n")
    with pytest.raises(editable_finder.FinderError, match="no MAPPING"):
        editable_finder.rewrite(site)


def test_this_environment_starts_without_pathlib() -> None:
    """`./dev` replaced setuptools' finder in this environment: a bare start of its
    interpreter imports neither pathlib nor importlib.util."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; print([m for m in ('pathlib', 'importlib.util') if m in sys.modules])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    assert done.stdout == "[]\n", "setuptools' finder is back: ./dev replaces it"
