"""Turning the sections' rows into ratios, targets and the printed tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from .concurrent import FORWARD_MODE, references_by_batch
from .context import DEFAULT_PATH
from .served import NATIVE_SERVED, SERVED, TRIVIAL_SERVED
from .stats import paired_ratio, ratio

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], str]]

# One VCPU on an idle host, per exit, against crosvm's architecture (the `pipe` reference).
MAX_CROSVM_RATIO: Final = {"pipes": 1.0, "socket": 1.2}
MAX_TWO_VCPU_CROSVM_RATIO: Final = 1.5
MAX_CPU_RATIO: Final = 1.5  # CPU time per exit against the reference's
# K VMs at once, wall time against K copies of the reference, by (K, batch length): 4 VMs of
# 100,000 exits each, 8 of 20,000 (with the default N).
MAX_CONCURRENT_RATIO: Final = {(4, "long"): 1.5, (8, "short"): 1.8}
SERVED_STARTUP: Final = (NATIVE_SERVED, TRIVIAL_SERVED)
MAX_POLL_PENALTY: Final = 1.0  # the default path against poll_us = 0, under load
MAX_FIRST_REQUEST_MS: Final = 90.0
MAX_TRIVIAL_RUN_MS: Final = 120.0
MAX_WORKER_USS_MIB: Final = 12.0
# What a target's figure cannot go below on the machine that ran it, from the same run. With
# more busy VMs than CPUs no core is free to poll on, and an exit takes the wake-ups of its
# process layout: the `forward` reference is that layout in C with nothing of vmsuper's own.
# (Two VCPUs of one VM have no such floor: now and then a core is free, and polling takes a
# run below `forward`.) A run started from the command line cannot ask its plugin anything
# before the interpreter has started and made the imports that come before the plugin's spawn,
# and the sandbox has started the plugin; nor end before it has made all of its imports (the
# sandbox starts while the last imports are made). The VM's release comes after those too, but
# a run makes its VM early so that its release is short (supervisor/machine.py), and how short
# depends on the kernel's grace periods, which no timing of the harness's own reproduces: the
# floor leaves it out (it is lower for that, and still a floor).
FORWARD_FLOOR: Final = {
    "pipes": "the forward layout in C",
    "socket": "the forward layout in C, over sockets",
}
FIRST_REQUEST_FLOOR: Final = (
    ("python: bare interpreter", "the interpreter"),
    ("python: imports before the plugin's spawn", "the imports before the spawn"),
    ("sandbox: the plugin's spawn, set-up to main", "the sandbox's start"),
)
TRIVIAL_RUN_FLOOR: Final = (
    ("python: bare interpreter", "the interpreter"),
    ("python: supervisor imports", "all imports"),
)


def add_ratios(exit_rows: list[Row], reference_rows: list[Row]) -> None:
    """Put vmsuper's per-exit time over the reference's beside each exit figure.

    `vs_crosvm`, the goals' ratio, is taken round by round against the `pipe` runs made in the
    exit section's own rounds (`crosvm_us_per_exit`); results from before those runs, and the
    other ratios, take the medians of section (b), measured minutes apart. `vs_forward` is
    over the `forward` reference of the row's transport."""
    name = {
        "pipe": "vs_crosvm",
        "socket": "vs_crosvm_socket",
        "relay": "vs_relay",
        "forward": "vs_forward",
        "forward_socket": "vs_forward",
        "inline": "vs_floor",
    }
    for row in exit_rows:
        forward = FORWARD_MODE[row["transport"]]
        own_crosvm = row.get("crosvm_us_per_exit")
        if own_crosvm is not None:
            row["vs_crosvm"] = paired_ratio(row["us_per_exit"], own_crosvm)
        for ref in reference_rows:
            if (ref["vcpus"], ref["low_latency"]) != (row["vcpus"], row["low_latency"]):
                continue
            if ref["mode"] in FORWARD_MODE.values() and ref["mode"] != forward:
                continue
            if ref["mode"] == "pipe" and own_crosvm is not None:
                continue  # taken round by round above
            row[name[ref["mode"]]] = ratio(
                row["us_per_exit"]["median"], ref["us_per_exit"]["median"]
            )


