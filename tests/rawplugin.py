"""Prelude for test plugins that speak raw protobuf to the supervisor.

Test plugins are real processes started by vmsuper; this source is pasted at the top of each
(see `plugin_source`) so a test can drive the wire protocol byte for byte and print its
findings as JSON on stdout for the test to check.
"""

from __future__ import annotations

import textwrap

PRELUDE = '''
import errno, json, mmap, os, signal, socket, struct, sys, time, fcntl
from vmsuper.shared import plugin_pb2 as pb, wire

MAIN = socket.socket(fileno=int(os.environ["CROSVM_SOCKET"]))
RESULTS = {}

def call(request, fds=(), sock=None):
    """One MainRequest -> (MainResponse, fds). The response must carry the request's case."""
    sock = sock or MAIN
    wire.send_datagram(sock, request.SerializeToString(), list(fds))
    dgram = wire.recv_datagram(sock)
    assert dgram is not None, "supervisor hung up"
    response = pb.MainResponse.FromString(dgram.data)
    case = request.WhichOneof("message")
    if case is not None:
        assert response.WhichOneof("message") == case, (case, response)
    return response, dgram.fds

def errno_of(request, fds=(), sock=None):
    response, got = call(request, fds, sock)
    for fd in got:
        os.close(fd)
    return response.errno

def req(**kwargs):
    return pb.MainRequest(**kwargs)

def sealed_memfd(size, seal=True):
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, 1033, 0x0002)  # F_ADD_SEALS, F_SEAL_SHRINK
    return fd

def create_memory(obj_id, start, length, fd=None, **kw):
    fd = sealed_memfd(length) if fd is None else fd
    try:
        return errno_of(req(create=pb.MainRequest.Create(
            id=obj_id, memory=pb.MainRequest.Create.Memory(start=start, length=length, **kw))),
            fds=[fd])
    finally:
        os.close(fd)

def supervisor_fds():
    return len(os.listdir(f"/proc/{os.getppid()}/fd"))

def report():
    print(json.dumps(RESULTS), flush=True)
'''


WAIT_FOR_SHUTDOWN = """
call(req(start=pb.MainRequest.Start()))
_, fds = call(req(get_shutdown_eventfd=pb.MainRequest.GetShutdownEventfd()))
print(json.dumps({"pid": os.getpid()}), flush=True)
os.eventfd_read(fds[0])  # blocks until the VM shuts down
sys.exit(0)
"""
"""A plugin body: start the VCPUs, print the plugin's pid as a JSON line, then wait until
vmsuper shuts the VM down."""


def plugin_source(body: str) -> str:
    """A complete plugin: the prelude, then the test's own code (dedented)."""
    return PRELUDE + "\n" + textwrap.dedent(body)
