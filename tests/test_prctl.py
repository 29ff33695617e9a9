"""shared/prctl.py's option numbers against the kernel's own header, and its call."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from vmsuper.shared import prctl
from vmsuper.shared.libc_calls import check

OPTIONS = [name for name in prctl.__all__ if name.startswith("PR_")]


def test_every_option_is_the_kernel_s_number(tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("a C compiler (cc) is needed to check the prctl numbers")
    source, binary = tmp_path / "prctl.c", tmp_path / "prctl"
    prints = "".join(f'    printf("{name} %d\\n", {name});\n' for name in OPTIONS)
    head = "#include <stdio.h>\n#include <linux/prctl.h>\n"
    source.write_text(f"{head}int main(void) {{\n{prints}    return 0;\n}}\n")
    build = subprocess.run(
        [compiler, "-Wall", "-Werror", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, check=True)
    kernel = {
        name: int(value) for name, value in (line.split() for line in run.stdout.splitlines())
    }
    ours = {name: getattr(prctl, name) for name in OPTIONS}
    assert len(ours) == 9
    assert ours == kernel


def test_the_call_returns_the_result_and_leaves_errno_for_the_caller() -> None:
    names: list[bytes] = []

    def body() -> None:
        assert prctl.prctl(prctl.PR_SET_NAME, b"prctl-check") == 0
        buffer = ctypes.create_string_buffer(16)
        assert prctl.prctl(16, buffer) == 0  # PR_GET_NAME
        names.append(buffer.value)
        assert prctl.prctl(-1) == -1  # no such option
        names.append(errno.errorcode[ctypes.get_errno()].encode())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=10)
    assert names == [b"prctl-check", b"EINVAL"]


def test_a_failed_call_becomes_an_os_error_naming_it() -> None:
    flag = ctypes.c_int()
    check(prctl.prctl(prctl.PR_GET_CHILD_SUBREAPER, ctypes.byref(flag)), "get")  # 0: no error
    with pytest.raises(OSError) as info:
        check(prctl.prctl(-1), "option -1")
    assert info.value.errno == errno.EINVAL
    assert info.value.strerror == f"option -1: {os.strerror(errno.EINVAL)}"