def add_cpu_ratios(cpu_rows: list[Row], reference_rows: list[Row]) -> None:
    """Put vmsuper's CPU time per exit over the `pipe` reference's beside each cpu row (the
    goal's ratio: crosvm's own layout), and over the reference's of the row's transport (how
    far vmsuper is from its transport's own cost: a socket's calls cost more than a pipe's).

    Round by round against the references run in the cpu section's own rounds where the row
    has them (`crosvm_cpu_us`, `transport_cpu_us`); else the medians of section (b)."""
    same_transport = {"pipes": "pipe", "socket": "socket"}
    for row in cpu_rows:
        if "crosvm_cpu_us" in row and "transport_cpu_us" in row:
            row["cpu_vs_crosvm"] = paired_ratio(row["total_us"], row["crosvm_cpu_us"])
            row["cpu_vs_transport"] = paired_ratio(row["total_us"], row["transport_cpu_us"])
            continue
        for ref in reference_rows:
            if (ref["vcpus"], ref["low_latency"]) != (1, row["low_latency"]):
                continue
            if "cpu_us_per_exit" not in ref:
                continue
            cpu = ratio(row["total_us"]["median"], ref["cpu_us_per_exit"]["median"])
            if ref["mode"] == "pipe":
                row["cpu_vs_crosvm"] = cpu
            if ref["mode"] == same_transport[row["transport"]]:
                row["cpu_vs_transport"] = cpu


def targets(sections: dict[str, list[Row]]) -> list[Row]:
    """The goals vmsuper is held to, each with what was measured and whether it was met, and
    where the run has one, the figure's floor on this machine (`floor`, what it is made of in
    `floor_of`): a target whose floor is above its limit cannot be met here."""
    found: list[Row] = []

    def add(
        name: str,
        limit: float,
        measured: float | None,
        unit: str,
        floor: tuple[float, str] | None = None,
    ) -> None:
        met = measured is not None and measured <= limit
        goal = {"target": name, "limit": limit, "measured": measured, "unit": unit, "met": met}
        if floor is not None:
            goal["floor"], goal["floor_of"] = floor
        found.append(goal)

    exit_rows = sections.get("exits", [])
    for row in exit_rows:
        default = row.get("path", DEFAULT_PATH) == DEFAULT_PATH
        if not (default and row["plugin"] == "native" and "vs_crosvm" in row):
            continue
        ll = " low_latency" if row["low_latency"] else ""
        if row["vcpus"] == 1:
            add(
                f"native plugin {row['transport']} per exit / crosvm reference{ll}",
                MAX_CROSVM_RATIO[row["transport"]],
                row["vs_crosvm"],
                "x",
            )
        elif row["low_latency"]:
            add(
                f"native plugin {row['transport']}, {row['vcpus']} VCPUs, per exit / crosvm"
                f" reference{ll}",
                MAX_TWO_VCPU_CROSVM_RATIO,
                row["vs_crosvm"],
                "x",
            )
        without_polling = _same_setting(exit_rows, row, "c")
        if without_polling is not None:
            add(
                f"native plugin {row['transport']}, {_vcpus(row['vcpus'])}, default per exit"
                f" / poll_us 0 per exit{ll}",
                MAX_POLL_PENALTY,
                paired_ratio(row["us_per_exit"], without_polling["us_per_exit"]),
                "x",
            )
    for row in sections.get("cpu", []):
        if row["path"] == DEFAULT_PATH and "cpu_vs_crosvm" in row:
            ll = " low_latency" if row["low_latency"] else ""
            add(
                f"CPU per exit, {row['transport']} / crosvm reference's{ll}",
                MAX_CPU_RATIO,
                row["cpu_vs_crosvm"],
                "x",
            )
    concurrent = sections.get("concurrent", [])
    references = references_by_batch(concurrent)
    for row in concurrent:
        if row["what"] not in ("vmsuper", SERVED) or row["path"] != DEFAULT_PATH:
            continue
        # Results from before the long batch have no `length`: theirs were all short.
        limit = MAX_CONCURRENT_RATIO.get((row["vms"], row.get("length", "short")))
        served = ", served by vmsuper serve" if row["what"] != "vmsuper" else ""
        batch = f"{row['vms']} VMs x {row['exits_each']:,} exits at once, {row['transport']}"
        if limit is not None:
            add(
                f"{batch}{served}, wall / {row['vms']} references",
                limit,
                row.get("wall_vs_reference"),
                "x",
                _forward_floor(row, references),
            )
        if served:
            continue
        unpolled = _same_setting(concurrent, row, "c", BATCH_SETTING)
        if unpolled is not None:
            add(
                f"{batch}, default wall / poll_us 0 wall",
                MAX_POLL_PENALTY,
                paired_ratio(row["wall_s"], unpolled["wall_s"]),
                "x",
            )
    first_request_floor = _startup_floor(sections, FIRST_REQUEST_FLOOR)
    trivial_run_floor = _startup_floor(sections, TRIVIAL_RUN_FLOOR)
    for row in sections.get("startup", []):
        ll = " low_latency" if row.get("low_latency") else ""
        served = ", served by vmsuper serve" if row["plugin"] in SERVED_STARTUP else ""
        if row["plugin"] in ("native", NATIVE_SERVED):
            add(
                f"exec to the plugin's first request{served}{ll}",
                MAX_FIRST_REQUEST_MS,
                row["to_first_request_ms"]["median"],
                "ms",
                None if served else first_request_floor,
            )
        if row["plugin"] in ("trivial", TRIVIAL_SERVED):
            add(
                f"whole run of a trivial plugin{served}{ll}",
                MAX_TRIVIAL_RUN_MS,
                row["run_ms"]["median"],
                "ms",
                None if served else trivial_run_floor,
            )
    rows = {r["machine"]: r for r in sections.get("pc", [])}
    if {"vmsuper-pc", "qemu+kvm"} <= rows.keys():
        ours = rows["vmsuper-pc"]["to_boot_sector_s"]
        qemu = rows["qemu+kvm"]["to_boot_sector_s"]
        add("PC: exec to the boot sector's output / QEMU+KVM's", 1.0, paired_ratio(ours, qemu), "x")
    worker_uss = [
        r["worker_uss_mib"]["max"] for r in sections.get("memory", []) if "worker_uss_mib" in r
    ]
    if worker_uss:
        add("USS per VCPU worker (largest)", MAX_WORKER_USS_MIB, max(worker_uss), "MiB")
    return found


