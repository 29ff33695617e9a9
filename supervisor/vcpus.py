"""The VCPUs of one VM: channels to the plugin, worker processes, runner threads, pause.

Lifecycle:

1. `VcpuSet(...)` (before the plugin starts): one channel per VCPU (a SOCK_SEQPACKET
   socketpair, or two pipes enlarged to 256 KiB) and one doorbell (two eventfds) per VCPU.
   Requests a plugin writes to a channel before Start wait there, unread.
2. `start()` (the plugin's Start): creates the VCPUs, forks one worker per VCPU while this
   process has no other thread, then starts one runner thread per VCPU. The supervisor's
   copies of the worker ends are closed; each runner keeps a write-only end of its own (for
   the exits it serves itself) until `shutdown`.
3. `pause(mask, token)`: records the token in each selected VCPU's slot, sets
   `immediate_exit` in the supervisor's own mapping of its `kvm_run`, and kicks its runner.
4. `worker_exited(vcpu)` when a worker's pidfd becomes readable: reaps it and describes an
   abnormal stop.
5. `shutdown()`: stops the runners and workers, reaps, closes every fd and mapping it owns.

The kick signal (`runners.KICK_SIGNAL`, SIGUSR1) gets a no-op Python handler when the set is
made. An event loop that uses `signal.set_wakeup_fd` sees a byte for each kick: ignore it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final, Literal

from vmsuper.shared import kvm, logs, wire
from vmsuper.shared.shm import SharedRegion
from vmsuper.shared.shm_doorbell import Doorbell
from vmsuper.supervisor import sandbox_user
from vmsuper.supervisor.busy_board import board_path
from vmsuper.supervisor.low_latency import LatencyHold
from vmsuper.supervisor.poll_gate import PollGate
from vmsuper.supervisor.runners import (
    RunnerExits,
    VcpuRunner,
    install_kick_handler,
    uninstall_kick_handler,
)
from vmsuper.workers import confine
from vmsuper.workers.worker_status import describe_exit

__all__ = ["TRANSPORTS", "VcpuSet", "VcpuSetError"]

TRANSPORTS: Final = ("socket", "pipes")
_U64_MASK: Final = (1 << 64) - 1


class VcpuSetError(OSError):
    """The VCPUs cannot be set up or started; `.errno` is what a Start request gets."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


class _Channel:
    """One VCPU's channel: the plugin's end(s) and the worker's end(s), as raw fds."""

    def __init__(self, transport: str) -> None:
        self.plugin: list[int] = []
        self.worker: list[int] = []
        self.runner = -1
        """The runner's own way to write to the plugin (`open_runner_end`), or -1."""
        self.pipes = transport != "socket"
        if transport == "socket":
            plugin_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.plugin.append(plugin_end.detach())
            self.worker.append(worker_end.detach())
            return
        try:
            request_read, request_write = os.pipe2(os.O_CLOEXEC)
            self.plugin.append(request_write)
            self.worker.append(request_read)
            response_read, response_write = os.pipe2(os.O_CLOEXEC)
            self.plugin.append(response_read)
            self.worker.append(response_write)
            for fd in (request_read, response_read):
                wire.enlarge_pipe(fd)
        except BaseException:
            self.close_plugin()
            self.close_worker()
            raise

    def open_runner_end(self) -> None:
        """Give the runner a way to write to the plugin that never blocks (call while the
        worker's ends are still open here): the socket again (it sends with MSG_DONTWAIT), or
        the response pipe's write end opened anew through /proc, a file description of its own
        whose O_NONBLOCK leaves the worker's blocking writes alone."""
        if self.runner >= 0:
            return
        if not self.pipes:
            self.runner = os.dup(self.worker[0])
            return
        self.runner = os.open(
            f"/proc/self/fd/{self.worker[1]}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
        )

    def close_plugin(self) -> None:
        _close_all(self.plugin)
        self.plugin = []

    def silence_runner_end(self) -> None:
        """Let the plugin see EOF once the worker's ends are gone, although the runner thread
        may still run: /dev/null takes the runner's fd number (closing it could hand the number
        to another file while the thread may still write to it)."""
        if self.runner < 0:
            return
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.dup2(null, self.runner, inheritable=False)
        finally:
            os.close(null)

    def close_runner_end(self) -> None:
        _close_all([self.runner] if self.runner >= 0 else [])
        self.runner = -1

    def close_worker(self) -> None:
        _close_all(self.worker)
        self.worker = []


