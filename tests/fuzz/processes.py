"""Watching a `vmsuper run` from a test: the plugin's lines, the run's processes, its tap."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

SYS_NET = Path("/sys/class/net")


def read_json_line(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    """The next JSON line the plugin prints (through vmsuper's stdout). vmsuper is killed if
    none comes in `timeout` seconds, so a run that hangs fails instead of blocking."""
    assert proc.stdout is not None
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in iter(proc.stdout.readline, ""):
            if line.startswith("{"):
                found: dict[str, Any] = json.loads(line)
                return found
    finally:
        timer.cancel()
    raise AssertionError(f"vmsuper ended, or was killed after {timeout} s, before the plugin said")


def descendants(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def all_gone(pids: set[int] | list[int], timeout: float = 10) -> bool:
    """Whether every pid has exited (a zombie about to be reaped counts as gone), waiting up
    to `timeout` seconds for the last ones."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return not alive
        time.sleep(0.05)


def taps_of(supervisor_pid: int) -> set[str]:
    """The tap devices a supervisor made: vmsuper names them vms + its pid (6 hex digits) + a
    counter, so parallel runs never see each other's."""
    prefix = f"vms{supervisor_pid:06x}"
    return {name for name in os.listdir(SYS_NET) if name.startswith(prefix)}


def vms_taps() -> set[str]:
    return {name for name in os.listdir(SYS_NET) if name.startswith("vms")}