def _vcpus(count: int) -> str:
    return f"{count} VCPU{'s' if count != 1 else ''}"


EXIT_SETTING: Final = ("plugin", "transport", "vcpus", "low_latency")
BATCH_SETTING: Final = ("what", "vms", "exits_each", "transport")


def _same_setting(
    rows: list[Row], row: Row, path: str, setting: Sequence[str] = EXIT_SETTING
) -> Row | None:
    """The row measured as `row` was (the same values of the keys in `setting`), but along
    `path`."""
    for other in rows:
        if other.get("path") == path and all(other[k] == row[k] for k in setting):
            return other
    return None


def _forward_floor(
    row: Row, references: dict[tuple[int, int, str], Row]
) -> tuple[float, str] | None:
    """The batch of the `forward` reference of `row`'s transport over `pipe`'s batch, with as
    many VMs and exits: the floor of `row`'s batch."""
    transport = row["transport"]
    forward = references.get((row["vms"], row["exits_each"], FORWARD_MODE[transport]))
    if forward is None or forward.get("wall_vs_reference") is None:
        return None
    return forward["wall_vs_reference"], FORWARD_FLOOR[transport]


def _startup_floor(
    sections: dict[str, list[Row]], parts: Sequence[tuple[str, str]]
) -> tuple[float, str] | None:
    """The sum of the start-up section's rows named in `parts` (medians), and their labels."""
    rows = {r["plugin"]: r for r in sections.get("startup", [])}
    if not all(name in rows for name, _ in parts):
        return None
    total = sum(rows[name]["run_ms"]["median"] for name, _ in parts)
    return total, " + ".join(label for _, label in parts)


def verdict(goal: Row) -> str:
    """met, missed, or missed with a floor above the limit: out of reach on that machine."""
    if goal["met"]:
        return "met"
    if goal.get("floor", 0.0) > goal["limit"]:
        return "missed (floor above the limit)"
    return "missed"


def floor_text(goal: Row) -> str:
    if "floor" not in goal:
        return "-"
    return f"{goal['floor']:.2f} {goal['unit']} ({goal['floor_of']})"


def _summary(key: str, digits: int = 1) -> Callable[[Row], str]:
    def show(row: Row) -> str:
        s = row.get(key)
        if s is None:
            return "-"
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"

    return show


def _value(key: str, fmt: str = "{}") -> Callable[[Row], str]:
    def show(row: Row) -> str:
        value = row.get(key)
        return "-" if value is None else fmt.format(value)

    return show


def _rate(key: str) -> Callable[[Row], str]:
    def show(row: Row) -> str:
        return f"{row[key]['median']:,.0f}"

    return show


