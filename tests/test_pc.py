"""The PC machine (vmsuper-pc) end to end: Debian's SeaBIOS boots real disks on real KVM.

Also its command line, whose errors come before any VM exists (no KVM needed for those).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmsuper.pc.demo_disk import MESSAGE, boot_sector, demo_image, disk_image
from vmsuper.testing import VmResult, VmRunner, VmSpec

REPO = Path(__file__).resolve().parent.parent
BIOS = Path("/usr/share/seabios/bios.bin")
PC = Path(sys.executable).parent / "vmsuper-pc"
BANNER = "SeaBIOS (version 1.16.2-debian-1.16.2-1)"
BOOTING = "Booting from Hard Disk..."
DEBUG_EXIT_STATUS = 33  # (0x10 << 1) | 1
BOOT_TIMEOUT = 300.0  # SeaBIOS runs instruction by instruction on an emulating KVM


def boot(vmsuper: VmRunner, disk: Path, *extra: str, vcpus: int = 1) -> VmResult:
    """Run vmsuper-pc on `disk`; its folder is shown to the plugin, writable, if sandboxed."""
    spec = VmSpec(
        args=["--bios", str(BIOS), "--disk", str(disk), *extra],
        mounts=[(disk.parent, None, True)],
        vcpus=vcpus,
    )
    return vmsuper.run(str(PC), spec, timeout=BOOT_TIMEOUT)


def in_order(text: str, *parts: str) -> bool:
    position = 0
    for part in parts:
        found = text.find(part, position)
        if found < 0:
            return False
        position = found + len(part)
    return True


@pytest.mark.kvm
@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_seabios_boots_the_demo_disk(vmsuper: VmRunner, tmp_path: Path) -> None:
    disk = tmp_path / "demo.img"
    disk.write_bytes(demo_image())
    result = boot(vmsuper, disk, "--snapshot")
    assert result.status == DEBUG_EXIT_STATUS, result.stderr
    assert in_order(
        result.stdout,
        BANNER,
        BOOTING,
        "Boot sector: reading sector 1 through INT 13h",
        MESSAGE.decode().strip(),
    ), result.stdout
    assert "the guest wrote 0x10 to port 0xf4" in result.stderr


@pytest.mark.kvm
@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_seabios_wakes_the_second_vcpu_and_boots(vmsuper: VmRunner, tmp_path: Path) -> None:
    disk = tmp_path / "demo.img"
    disk.write_bytes(demo_image())
    result = boot(vmsuper, disk, "--snapshot", "--debugcon", vcpus=2)
    assert result.status == DEBUG_EXIT_STATUS, result.stdout + result.stderr
    # SeaBIOS counts the application processors that ran its wake-up code (INIT, SIPI).
    assert "debugcon: Found 2 cpu(s) max supported 2 cpu(s)" in result.stderr
    assert MESSAGE.decode().strip() in result.stdout


@pytest.mark.kvm
@pytest.mark.timeout(2 * BOOT_TIMEOUT + 60)
def test_a_boot_sector_writes_a_sector_and_snapshot_keeps_the_image(
    vmsuper: VmRunner, tmp_path: Path
) -> None:
    source = (REPO / "tests" / "guests" / "pc_write_boot.S").read_text()
    image = disk_image(boot_sector(source), {})
    written = b"written by the boot sector\r\n"

    snapshot = tmp_path / "snapshot.img"
    snapshot.write_bytes(image)
    result = boot(vmsuper, snapshot, "--snapshot")
    assert result.status == DEBUG_EXIT_STATUS, result.stdout + result.stderr
    assert "read back: " + written.decode().strip() in result.stdout
    assert hashlib.sha256(snapshot.read_bytes()).digest() == hashlib.sha256(image).digest()

    disk = tmp_path / "disk.img"
    disk.write_bytes(image)
    result = boot(vmsuper, disk)
    assert result.status == DEBUG_EXIT_STATUS, result.stdout + result.stderr
    after = disk.read_bytes()
    assert after[2 * 512 : 3 * 512] == written.ljust(512, b"\0")
    assert after[: 2 * 512] == image[: 2 * 512] and after[3 * 512 :] == image[3 * 512 :]


@pytest.mark.kvm
@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_bios_is_write_protected_smbios_is_ours_debugcon_logs_and_a_reset_ends_the_run(
    vmsuper: VmRunner, tmp_path: Path
) -> None:
    source = (REPO / "tests" / "guests" / "pc_probe_boot.S").read_text()
    disk = tmp_path / "probe.img"
    disk.write_bytes(disk_image(boot_sector(source), {}))
    result = boot(vmsuper, disk, "--debugcon")
    assert result.status == 0, result.stdout + result.stderr
    assert "f-segment: read-only" in result.stdout
    # SeaBIOS placed the tables vmsuper-pc gave through fw_cfg (its own would say "Bochs").
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "SMBIOS product: vmsuper-pc" in lines, result.stdout
    assert "the guest asked for a reset (port 0xcf9 = 0x06)" in result.stderr
    # SeaBIOS logs to port 0x402 only when it reads back 0xe9 there.
    assert f"debugcon: {BANNER}" in result.stderr
    assert "debugcon: Running on QEMU (i440fx)" in result.stderr
    assert "debugcon: QEMU fw_cfg DMA interface supported" in result.stderr


@pytest.mark.kvm
@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_com1_input_reaches_the_guest(vmsuper: VmRunner, tmp_path: Path) -> None:
    source = (REPO / "tests" / "guests" / "pc_echo_boot.S").read_text()
    disk = tmp_path / "echo.img"
    disk.write_bytes(disk_image(boot_sector(source), {}))
    typed = tmp_path / "typed.fifo"
    os.mkfifo(typed)
    # Held open for writing, so that the plugin's open of the FIFO does not wait for a writer.
    line = os.open(typed, os.O_RDWR | os.O_CLOEXEC)
    try:
        spec = VmSpec(
            args=[
                *("--bios", str(BIOS), "--disk", str(disk), "--snapshot"),
                *("--serial-input", str(typed)),
            ],
            mounts=[(tmp_path, None, True)],
        )
        proc, _, _ = vmsuper.start(str(PC), spec)
        assert proc.stdout is not None
        seen = ""
        while not seen.endswith("ready\n"):  # the boot sector waits for the line now
            char = proc.stdout.read(1)
            assert char, f"vmsuper-pc ended before the boot sector was ready: {seen!r}"
            seen += char
        os.write(line, b"hello, guest\n")
    finally:
        os.close(line)
    result = vmsuper.finish(proc, timeout=BOOT_TIMEOUT)
    assert result.status == DEBUG_EXIT_STATUS, seen + result.stdout + result.stderr
    assert "got: hello, guest" in result.stdout


def run_pc(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CROSVM_SOCKET"}
    return subprocess.run(
        [str(PC), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--disk", "x.img"], "the following arguments are required: --bios"),
        (["--bios", str(BIOS), "--disk", "{missing}"], "No such file or directory"),
        (["--bios", "{odd}", "--disk", "{odd}"], "a multiple of 64 KiB"),
        (["--bios", str(BIOS), "--disk", "{odd}"], "not a positive multiple of 512"),
        (["--bios", str(BIOS), "--disk", "{empty}"], "0 bytes, not a positive multiple of 512"),
        (["--bios", str(BIOS), "--disk", "{good}", "--memory", "1"], "--memory 1: expected"),
        (["--bios", str(BIOS), "--disk", "{good}", "--memory", "lots"], "invalid int value"),
        (["--bios", str(BIOS), "--disk", "{good}", "--serial", "/nonexistent/x"], "--serial"),
        (["--bios", str(BIOS), "--disk", "{good}", "--sample-ms", "-1"], "--sample-ms -1"),
        (["--bios", str(BIOS), "--disk", "{good}", "--serial-input", "{missing}"], "--serial-in"),
    ],
)
def test_command_line_errors_exit_2_before_any_vm(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "odd.img").write_bytes(bytes(700))
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "good.img").write_bytes(bytes(1024))
    names = {n: str(tmp_path / f"{n}.img") for n in ("missing", "odd", "empty", "good")}
    result = run_pc(*(a.format(**names) for a in args))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_outside_vmsuper_it_says_how_to_run_it(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1024))
    result = run_pc("--bios", str(BIOS), "--disk", str(disk))
    assert result.returncode == 2
    assert "CROSVM_SOCKET is not set" in result.stderr and "vmsuper plugin" in result.stderr


@pytest.mark.kvm
@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_configs_pc_toml_boots_sandboxed_as_shipped(tmp_path: Path) -> None:
    """The shipped config, beside a demo disk built the way ./dev builds it at set-up."""
    config = tmp_path / "pc.toml"
    config.write_text((REPO / "configs" / "pc.toml").read_text())
    (tmp_path / "pc-demo.img").write_bytes(demo_image())
    env = os.environ.copy()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    vmsuper = Path(sys.executable).parent / "vmsuper"
    result = subprocess.run(
        [str(vmsuper), "run", str(config), "--log-dir", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=BOOT_TIMEOUT,
        check=False,
    )
    assert result.returncode == DEBUG_EXIT_STATUS, result.stderr
    assert in_order(result.stdout, BANNER, BOOTING, MESSAGE.decode().strip())
    # Only the sandbox shows the disk at /pc/disk.img: the boot proves the mount worked.
    assert "sandbox =" not in config.read_text()
