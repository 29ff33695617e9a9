"""The event loop's reply queue when the supervisor has no fd left to keep a reply's fds."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsuper.shared import logs
from vmsuper.shared.plugin_pb2 import MainRequest, MainResponse
from vmsuper.supervisor import launch as launching
from vmsuper.supervisor import runner
from vmsuper.supervisor.config import load_config

pytestmark = pytest.mark.kvm


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[runner.Supervisor]:
    """A set-up run's event loop, before any plugin (none is started here)."""
    config_path = tmp_path / "vm.toml"
    config_path.write_text('[plugin]\npath = "/bin/true"\nsandbox = false\n[log]\ndir = "logs"\n')
    config = load_config(config_path)
    log = logs.configure_logging(tmp_path / "supervisor.jsonl", level="info")
    run = runner.Run(config=config, log=log)
    launch = launching.Launch(config, log, launching.StopSignals())  # no plugin
    try:
        runner._set_up(run)
        sup = runner.Supervisor(run, launch)
        try:
            yield sup
        finally:
            for conn in list(sup.connections.values()):
                conn.close()
            sup.sel.close()
    finally:
        run.close()
        launch.close()
        logs.close_logging()


def test_a_reply_whose_fds_cannot_be_kept_is_undone_and_answered_emfile(
    supervisor: runner.Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor._add_connection(ours)
    conn = supervisor.connections[ours.fileno()]
    with contextlib.suppress(BlockingIOError):  # a plugin that does not read its replies
        while True:
            ours.send(b"x" * 1024)
    create = MainRequest(
        create=MainRequest.Create(id=7, irq_event=MainRequest.Create.IrqEvent(irq_id=5))
    )
    reply = supervisor.worker.handle(create.SerializeToString(), [])
    assert 7 in supervisor.worker.objects and len(reply.fds) == 2

    def out_of_fds(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    with monkeypatch.context() as patch:
        patch.setattr(runner.os, "dup", out_of_fds)
        supervisor._send(conn, reply.data, reply.fds, reply.close_after_send, reply.undo)
    data, fds = conn.pending[-1]
    assert fds == []
    response = MainResponse.FromString(data)
    assert response.WhichOneof("message") == "create" and response.errno == errno.EMFILE
    assert 7 not in supervisor.worker.objects  # the plugin never learnt of it: undone
    theirs.close()