def _on_off(row: Row) -> str:
    value = row.get("low_latency")
    return "-" if value is None else "on" if value else "off"


def _exits(row: Row) -> str:
    exits = row.get("exits")
    if not exits:
        return "-"
    return ", ".join(f"{name} {count}" for name, count in exits.items())


def _cpus(row: Row) -> str:
    placed = row.get("cpus") or []
    if not any(placed):
        return "-"
    return " | ".join(", ".join(f"{r}/{w}" for r, w in vm) for vm in placed)


_LL: Final = ("low_lat", _on_off)
_PATH: Final = ("path", _value("path"))
_PER_EXIT: Final = ("us/exit median [min-max]", _summary("us_per_exit"))

COLUMNS: Final[dict[str, list[Column]]] = {
    "exits": [
        ("plugin", _value("plugin")),
        ("transport", _value("transport")),
        ("vcpus", _value("vcpus")),
        _LL,
        _PATH,
        _PER_EXIT,
        ("exits/s", _rate("exits_per_s")),
        ("crosvm us/exit", _summary("crosvm_us_per_exit")),
        ("x crosvm", _value("vs_crosvm", "{:.2f}")),
        ("x crosvm(sock)", _value("vs_crosvm_socket", "{:.2f}")),
        ("x relay", _value("vs_relay", "{:.2f}")),
        ("x forward", _value("vs_forward", "{:.2f}")),
        ("x floor", _value("vs_floor", "{:.1f}")),
    ],
    "reference": [
        ("mode", _value("mode")),
        ("vcpus", _value("vcpus")),
        _LL,
        _PER_EXIT,
        ("exits/s", _rate("exits_per_s")),
        ("CPU us/exit", _summary("cpu_us_per_exit")),
    ],
    "async": [
        ("plugin", _value("plugin")),
        ("transport", _value("transport")),
        _LL,
        _PER_EXIT,
        ("exits/s", _rate("exits_per_s")),
    ],
    "ioeventfd": [
        ("vcpus", _value("vcpus")),
        _LL,
        ("us/write median [min-max]", _summary("us_per_write", 2)),
        ("writes/s", _rate("writes_per_s")),
    ],
    "cpu": [
        ("transport", _value("transport")),
        _LL,
        _PATH,
        ("wall us/exit", _summary("wall_us")),
        ("sup main", _summary("supervisor_main_us")),
        ("sup runner", _summary("supervisor_runner_us")),
        ("worker", _summary("vcpu_worker_us")),
        ("plugin", _summary("plugin_us")),
        ("CPU total", _summary("total_us")),
        ("crosvm CPU", _summary("crosvm_cpu_us")),
        ("x crosvm CPU", _value("cpu_vs_crosvm", "{:.2f}")),
        ("x same-transport ref CPU", _value("cpu_vs_transport", "{:.2f}")),
    ],
    "startup": [
        ("what", _value("plugin")),
        _LL,
        ("exec->log run_started ms", _summary("to_run_started_ms")),
        ("exec->log plugin_started ms", _summary("to_plugin_started_ms")),
        ("exec->1st request ms", _summary("to_first_request_ms")),
        ("exec->1st exit ms", _summary("to_first_exit_ms")),
        ("Start->1st exit ms", _summary("start_to_first_exit_ms")),
        ("exec->log run_finished ms", _summary("to_run_finished_ms")),
        ("whole run ms", _summary("run_ms")),
        ("whole run CPU ms", _summary("run_cpu_ms")),
    ],
    "memory": [
        ("vcpus", lambda r: str(r.get("vcpus", r.get("growth")))),
        _LL,
        ("sup USS MiB", _summary("supervisor_uss_mib")),
        ("sup PSS MiB", _summary("supervisor_pss_mib")),
        ("worker USS MiB", _summary("worker_uss_mib")),
        ("worker PSS MiB", _summary("worker_pss_mib")),
        ("total USS MiB", _summary("total_uss_mib")),
        ("total PSS MiB", _summary("total_pss_mib")),
        ("Start->all running ms", _summary("start_ms")),
        ("held CPU ms/s", _summary("held_cpu_ms_per_s", 2)),
        ("held switches/s", _summary("held_switches_per_s")),
        ("+USS/VCPU MiB", _value("per_added_vcpu_uss_mib", "{:.2f}")),
        ("+PSS/VCPU MiB", _value("per_added_vcpu_pss_mib", "{:.2f}")),
    ],
    "concurrent": [
        ("what", _value("what")),
        ("VMs", _value("vms")),
        ("transport", _value("transport")),
        _PATH,
        ("exits each", _value("exits_each", "{:,}")),
        ("wall s", _summary("wall_s", 2)),
        ("CPU s", _summary("cpu_s", 2)),
        ("CPU us/exit", _summary("cpu_us_per_exit")),
        ("x ref wall", _value("wall_vs_reference", "{:.2f}")),
        ("x ref CPU", _value("cpu_vs_reference", "{:.2f}")),
        ("x forward wall", _value("wall_vs_forward", "{:.2f}")),
        ("x forward CPU", _value("cpu_vs_forward", "{:.2f}")),
    ],
    "placement": [
        ("VMs", _value("vms")),
        ("vcpus", _value("vcpus")),
        ("placement", _value("placement")),
        ("runner/worker CPUs", _cpus),
        ("exits each", _value("exits_each", "{:,}")),
        _PER_EXIT,
        ("x free", _value("vs_free", "{:.2f}")),
    ],
    "pc": [
        ("machine", _value("machine")),
        ("exec->banner s", _summary("to_banner_s", 2)),
        ("exec->Booting s", _summary("to_booting_s", 2)),
        ("exec->boot sector s", _summary("to_boot_sector_s", 2)),
        ("exec->exit s", _summary("to_exit_s", 2)),
        ("in plugin %", _summary("plugin_share_pct", 1)),
        ("VCPU exits (mean per boot)", _exits),
    ],
}

