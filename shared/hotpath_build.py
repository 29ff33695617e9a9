"""How the C hot path (`hotpath.c`) becomes the cffi module `vmsuper.shared._hotpath`.

cffi's API mode: the declarations below are what Python may call and read, and the module cffi
generates from them is compiled together with `hotpath.c` itself, so the C compiler checks
every prototype and every struct field against the real definitions (a mismatch fails the
build, or the module's first use for a struct's size). The shared-memory structs and enums
are declared from `abi.py`, as `vms_abi.h` is. `setup.py` names this file in
``cffi_modules``, so `pip install -e .` (and `./dev`, when one of these files changes) builds it.

The module also carries a digest of the files it was built from (`hotpath_source.py`), so a
stale build is refused with the command that rebuilds it instead of being misread.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
_source = runpy.run_path(str(HERE / "hotpath_source.py"))

_abi = runpy.run_path(str(HERE / "abi.py"))

# The shared-memory structs and enums come from abi.py; the rest is hotpath.c's and seqlock.c's.
CDEF = """
struct kvm_run;

struct vms_runner {
    int64_t vcpu_fd;
    struct kvm_run *run;
    struct vms_mail *mail;
    int64_t request_efd;
    int64_t done_efd;
    uint32_t *request_seen;
    const uint64_t *pause_seq;
    const uint64_t *delivered_seq;
    int64_t hold_runs;
    int64_t stopping;
    uint64_t spin_ns;
    int64_t error;
    int64_t held_run;
};

struct vms_access {
    uint64_t space;
    uint64_t address;
    uint64_t is_write;
    uint64_t offset;
    uint64_t length;
    uint64_t size;
    uint64_t count;
};

struct vms_worker {
    struct kvm_run *run;
    uint64_t run_size;
    struct vms_mail *mail;
    int64_t request_efd;
    int64_t done_efd;
    uint32_t *done_seen;
    uint64_t *counters;
    uint64_t *run_state;
    struct vms_stats *stats;
    const uint64_t *table_gen;
    uint64_t known_gen;
    const struct vms_counted_range *ranges;
    uint64_t n_ranges;
    uint64_t *range_counts;
    uint64_t hint_set;
    uint64_t hint_space;
    uint64_t hint_address;
    uint64_t hint_on_write;
    uint64_t pipes;
    int64_t in_fd;
    int64_t out_fd;
    uint8_t *buf;
    uint64_t max_request;
    uint64_t max_fds;
    uint64_t spin_ns;
    int64_t wake_fd;
    uint64_t report_exits;
    uint64_t state;
    int64_t error;
    uint64_t request_len;
    uint64_t refusal;
    uint64_t fds;
    struct vms_access access;
    int64_t range_index;
    uint64_t delivered;
    uint64_t response_ns;
};

#define VMS_SOURCE_DIGEST ...

int vms_watch_signal(int sig);
int vms_unwatch_signal(int sig);
int vms_take_signal(void);
int vms_bell_ring(struct vms_bell *bell, int efd);
int vms_bell_wait(struct vms_bell *bell, int efd, uint32_t *seen, uint64_t spin_ns, int wake_fd);
int vms_runner_loop(struct vms_runner *r);
int vms_worker_loop(struct vms_worker *w);
int vms_send(struct vms_worker *w, const uint8_t *msg, size_t length);
int vms_receive(struct vms_worker *w);
void vms_begin_wait(struct vms_worker *w, uint64_t state);
void vms_resumed(struct vms_worker *w);
void vms_finish_access(struct vms_worker *w, const uint8_t *data, size_t size);
int vms_decode_access(const struct kvm_run *run, uint64_t run_size, struct vms_access *a);
int64_t vms_find_range(const struct vms_counted_range *ranges, uint64_t n, uint64_t space,
                       uint64_t address);
size_t vms_encode_io_wait(uint8_t *out, uint64_t space, uint64_t address, int is_write,
                          int no_resume, const uint8_t *data, size_t length);
int vms_plain_resume(const uint8_t *p, size_t n, size_t *offset, size_t *length);

uint64_t vms_seq_begin(uint64_t *gen);
uint64_t vms_seq_end(uint64_t *gen);
uint64_t vms_seq_publish(uint64_t *gen, uint8_t *dst, const uint8_t *src, size_t n);
uint64_t vms_seq_read(const uint64_t *gen, uint8_t *dst, const uint8_t *src, size_t n);

int vms_trap_syscalls(uint64_t *cell);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(_abi["cdef"]() + CDEF)
ffibuilder.set_source(
    "vmsuper.shared._hotpath",
    # One translation unit: the generated wrappers see hotpath.c's own definitions.
    f"#define VMS_SOURCE_DIGEST {_source['digest'](HERE)}ULL\n"
    '#include "hotpath.c"\n#include "seqlock.c"\n',
    include_dirs=[str(HERE)],
    depends=[str(HERE / name) for name in _source["SOURCES"]],
    extra_compile_args=[
        "-O2",
        "-std=gnu11",
        "-Wall",
        # What cffi's checks of a declaration against a definition turn into: errors.
        "-Werror=incompatible-pointer-types",
        "-Werror=int-conversion",
        "-Werror=implicit-function-declaration",
        "-Werror=discarded-qualifiers",
    ],
)
