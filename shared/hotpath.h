/*
 * The hot path's interface to Python: the loops' contexts and every function Python calls.
 * hotpath.c and seqlock.c define them; hotpath_build.py hands this very file (less its
 * preprocessor lines) to cffi's cdef, so the declarations exist once and the C compiler checks
 * the generated wrappers against them. The shared-memory structs come from vms_abi.h.
 */
#ifndef VMS_HOTPATH_H
#define VMS_HOTPATH_H
#include <stddef.h>
#include <stdint.h>
#include "vms_abi.h"

struct kvm_run;

struct vms_runner {
    int64_t vcpu_fd;
    struct kvm_run *run;
    struct vms_mail *mail;
    int64_t request_fd; /* the request bell's pipe, read end: waited on */
    int64_t done_fd;    /* the done bell's pipe, write end: rung */
    uint32_t *request_seen;
    const uint64_t *pause_seq;
    const uint64_t *delivered_seq;
    int64_t hold_runs;  /* before the first run: leave it to Python (the Init barrier) */
    int64_t stopping;   /* set by Python, then the request bell rung */
    int64_t error;      /* R_FAILED: the errno */
    int64_t held_run;   /* a KVM_RUN request came while runs were held: made on the next call */
    /* Serving exits without the worker (when the worker offers it: mail->forward). All in
     * this process's mapping of the VCPU's block; out_fd writes to the plugin without
     * blocking (pipes: its own open file description, O_NONBLOCK). forwarding 0: never. */
    uint64_t forwarding;
    uint64_t run_size;
    const uint64_t *table_gen;
    const struct vms_range_counts *range_head;
    const struct vms_counted_range *ranges;
    uint64_t *range_counts;
    uint64_t max_ranges;      /* what the block holds, whatever count the worker wrote */
    uint64_t *counters;
    uint64_t *run_state;
    struct vms_stats *stats;
    uint64_t *served;         /* the slot's runner_served */
    uint64_t pipes;
    int64_t out_fd;
    int64_t wake_pidfd;       /* the worker's pidfd (-1: none): wakes it from BELL_IN_READ */
};

/* An I/O or MMIO exit, decoded from the run page. */
struct vms_access {
    uint64_t space;    /* SPACE_IOPORT or SPACE_MMIO */
    uint64_t address;  /* the port or the physical address */
    uint64_t is_write;
    uint64_t offset;   /* the data area in the run page */
    uint64_t length;   /* its bytes (I/O: size * count; MMIO: at most 8) */
    uint64_t size;     /* I/O: bytes per access; MMIO: the length KVM gave */
    uint64_t count;    /* I/O: accesses (string I/O); MMIO: 1 */
};

struct vms_worker {
    struct kvm_run *run;
    uint64_t run_size;
    struct vms_mail *mail;
    int64_t request_fd;       /* the request bell's pipe, write end: rung */
    int64_t done_fd;          /* the done bell's pipe, read end: waited on */
    uint32_t *done_seen;
    uint64_t *counters;       /* the slot's exit counters, by ExitKind */
    uint64_t *run_state;      /* the slot's run state cell */
    struct vms_stats *stats;  /* the VCPU's statistics block */
    const uint64_t *table_gen;
    uint64_t known_gen;       /* the table generation `ranges` describes */
    const struct vms_counted_range *ranges; /* the VCPU's RangeCounts: sorted by (space, start) */
    uint64_t n_ranges;
    uint64_t *range_counts;   /* the RangeCounts counters, one per range */
    uint64_t hint_set;
    uint64_t hint_space;
    uint64_t hint_address;
    uint64_t hint_on_write;
    uint64_t pipes;           /* transport: 1 pipes, 0 socket */
    int64_t in_fd;
    int64_t out_fd;
    uint8_t *buf;             /* room for max_request + 1 bytes */
    uint64_t max_request;
    uint64_t max_fds;
    int64_t wake_fd;          /* Python's signal wake-up pipe (read end), or -1 */
    uint64_t report_exits;    /* return W_DONE after each exit completed here */
    uint64_t forwarding;      /* offer the runner its next exit (mail->forward) */
    uint64_t state;
    /* Out: what Python needs when the loop returns. */
    int64_t error;            /* W_RUN_RESULT: KVM_RUN's errno; W_FAILED: the I/O errno */
    uint64_t request_len;     /* W_REQUEST, W_REFUSED, receive: bytes of the request in buf */
    uint64_t refusal;         /* W_REFUSED: the errno to answer with (0: none) */
    uint64_t fds;             /* W_REFUSED: fds that came with the request */
    struct vms_access access; /* the last I/O or MMIO exit */
    int64_t range_index;      /* its range, or -1 (unreserved) */
    uint64_t delivered;       /* DELIVERED_*: what became of it */
    uint64_t response_ns;     /* the plugin's response time to it (once resumed) */
    uint64_t reply_polled;    /* the reply in hand was polled for: its time is the plugin's */
    uint64_t slow_exits;      /* exits sent to a slow plugin: see REPLY_PROBE_EVERY */
    uint64_t probing;         /* the exit sent is a probe: its reply is polled for */
    uint64_t pending;         /* a request was read ahead (asleep in read): the next receive */
    uint64_t pending_code;    /* returns this code, with buf, request_len, refusal and fds */
};

/* Signals (see hotpath.c). */
int vms_watch_signal(int sig);
int vms_unwatch_signal(int sig);
int vms_take_signal(void);
int vms_catch_wake(void);
int64_t vms_cancellable_read(int fd, uint8_t *buf, size_t n, int rearm);

/* Bells. */
int vms_bell_ring(struct vms_bell *bell, int write_fd, int pidfd);
int vms_bell_wait(struct vms_bell *bell, int read_fd, uint32_t *seen, uint64_t spin_ns,
                  int wake_fd);

/* The loops, and the worker's pieces Python uses between their calls. */
int vms_runner_loop(struct vms_runner *r);
int vms_worker_loop(struct vms_worker *w);
int vms_send(struct vms_worker *w, const uint8_t *msg, size_t length);
int vms_receive(struct vms_worker *w);
void vms_begin_wait(struct vms_worker *w, uint64_t state);
void vms_resumed(struct vms_worker *w);
void vms_finish_access(struct vms_worker *w, const uint8_t *data, size_t size);

/* Decoding, lookup, encoding and parsing: the one home of each (tests call them too). */
int vms_decode_access(const struct kvm_run *run, uint64_t run_size, struct vms_access *a);
int64_t vms_find_range(const struct vms_counted_range *ranges, uint64_t n, uint64_t space,
                       uint64_t address);
size_t vms_encode_io_wait(uint8_t *out, uint64_t space, uint64_t address, int is_write,
                          int no_resume, const uint8_t *data, size_t length);
int vms_plain_resume(const uint8_t *p, size_t n, size_t *offset, size_t *length);

/* Seqlocks (seqlock.c). */
uint64_t vms_seq_begin(uint64_t *gen);
uint64_t vms_seq_end(uint64_t *gen);
uint64_t vms_seq_publish(uint64_t *gen, uint8_t *dst, const uint8_t *src, size_t n);
uint64_t vms_seq_read(const uint64_t *gen, uint8_t *dst, const uint8_t *src, size_t n);

/* A confined worker's SIGSYS handler (hotpath.c). */
int vms_trap_syscalls(uint64_t *cell);

#endif
