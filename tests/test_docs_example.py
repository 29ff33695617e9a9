"""The plugin author's guide's complete example runs as documented, and the guide shows it as is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "plugin-guide.md"
EXAMPLES = REPO / "docs" / "examples"
EXPECTED_OUTPUT = ["guest: Hello from the guest!", "the guest doubled 21: 42"]


@pytest.mark.kvm
@pytest.mark.parametrize("transport", ["socket", "pipes"])
def test_minimal_example_prints_the_greeting_and_the_answer(tmp_path: Path, transport: str) -> None:
    env = os.environ.copy()
    # The example starts with `#!/usr/bin/env python3`: it must find this environment's.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    command = [sys.executable, "-m", "vmsuper", "run", str(EXAMPLES / "minimal.toml")]
    result = subprocess.run(
        [*command, "--log-dir", str(tmp_path / "logs"), "--transport", transport],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == EXPECTED_OUTPUT


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", GUIDE.read_text(), re.M | re.S)


def test_guide_shows_the_example_files_unchanged() -> None:
    assert (EXAMPLES / "minimal_plugin.py").read_text() in code_blocks("python")
    guest = (EXAMPLES / "minimal_guest.S").read_text()
    assert guest[guest.index("        mov") :] in code_blocks("asm")
    config = (EXAMPLES / "minimal.toml").read_text()
    assert config[config.index("[vm]") :] in code_blocks("toml")
    assert "\n".join(EXPECTED_OUTPUT) + "\n" in code_blocks("text")
