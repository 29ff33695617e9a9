"""What one plugin may make the supervisor hold, and the errno it gets at each limit.

Every limit has a default sized for real plugins (crosvm's test plugins stay far below them)
and can be set in the config's [limits] table.
"""

from __future__ import annotations

from typing import Final, NamedTuple

MAX_VCPUS: Final = 64
"""PauseVcpus carries a 64-bit mask, so no VCPU may have an index above 63."""


class Limits(NamedTuple):
    """Per-VM resource limits, enforced by the main worker and the event loop.

    A NamedTuple rather than a frozen dataclass: `vmsuper run` imports it before it starts
    the plugin, where a dataclass would cost the creation of its methods and the import of
    dataclasses (with inspect)."""

    # Main connections open at once, the first included. NewConnection beyond -> EMFILE.
    connections: int = 64
    # Live objects (memory, io events, irq events), all kinds together. Create -> ENOSPC.
    objects: int = 4096
    # Memory objects (KVM memory slots). Create memory -> ENOSPC.
    memory_slots: int = 256
    # Total guest memory of all memory objects, in bytes. Create memory -> ENOSPC.
    guest_memory: int = 64 << 30
    # Reserved ranges in both spaces together. ReserveRange -> ENOSPC.
    reserved_ranges: int = 1024
    # Routes in one SetIrqRouting (KVM's own limit is 4096). More -> EINVAL, as KVM answers.
    irq_routes: int = 4096
    # Bytes in one main request. Larger -> an EMSGSIZE response, the message dropped.
    request_size: int = 1 << 20
    # File descriptors attached to one main request. More -> EINVAL, all of them closed.
    fds_per_message: int = 4
    # RLIMIT_NOFILE of the plugin process (soft and hard).
    plugin_open_files: int = 4096
    # The plugin's cgroup (supervisor/cgroups.py); 0 = no limit. Bytes of memory: beyond it
    # the kernel's OOM killer stops the plugin.
    plugin_memory: int = 8 << 30
    # Processes and threads of the plugin together (pids.max, and RLIMIT_NPROC).
    plugin_processes: int = 1024
    # CPU time of the plugin, in cores (cpu.max / cfs_quota_us over a 100 ms period).
    plugin_cpu: float = 2.0
    # Bytes of the plugin's output kept in the run's logs, per stream (stderr records in
    # supervisor.jsonl, plugin-stdout.log). Beyond: a `plugin_output_capped` record, and
    # the rest only passed on to vmsuper's stdout and stderr.
    plugin_log_bytes: int = 8 << 20
    # Records of the plugin's stderr in supervisor.jsonl (one per line, or per piece of a
    # long line). Beyond: as for plugin_log_bytes.
    plugin_log_lines: int = 65536