TITLES: Final = {
    "exits": (
        "a. Exit round trips through vmsuper (per exit: median [min-max] of the runs;"
        " path: c+poll = the defaults, c = poll_us 0, python = every exit in Python, before the"
        " exit engine; crosvm = crosvm's architecture (the reference's pipe mode) in the same"
        " rounds, and x crosvm over it round by round; the other ratios over section b's"
        " medians; x forward = over the forward reference of the row's transport)"
    ),
    "reference": (
        "b. C reference, same VM and guest (inline = floor, pipe = crosvm's architecture,"
        " relay = vmsuper's process layout with every exit through the worker, forward = the"
        " same as vmsuper serves a plain exit: one hand-off less; forward_socket = forward over"
        " a socket pair)"
    ),
    "async": "c. Async-write exits (1 VCPU; the plugin only drains)",
    "ioeventfd": "c. ioeventfd writes (in-kernel, no exit)",
    "cpu": (
        "Where an exit's time goes: CPU us per exit by thread (native plugin, 1 VCPU); crosvm"
        " CPU = the pipe reference's CPU per exit in the same rounds; the ratios round by round"
        " over it and over the reference of the row's transport"
    ),
    "startup": "d. Start-up (from the exec of vmsuper run)",
    "memory": "e. Memory while the VM runs and the plugin waits",
    "concurrent": (
        "f. K one-VCPU VMs at once against K C references (pipe = crosvm's architecture; relay,"
        " forward = the floor of vmsuper's process layout, forward as vmsuper serves plain exits;"
        " forward_socket = forward over a socket pair); wall and CPU of each batch, start-up"
        " included; x ref = over pipe; x forward = over the forward of the row's transport;"
        " ratios round by round"
    ),
    "placement": (
        "f2. Runner threads and workers pinned by hand (native plugin, pipes, default path; per"
        " VCPU and exit; runner/worker CPUs: per VCPU, VMs apart by |); x free = over the"
        " scheduler's own placement"
    ),
    "pc": (
        "g. The PC machine beside QEMU: SeaBIOS boots the demo disk (median [min-max] of the"
        " boots; exits: by device as vmsuper-pc counts them, by kind as vmsuper does)"
    ),
}


def table(columns: Sequence[Column], rows: Sequence[Row]) -> str:
    cells = [[head for head, _ in columns]] + [[show(r) for _, show in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def render(sections: dict[str, list[Row]], goals: list[Row]) -> str:
    parts = []
    for name, rows in sections.items():
        parts.append(f"{TITLES[name]}\n{table(COLUMNS[name], rows)}")
    if goals:
        lines = ["Targets"]
        for g in goals:
            measured = "-" if g["measured"] is None else f"{g['measured']:.2f}"
            floor = f", floor {floor_text(g)}" if "floor" in g else ""
            lines.append(
                f"  {verdict(g).upper():6}  {g['target']}: {measured} {g['unit']}"
                f" (limit {g['limit']:g} {g['unit']}{floor})"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
