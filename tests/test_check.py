"""supervisor/check.py: `vmsuper check` on this host, on bad devices, and its verdict."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmsuper.supervisor import cgroups, check


def test_missing_device_is_a_clear_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "no-kvm-here"
    assert check.main([], kvm_path=str(path)) == 1
    captured = capsys.readouterr()
    assert f"cannot use KVM device {path}: No such file or directory" in captured.err
    assert captured.out == ""


def test_a_file_that_is_not_kvm_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plain-file"
    path.write_bytes(b"")
    assert check.main(["--device", str(path)]) == 1
    assert f"cannot use KVM device {path}: not a KVM device" in capsys.readouterr().err


def test_verdict_counts_only_required_items() -> None:
    results = [
        check.Result("irqchip", "KVM_CAP_IRQCHIP", True, True),
        check.Result("PIT2", "KVM_CAP_PIT2", True, False),
        check.Result("Hyper-V SynIC", "KVM_CAP_HYPERV_SYNIC", False, False),
    ]
    lines, ready = check.summarize(results)
    assert not ready
    assert lines == [
        "required:",
        "  ok   irqchip (KVM_CAP_IRQCHIP)",
        "  MISSING PIT2 (KVM_CAP_PIT2)",
        "optional:",
        "  absent (optional) Hyper-V SynIC (KVM_CAP_HYPERV_SYNIC)",
        "not ready: 1 required capability missing",
    ]
    lines, ready = check.summarize([results[0], results[2]])
    assert ready
    assert lines[-1] == "ready: every required capability is present"


def test_unknown_option_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        check.main(["--frobnicate"])
    assert info.value.code == 2
    assert "vmsuper check" in capsys.readouterr().err


@pytest.mark.kvm
def test_this_host_is_ready(capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "KVM device /dev/kvm: accessible (read/write)"
    assert out[1] == "KVM API version: 12"
    for label, name in check.REQUIRED_CAPS:
        assert f"  ok   {label} ({name})" in out
    assert "  ok   dirty page logging (KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG)" in out
    for label, name in check.OPTIONAL_CAPS:
        assert f"  ok   {label} ({name})" in out or (f"  absent (optional) {label} ({name})" in out)
    assert [line for line in out if "plugin limits (cgroups)" in line] == [
        f"  ok   plugin limits (cgroups) ({cgroups.probe()[1]})"
    ]
    assert out[-1] == "ready: every required capability is present"


@pytest.mark.kvm
def test_cgroup_support_is_reported(tmp_path: Path) -> None:
    assert cgroups.probe()[0], cgroups.probe()[1]  # this host can limit plugins
    assert re.fullmatch(r"(memory|pids|cpu)(\+\w+)* on v[12](, .*)?", cgroups.probe()[1])
    empty = tmp_path / "cgroup"
    (empty / "unified").mkdir(parents=True)
    assert cgroups.probe(empty) == (False, "the memory controller is not available")


def test_missing_tap_device_is_optional(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tun = tmp_path / "no-tun"
    status = check.run_check("/dev/kvm", tun_path=str(tun), out=sys.stdout, err=sys.stderr)
    assert status == 0
    out = capsys.readouterr().out
    assert f"  absent (optional) tap devices ({tun}: No such file or directory)" in out


SANDBOX_OK = "  ok   plugin sandbox (bwrap with unprivileged user namespaces)"


def _check_in(env: dict[str, str], *, prefix: list[str] | None = None) -> tuple[int, str]:
    """`vmsuper check` as a command, with `env`, behind `prefix` (an argv)."""
    proc = subprocess.run(
        [*(prefix or []), sys.executable, "-m", "vmsuper", "check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.kvm
def test_the_sandbox_is_tried_for_real() -> None:
    status, out = _check_in(dict(os.environ))
    assert status == 0, out
    assert SANDBOX_OK in out.splitlines()


@pytest.mark.kvm
def test_missing_bwrap_is_not_ready() -> None:
    status, out = _check_in({**os.environ, "PATH": "/nonexistent"})
    assert status == 1, out
    assert "  MISSING plugin sandbox (cannot sandbox the plugin: bwrap (bubblewrap) is not" in out
    assert out.rstrip().endswith("not ready: 1 required capability missing")


@pytest.mark.kvm
def test_user_namespaces_refused_is_not_ready() -> None:
    unshare = shutil.which("unshare")
    assert unshare is not None
    # A user namespace of our own in which no further one may be made: what bwrap meets on a
    # host with unprivileged user namespaces switched off.
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    prefix = [unshare, "--user", "--map-root-user", "sh", "-c", script, "sh"]
    status, out = _check_in(dict(os.environ), prefix=prefix)
    assert status == 1, out
    assert (
        "  MISSING plugin sandbox (cannot sandbox the plugin: the kernel refuses unprivileged"
        " user namespaces (user.max_user_namespaces = 0)"
    ) in out
    assert "set [plugin] sandbox = false to run it unconfined" in out