def workers_user(configured: str | None) -> sandbox_user.PluginUser:
    """Who the VCPU workers run as for `[vm] worker_user` = `configured` (None: the first of
    `confine.WORKER_USERS` the host has); raises `sandbox_user.UserError`."""
    return sandbox_user.host_user(
        configured, key="[vm] worker_user", defaults=confine.WORKER_USERS, who="the VCPU workers"
    )


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class VcpuSet:
    """Every VCPU of one VM, from its channel to its worker and runner (see the module doc)."""

    def __init__(
        self,
        vm: kvm.Vm,
        *,
        count: int,
        transport: Literal["socket", "pipes"],
        region: SharedRegion,
        mmap_size: int,
        log_dir: Path,
        log_level: str,
        poll_ns: int = 0,
        low_latency: bool = False,
        worker_user: sandbox_user.PluginUser | None = None,
    ) -> None:
        """`poll_ns`: how long a worker and its runner poll for each other before they sleep
        (0: never); `low_latency`: hold /dev/cpu_dma_latency from `start` to `shutdown`
        (supervisor/low_latency.py); `worker_user`: who the workers become (`workers_user()`;
        None: its default)."""
        if not 1 <= count <= region.vcpus:
            raise ValueError(f"VCPU count {count} outside 1..{region.vcpus} (the shared region)")
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown VCPU transport {transport!r}; expected socket or pipes")
        if log_level.lower() not in logs.LEVELS:
            raise ValueError(f"unknown log level {log_level!r}")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("a VcpuSet must be made in the main thread (signal handlers)")
        self._previous_kick_handler = install_kick_handler()
        user = worker_user if worker_user is not None else workers_user(None)
        self._worker_ids = (user.uid, user.gid) if user.switch else (None, None)
        # Test-only (`confine.MISBEHAVE_VARIABLE`); a malformed value fails here, before Start.
        self._misbehave = [
            confine.misbehaviour_from_environment(i, os.environ) for i in range(count)
        ]
        self._vm = vm
        self.count = count
        self.transport = transport
        self._region = region
        self._mmap_size = mmap_size
        self._log_dir = log_dir
        self._log_level = log_level
        self._log = logs.get_logger()
        self._latency = LatencyHold() if low_latency else None
        self.started = False
        self._shut_down = False
        self._channels: list[_Channel] = []
        self._doorbells: list[Doorbell] = []
        self._vcpus: list[kvm.Vcpu] = []
        self._maps: list[mmap.mmap] = []
        self._runs: list[kvm.kvm_run] = []
        self._pids: dict[int, int] = {}
        self._pidfds: dict[int, int] = {}
        self._statuses: dict[int, str | None] = {}
        self._codes: dict[int, int] = {}
        self._runners: list[VcpuRunner] = []
        self.runner_failures = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        """Readable once a runner thread failed (`failed_runners` says which): its worker's
        next request would never be served, so the run must end."""
        self._barrier = threading.Barrier(count)
        slots = [region.slot(i) for i in range(count)]
        self.poll_gate = PollGate(
            [region.mailbox(i) for i in range(count)],
            poll_ns,
            exits=lambda: [slot.exits() for slot in slots],
            board_file=board_path(),
        )
        """Sets every VCPU's polling window from the host's CPU pressure and its busy VCPUs
        (this VM's and, on the user's board, other runs'): its first reading is taken at
        `start`, over the time since the set was made (before any VCPU polls); the caller
        ticks it from then on, when each tick says."""
        try:
            for i in range(count):
                self._channels.append(_Channel(transport))
                self._doorbells.append(Doorbell(region.mailbox(i)))
        except BaseException:
            self.poll_gate.close()
            self._close_everything()
            raise

    # -- channels ------------------------------------------------------------------------------

    def plugin_fds(self) -> list[int]:
        """The plugin's channel ends in VCPU order: one socket per VCPU, or per VCPU the pipe
        it writes requests to, then the pipe it reads responses from. The set keeps owning
        them until `close_plugin_fds` (or `shutdown`)."""
        return [fd for channel in self._channels for fd in channel.plugin]

    def close_plugin_fds(self) -> None:
        """Close the supervisor's copies of the plugin's ends (idempotent)."""
        for channel in self._channels:
            channel.close_plugin()

    # -- start -----------------------------------------------------------------------------

    def start(self) -> None:
        """Create the VCPUs, fork their workers, start their runners. Raises on failure, after
        undoing what it did (the set can still be shut down)."""
        if self.started:
            raise VcpuSetError(errno.EINVAL, "the VCPUs were already started")
        if self._shut_down:
            raise VcpuSetError(errno.ESHUTDOWN, "the VCPU set was shut down")
        others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        if others:
            raise VcpuSetError(
                errno.EBUSY, f"cannot fork VCPU workers while other threads run: {others}"
            )
        if self._latency is not None:  # before any VCPU runs: its Init exchange too
            self._latency.take(self._log)
        try:
            for i in range(self.count):
                vcpu = self._vm.create_vcpu(i)
                self._vcpus.append(vcpu)
                mapping, run = kvm.map_run(vcpu.fd, self._mmap_size)
                self._maps.append(mapping)
                self._runs.append(run)
            # Before any VCPU polls: on a host that was busy while this VM was being set up
            # (other VMs running, or starting with it), the VCPUs start without polling, as do
            # VCPUs that would fill the CPUs were they all busy (supervisor/poll_gate.py).
            self.poll_gate.tick()
            self._fork_workers()
        except BaseException:
            self._kill_workers()
            self._release_vcpus()
            self._release_latency()
            raise
        for channel in self._channels:
            channel.open_runner_end()
            channel.close_worker()
        gen_address = self._region.reader().gen_address
        for i in range(self.count):
            exits = RunnerExits(
                range_counts=self._region.range_counts(i),
                table_gen_address=gen_address,
                send_fd=self._channels[i].runner,
                pipes=self._channels[i].pipes,
                run_size=self._mmap_size,
                worker_pidfd=self._pidfds[i],
            )
            runner = VcpuRunner(
                vcpu=i,
                vcpu_fd=self._vcpus[i].fd,
                run=self._runs[i],
                mailbox=self._region.mailbox(i),
                doorbell=self._doorbells[i],
                slot=self._region.slot(i),
                barrier=self._barrier,
                log=self._log,
                exits=exits,
                failed_fd=self.runner_failures,
            )
            self._runners.append(runner)
            runner.start()
        self.started = True
        self._log.info("vcpu_workers_started", vcpus=self.count, workers=list(self._pids.values()))

    def _fork_workers(self) -> None:
        # The workers' own modules (exit engine, protocol, worker loop): `vmsuper run` imports
        # them while its plugin starts (supervisor/launch.py); other users of the set, here.
        from vmsuper.workers.worker_process import STOP_SIGNALS, WorkerSpec, enter_worker

        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for i in range(self.count):
            uid, gid = self._worker_ids
            misbehave = self._misbehave[i]
            spec = WorkerSpec(
                vcpu=i,
                vcpu_fd=self._vcpus[i].fd,
                mmap_size=self._mmap_size,
                channel_fds=tuple(self._channels[i].worker),
                doorbell=self._doorbells[i],
                region=self._region,
                log_path=self._log_dir / logs.vcpu_log_name(i),
                log_level=self._log_level,
                confinement=confine.Confinement(uid=uid, gid=gid, misbehave=misbehave),
            )
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                pid = os.fork()
                if pid == 0:
                    enter_worker(spec, parent_pid=parent)  # never returns
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            self._pids[i] = pid
            try:
                self._pidfds[i] = os.pidfd_open(pid)
            except OSError:
                os.kill(pid, signal.SIGKILL)
                raise

    # -- pause -----------------------------------------------------------------------------

    def pause(self, mask: int, token: int) -> None:
        """Deliver `Wait{User{token}}` to every VCPU whose bit is set in `mask` (bits beyond
        the VCPU count are ignored); a later token overwrites one not yet delivered. Returns
        at once. Before Start the token waits for the VCPU's first run."""
        if mask < 0:
            raise ValueError(f"cpu mask {mask} is negative")
        if self._shut_down:
            return
        token &= _U64_MASK
        for i in range(min(self.count, mask.bit_length())):
            if not mask >> i & 1:
                continue
            self._region.slot(i).request_pause(token)
            if self.started:
                self._runs[i].immediate_exit = 1
                self._runners[i].kick()

    # -- workers ---------------------------------------------------------------------------

    def worker_pidfds(self) -> dict[int, int]:
        """VCPU -> pidfd of its worker (readable once it exits); owned by the set, valid until
        `shutdown`."""
        return dict(self._pidfds)

    def run_pages(self) -> list[kvm.kvm_run]:
        """The supervisor's own view of each VCPU's `kvm_run`, in VCPU order (from `start`
        until `shutdown`): read-only use, e.g. the pending exit of a VCPU out of the guest."""
        return list(self._runs)

    def worker_pids(self) -> dict[int, int]:
        return dict(self._pids)

    def worker_exited(self, vcpu: int) -> str | None:
        """Reap VCPU `vcpu`'s worker (call when its pidfd is readable: this waits for it).
        None when it stopped cleanly, else why it stopped (the caller names the VCPU, as
        `outcome.worker_failure` does)."""
        if vcpu in self._statuses:
            return self._statuses[vcpu]
        pid = self._pids[vcpu]
        _, status = os.waitpid(pid, 0)
        return self._record(vcpu, status)

    def _record(self, vcpu: int, wait_status: int) -> str | None:
        slot = self._region.slot(vcpu)
        if os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == signal.SIGSYS:
            reason: str | None = confine.describe_seccomp_kill(slot.trapped_syscall)
        else:
            reason = describe_exit(wait_status, slot.stop_reason)
        self._statuses[vcpu] = reason
        if vcpu < len(self._channels):
            # The plugin sees EOF on the channel of a VCPU whose worker is gone.
            self._channels[vcpu].silence_runner_end()
        if os.WIFEXITED(wait_status):
            self._codes[vcpu] = os.WEXITSTATUS(wait_status)
        return reason

    def worker_code(self, vcpu: int) -> int | None:
        """The exit code of a reaped worker (a `WorkerStatus`); None if it was killed or is
        not reaped yet."""
        return self._codes.get(vcpu)

    def failed_runners(self) -> list[tuple[int, str]]:
        """(VCPU, why) of each runner thread that ended early, the signal drained."""
        if self.runner_failures >= 0:
            with contextlib.suppress(OSError):  # BlockingIOError: none since the last call
                os.eventfd_read(self.runner_failures)
        return [(r.vcpu, r.failure) for r in self._runners if r.failure is not None]

    def stop_reason(self, vcpu: int) -> str:
        """Why VCPU `vcpu` stopped, as its worker recorded it."""
        return self._region.slot(vcpu).stop_reason

    # -- shutdown --------------------------------------------------------------------------

    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop everything and release every resource the set owns; idempotent.

        Runners are told to stop and kicked out of the guest, the Init barrier is broken,
        workers get SIGTERM (SIGKILL after `timeout`) and are reaped, then the fds (channels,
        doorbells, pidfds, VCPUs) and the `kvm_run` mappings are closed.
        """
        if self._shut_down:
            return
        self._shut_down = True
        self.poll_gate.close()
        self._release_latency()  # the VCPUs are stopped from here on
        deadline = time.monotonic() + timeout
        self._stop_runners()
        for vcpu, pid in self._pids.items():
            if vcpu not in self._statuses:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        self._reap_workers(deadline)
        self._join_runners(deadline)
        self._close_everything()
        if not any(runner.alive for runner in self._runners):  # a live one may still be kicked
            uninstall_kick_handler(self._previous_kick_handler)

    def _stop_runners(self) -> None:
        """Tell every runner to stop, and wake it wherever it waits: on its doorbell (ring),
        at the Init barrier (abort), in the guest (kick; `immediate_exit` covers a kick that
        comes just before it enters)."""
        for runner in self._runners:
            runner.stop()
        self._barrier.abort()
        for doorbell, runner in zip(self._doorbells, self._runners, strict=False):
            doorbell.ring_request()
            runner.kick()

    def _join_runners(self, deadline: float) -> None:
        for runner in self._runners:
            if not runner.join(max(0.0, deadline - time.monotonic()) + 0.5):
                self._log.error("runner_stuck", vcpu=runner.vcpu)

    def _reap_workers(self, deadline: float) -> None:
        waiting = {v: fd for v, fd in self._pidfds.items() if v not in self._statuses}
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # poll, not select: with many plugin objects the pidfds' numbers pass FD_SETSIZE.
            poller = select.poll()
            for fd in waiting.values():
                poller.register(fd, select.POLLIN)
            ready = {fd for fd, _ in poller.poll(remaining * 1000)}
            for vcpu in [v for v, fd in waiting.items() if fd in ready]:
                del waiting[vcpu]
                self.worker_exited(vcpu)
        for vcpu in waiting:
            self._log.error("worker_killed", vcpu=vcpu, reason="did not stop after SIGTERM")
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pids[vcpu], signal.SIGKILL)
            self.worker_exited(vcpu)

    def _kill_workers(self) -> None:
        """After a failed start: no worker may outlive it."""
        for vcpu, pid in self._pids.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._statuses[vcpu] = "killed: start failed"
        _close_all(self._pidfds.values())
        self._pidfds.clear()
        self._pids.clear()
        self._statuses.clear()

    def _release_latency(self) -> None:
        if self._latency is not None:
            self._latency.release()

    def _release_vcpus(self) -> None:
        # The ctypes views (ours and the runners') export the mappings: drop them first.
        self._runners.clear()
        self._runs.clear()
        for vcpu, mapping in enumerate(self._maps):
            try:
                mapping.close()
            except BufferError:
                self._log.error("run_page_left_mapped", vcpu=vcpu)
        self._maps.clear()
        for kvm_vcpu in self._vcpus:
            with contextlib.suppress(OSError):
                kvm_vcpu.close()
        self._vcpus.clear()

    def _close_everything(self) -> None:
        for channel in self._channels:
            channel.close_plugin()
            channel.close_worker()
        if any(runner.alive for runner in self._runners):
            # Its fds and mapping stay (the worker's pidfd too: the runner wakes the worker
            # through it): closing them under a live thread could hand the numbers to
            # something else while it still uses them.
            self._log.error("vcpus_left_open", reason="a runner thread did not stop")
            return
        _close_all(self._pidfds.values())
        self._pidfds.clear()
        for channel in self._channels:
            channel.close_runner_end()
        for doorbell in self._doorbells:
            with contextlib.suppress(OSError):
                doorbell.close()
        with contextlib.suppress(OSError):
            os.close(self.runner_failures)
        self.runner_failures = -1
        self._release_vcpus()
