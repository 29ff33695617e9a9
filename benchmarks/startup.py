"""(d) Start-up: from the exec of `vmsuper run` to the plugin's first request and to the first
guest exit, and the whole run of a plugin that exits at once.

The harness reads CLOCK_MONOTONIC just before it executes vmsuper; the plugins stamp the same
clock. To show where the time goes, the Python interpreter's own start and the import of the
supervisor are timed alone as well.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from vmsuper.shared import kvm
from vmsuper.supervisor.config import PluginConfig
from vmsuper.supervisor.machine import create_machine
from vmsuper.supervisor.plugin_process import PluginProcess
from vmsuper.supervisor.sandbox import Sandbox

from .concurrent import children_cpu_s
from .context import Bench
from .served import NATIVE_SERVED, TRIVIAL_SERVED, Served
from .stats import summarize
from .vmrun import RunResult, RunSpec, log_event_times, run_vm, vmsuper_command

# What `vmsuper run` imports before it can serve the plugin (the CLI imports the runner).
SUPERVISOR_IMPORT = "import vmsuper.supervisor.cli, vmsuper.supervisor.runner"
# Imports timed alone (each over a bare interpreter's start): what a run imports before it can
# spawn its plugin (the CLI, its config, the launch), and two libraries of a run's start, each
# imported as vmsuper does: the config's (msgspec without typing_extensions, before the spawn)
# and the log's (structlog with stand-ins, while the plugin starts).
IMPORTS_ALONE = {
    "python: imports before the plugin's spawn": (
        "import vmsuper.supervisor.cli, vmsuper.supervisor.launch"
    ),
    "python: msgspec import, as a run does": "import vmsuper.supervisor.msgspec_import",
    "python: structlog import, as a run does": "import vmsuper.shared.logs",
}
# The plugins timed, and whether they run sandboxed (the default) or not (to show what the
# sandbox costs).
VARIANTS = {
    "native": ("native", True),
    "sdk": ("sdk", True),
    "native, no sandbox": ("native", False),
    # Handed to a `vmsuper serve` (started for the section): the same run, without the
    # interpreter's and the imports' start.
    NATIVE_SERVED: ("native", True),
}
# The sandbox's own start, timed apart (see _sandbox_start); a plugin that has not ended by
# the timeout (it exits at once) fails the section rather than hanging it.
SANDBOX_START = "sandbox: the plugin's spawn, set-up to main"
STAMP_TIMEOUT_S = 10.0
# Milestones of a trivial run in vmsuper's log, to split its whole time into set-up, the
# plugin's life, shutdown, and the interpreter's exit (after run_finished).
TRIVIAL_EVENTS = frozenset({"run_started", "plugin_started", "plugin_exited", "run_finished"})


def _ms(seconds: float) -> float:
    return seconds * 1e3


def _time_command(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def startup(bench: Bench) -> list[dict[str, Any]]:
    # Samples by (low latency, what); both settings in each round, so that a machine that
    # slows down during the section slows both alike.
    samples: dict[tuple[bool, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with Served() as served:
        for _ in range(bench.repeat):
            for ll in bench.low_latency:
                for variant, (plugin, sandbox) in VARIANTS.items():
                    env = served.env if variant == NATIVE_SERVED else {}
                    spec = bench.spec(plugin, "loop", 1, low_latency=ll, sandbox=sandbox, env=env)
                    run = run_vm(spec, bench.folder(f"startup-{plugin}"))
                    _sample(run, samples[ll, variant])
                for name, env in (("trivial", {}), (TRIVIAL_SERVED, served.env)):
                    spec = bench.spec(
                        "native", "trivial", low_latency=ll, expect_report=False, env=env
                    )
                    _trivial(bench, spec, served, samples[ll, name])
    rows: list[dict[str, Any]] = []
    for ll in bench.low_latency:
        for name in (*VARIANTS, "trivial", TRIVIAL_SERVED):
            figures = {f"{k}_ms": summarize(v) for k, v in samples[ll, name].items()}
            rows.append({"plugin": name, "low_latency": ll, **figures})
    rows.extend(_python_costs(bench))
    rows.append({"plugin": SANDBOX_START, "run_ms": summarize(_sandbox_start(bench))})
    rows.extend(_kvm_costs(bench))
    return rows


def _trivial(bench: Bench, spec: RunSpec, served: Served, into: dict[str, list[float]]) -> None:
    """One whole run of the trivial plugin: wall and CPU (the command's and everything below
    it, and for a served run the fork's and everything below it, which the server reaps)."""
    cpu_before = children_cpu_s() + served.children_cpu_s()
    run = run_vm(spec, bench.folder("startup-trivial"))
    into["run_cpu"].append(_ms(children_cpu_s() + served.children_cpu_s() - cpu_before))
    into["run"].append(_ms(run.wall_s))
    events = log_event_times(run)
    if events.keys() >= TRIVIAL_EVENTS:
        for event in TRIVIAL_EVENTS:
            into[f"to_{event}"].append(_ms(events[event]))


def _sample(run: RunResult, into: dict[str, list[float]]) -> None:
    """The milestones of one run, in ms from the exec of `vmsuper run`."""
    report = run.report
    first_exit = report["vcpus"][0]["t_first"]
    # From vmsuper's own log: its run starting (interpreter, config, the plugin's spawn and
    # structlog's import done) and the plugin started (VM, irqchip and shared memory set up).
    # Left out if the log lacks them.
    events = log_event_times(run)
    if {"run_started", "plugin_started"} <= events.keys():
        into["to_run_started"].append(_ms(events["run_started"]))
        into["to_plugin_started"].append(_ms(events["plugin_started"]))
    into["to_first_request"].append(_ms(report["t_first_request"] - run.t_exec))
    into["to_first_exit"].append(_ms(first_exit - run.t_exec))
    into["start_to_first_exit"].append(_ms(first_exit - report["t_start_sent"]))
    into["run"].append(_ms(run.wall_s))


def _python_command(statement: str) -> list[str]:
    """An interpreter that runs `statement` and ends as `vmsuper run` does, without the
    interpreter's teardown (`os._exit`), which would add the freeing of every module imported
    to what the imports cost a run."""
    return [sys.executable, "-c", f"{statement}\nimport os\nos._exit(0)"]


def _python_costs(bench: Bench) -> list[dict[str, Any]]:
    """The part of start-up that is Python's: a bare interpreter, and the supervisor's imports."""
    interpreter: list[float] = []
    imports: list[float] = []
    alone: dict[str, list[float]] = {name: [] for name in IMPORTS_ALONE}
    cli: list[float] = []
    for _ in range(bench.repeat):
        bare = _time_command(_python_command("pass"))
        interpreter.append(_ms(bare))
        imports.append(_ms(_time_command(_python_command(SUPERVISOR_IMPORT)) - bare))
        for name, statement in IMPORTS_ALONE.items():
            alone[name].append(_ms(_time_command(_python_command(statement)) - bare))
        cli.append(_ms(_time_command([*vmsuper_command(), "--version"])))
    return [
        {"plugin": "python: bare interpreter", "run_ms": summarize(interpreter)},
        {"plugin": "python: supervisor imports", "run_ms": summarize(imports)},
        *({"plugin": name, "run_ms": summarize(ms)} for name, ms in alone.items()),
        {"plugin": "vmsuper --version", "run_ms": summarize(cli)},
    ]


def _sandbox_start(bench: Bench) -> list[float]:
    """What the sandbox adds to a run's start before its plugin runs, in ms: from the first step
    of the spawned child (before it stages the sandbox's sources, becomes the plugin's user and
    executes bwrap) to the plugin's main, through bwrap's namespaces and mounts and the starter
    shell. The run's own spawn and sandbox (`PluginProcess.spawn`, `Sandbox.for_plugin`), in
    this process; the native plugin stamps its main (mode `stamp`)."""
    path = bench.programs.native_plugin
    sandbox = Sandbox.for_plugin(PluginConfig(path=path, args=("stamp",)))
    return [_spawn_stamped(path, sandbox) for _ in range(bench.repeat)]


def _spawn_stamped(path: Path, sandbox: Sandbox) -> float:
    """One spawn of the native plugin's `stamp` in `sandbox`: ms from the child's set-up to the
    plugin's main."""
    with contextlib.ExitStack() as stack:
        stamp_read, stamp_write = os.pipe()
        stack.callback(os.close, stamp_read)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stack.enter_context(ours)
        with theirs:
            try:
                plugin = PluginProcess.spawn(
                    path,
                    ["stamp"],
                    {},
                    theirs.fileno(),
                    sandbox=sandbox,
                    before_exec=functools.partial(_write_clock, stamp_write),
                )
            finally:
                os.close(stamp_write)
        stack.callback(plugin.close)
        stack.callback(plugin.wait)  # on the way out, also after a failure
        (set_up,) = struct.unpack("=d", os.read(stamp_read, 8))
        ended = select.poll()
        ended.register(plugin.pidfd, select.POLLIN)
        if not ended.poll(STAMP_TIMEOUT_S * 1000):
            plugin.kill()
            raise RuntimeError(f"the stamping plugin did not end within {STAMP_TIMEOUT_S:g} s")
        if (status := plugin.wait()) != 0:
            raise RuntimeError(f"the stamping plugin ended with wait status {status}")
        report = json.loads(os.read(plugin.stdout_fd, 4096))  # its one line, written by now
    return _ms(report["t_main"] - set_up)


def _write_clock(fd: int) -> None:
    """In the spawned child, before anything else: the clock now, on `fd`."""
    os.write(fd, struct.pack("=d", time.monotonic()))


def _kvm_costs(bench: Bench) -> list[dict[str, Any]]:
    """The kernel's part of every run's start and end: the VM as the supervisor makes it
    (`machine.create_machine`), and its close at once. Closing a VM whose in-kernel irqchip
    was just made waits for the kernel to settle it, and the PIT waits for grace periods as
    its interrupt reinjection is turned off; a run makes its VM early so as to close it
    settled (supervisor/machine.py), which this cannot reproduce alone: how long that close
    takes depends on the kernel's grace periods."""
    made: list[float] = []
    closed: list[float] = []
    with kvm.Kvm() as system:
        for _ in range(bench.repeat):
            start = time.monotonic()
            vm = create_machine(system)
            ready = time.monotonic()
            vm.close()
            made.append(_ms(ready - start))
            closed.append(_ms(time.monotonic() - ready))
    return [
        {"plugin": "kvm: a run's VM made (TSS, irqchip, PIT)", "run_ms": summarize(made)},
        {"plugin": "kvm: that VM closed", "run_ms": summarize(closed)},
    ]
