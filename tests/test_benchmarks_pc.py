"""The PC benchmark section's harness: stamping marks of a boot's output, the table, the target.

No KVM: a stand-in command prints the marks; the boots themselves run in `./dev bench`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The harness is not installed: it runs from the checkout, as `python -m benchmarks`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import pc, report
from benchmarks.vmrun import RunError

# The stand-in shrinks its stdout pipe to one page and fills it with the banner (padded with
# spaces), so that its next write blocks until the harness has read the banner out of the pipe:
# the two are read apart, with no polling.
STAND_IN = """
import fcntl, os, sys
page = fcntl.fcntl(1, fcntl.F_SETPIPE_SZ, 4096)
banner = b"\\x1bcSeaBIOS (version x)\\n"
os.write(1, banner + b" " * (page - len(banner)))
os.write(1, b"Booting from Hard Disk...\\nBoot sector: hello\\n")
sys.exit(int(sys.argv[1]))
"""


def test_timed_boot_stamps_each_mark_in_order(tmp_path: Path) -> None:
    boot = pc.timed_boot([sys.executable, "-c", STAND_IN, "33"], tmp_path)
    assert boot.status == pc.EXPECTED_STATUS
    marks = boot.marks_s
    assert list(marks) == ["banner", "booting", "boot_sector"]
    assert marks["banner"] < marks["booting"] <= marks["boot_sector"] <= boot.exit_s
    assert b"Boot sector: hello" in boot.stdout


def test_timed_boot_rejects_a_wrong_status(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="exited with status 3"):
        pc.timed_boot([sys.executable, "-c", STAND_IN, "3"], tmp_path)


def _row(machine: str, boot_sector_s: float) -> dict:
    summary = {"median": boot_sector_s, "min": boot_sector_s, "max": boot_sector_s, "runs": 1}
    row = {"machine": machine, "to_exit_s": summary, "to_boot_sector_s": summary}
    row |= {"to_banner_s": summary, "to_booting_s": summary}
    return row


def test_the_pc_target_compares_the_boot_sector_times() -> None:
    rows = [_row("vmsuper-pc", 3.0), _row("qemu+kvm", 4.0)]
    rows[0]["exits"] = {"exits:uart": 10}
    (goal,) = report.targets({"pc": rows})
    assert goal["measured"] == pytest.approx(0.75)
    assert goal["met"] is True
    rows[0]["plugin_share_pct"] = {"median": 2.5, "min": 2.0, "max": 3.0, "runs": 3}
    text = report.render({"pc": rows}, [goal])
    assert "2.5 [2.0-3.0]" in text
    assert "exits:uart 10" in text and "vmsuper-pc" in text and "qemu+kvm" in text
    (slower,) = report.targets({"pc": [_row("vmsuper-pc", 5.0), _row("qemu+kvm", 4.0)]})
    assert slower["met"] is False


def test_the_plugin_summary_gives_exits_and_the_share_spent_serving_them() -> None:
    line = (
        "vmsuper-pc: exits by device: pci 548, uart 498, debug-exit 1; memory remaps: 16; "
        "handling exits: 90 ms of 4.50 s (2.0%)\n"
    )
    exits, share = pc.plugin_summary("noise\n" + line)
    assert exits == {"exits:pci": 548, "exits:uart": 498, "exits:debug-exit": 1}
    assert share == pytest.approx(2.0)
    assert pc.plugin_summary("no summary") == ({}, None)
