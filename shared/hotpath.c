/*
 * vmsuper's per-exit engine, in C: the hand-off between a VCPU worker and its runner thread
 * (bells), the runner's KVM_RUN loop (the only place KVM_RUN is made), and the worker's loop,
 * which decodes every I/O and MMIO exit, looks it up, counts it and serves it, owning the
 * channel's transport. Compiled into the cffi module `vmsuper.shared._hotpath`
 * (hotpath.h declares what Python calls, for this file and for cffi's cdef alike, and the
 * compiler checks those declarations against the definitions here); it needs no Python
 * headers.
 *
 * What needs a protocol decision returns to Python as a decoded event in the worker's context
 * (an access at the call hint's address, a plugin request that is not exactly Resume{data},
 * a table that changed since Python last described it), as do the rare exits, errors and
 * signals. Python answers through the functions below (vms_send, vms_receive,
 * vms_finish_access, vms_begin_wait, vms_resumed): nothing here is done twice.
 *
 * Bells. A bell is a sequence number and a "sleeping" flag in shared memory, plus a pipe
 * (shared/shm_doorbell.py says why not an eventfd). Ringing bumps the number and writes a byte
 * to the pipe only if the waiter said it sleeps on it (a worker that said it sleeps in the read
 * of its plugin's channel gets VMS_WAKE_SIGNAL instead: see read_cancel); waiting polls the
 * number for up to a window (the mailbox's poll_ns, which the supervisor sets from the host's
 * CPU pressure: supervisor/poll_gate.py), then says it sleeps, checks once more and blocks in
 * a read of the pipe. Both sides use sequentially consistent operations between their store
 * and load, so one of them always sees the other (no lost wake-up); a byte left in the pipe
 * only causes one extra check.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/kvm.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

/* The shared-memory structs (struct vms_mail with its two struct vms_bell, struct vms_stats)
 * and the enums Python shares (ExitKind as K_*, RunState as RUN_STATE_*, Space as SPACE_*, the
 * loops' results as R_* and W_*): generated from abi.py. */
#include "hotpath.h"

static inline uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Signals. Python runs a handler only between bytecodes; a C loop that is about to block must
 * know a signal came meanwhile, or it would sleep through SIGTERM. vms_watch_signal puts a
 * handler in front of Python's that notes the signal, then calls Python's. */
static volatile sig_atomic_t signalled;
static struct sigaction chained[NSIG];

/* Cancellable reads. A worker asleep in the read of its plugin's channel (await_run) is woken
 * by a signal, VMS_WAKE_SIGNAL from its runner or a watched one; a signal that lands after
 * the worker's last check but before the read starts would be lost, and the read would block.
 * So such reads go through vms_cancellable_syscall below: it loads read_cancel and makes the
 * system call inside a window of code the handlers know. A handler sets read_cancel and, if
 * the interrupted instruction lies in the window (before the call, or at it once the kernel
 * rewound an interrupted call to restart it: SA_RESTART), moves it to the window's exit, which
 * returns -EINTR. A signal that comes before the window leaves the flag set; one that comes
 * during the call, with a handler without SA_RESTART, ends it with EINTR; one that comes after
 * it changes nothing. x86-64 only, as the rest of this file. */
static volatile sig_atomic_t read_cancel;

#define HIDDEN __attribute__((visibility("hidden")))
HIDDEN long vms_cancellable_syscall(long a1, long a2, long a3, volatile sig_atomic_t *cancel,
                                    long nr);
extern const char vms_cancel_window[] HIDDEN, vms_cancel_window_end[] HIDDEN,
    vms_cancel_exit[] HIDDEN;
/* System V: a1-a3 in rdi, rsi, rdx (already the system call's registers), cancel in rcx, nr
 * in r8. The syscall instruction clobbers rcx and r11, which the caller does not keep. */
__asm__(".pushsection .text\n"
        ".globl vms_cancellable_syscall, vms_cancel_window, vms_cancel_window_end\n"
        ".globl vms_cancel_exit\n"
        ".hidden vms_cancellable_syscall, vms_cancel_window, vms_cancel_window_end\n"
        ".hidden vms_cancel_exit\n"
        ".type vms_cancellable_syscall, @function\n"
        "vms_cancellable_syscall:\n"
        "vms_cancel_window:\n"
        "    movl (%rcx), %eax\n"
        "    testl %eax, %eax\n"
        "    jnz vms_cancel_exit\n"
        "    movq %r8, %rax\n"
        "    syscall\n"
        "vms_cancel_window_end:\n"
        "    ret\n"
        "vms_cancel_exit:\n"
        "    movq $-4, %rax\n" /* -EINTR */
        "    ret\n"
        ".size vms_cancellable_syscall, .-vms_cancellable_syscall\n"
        ".popsection\n");

static void cancel_read(void *context)
{
    read_cancel = 1;
    greg_t *ip = &((ucontext_t *)context)->uc_mcontext.gregs[REG_RIP];
    if (*ip >= (greg_t)vms_cancel_window && *ip < (greg_t)vms_cancel_window_end)
        *ip = (greg_t)vms_cancel_exit;
}

/* A cancellable call's result as the libc wrappers give it: -1 with errno. */
static long cancellable(long nr, long a1, long a2, long a3)
{
    long ret = vms_cancellable_syscall(a1, a2, a3, &read_cancel, nr);
    if (ret < 0) {
        errno = (int)-ret;
        return -1;
    }
    return ret;
}

/* The worker's cancellable read alone, for tests: the bytes read, or -errno (-EINTR: a
 * watched signal or VMS_WAKE_SIGNAL came since the flag was cleared: here if rearm). */
int64_t vms_cancellable_read(int fd, uint8_t *buf, size_t n, int rearm)
{
    if (rearm)
        read_cancel = 0;
    long got = cancellable(SYS_read, fd, (long)buf, (long)n);
    return got < 0 ? -errno : got;
}

static void on_wake(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    (void)info;
    cancel_read(context);
}

/* The worker's handler of VMS_WAKE_SIGNAL: it only cancels a read (SA_RESTART: any other
 * call it interrupts goes on as if nothing came). */
int vms_catch_wake(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_wake;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&action.sa_mask);
    return sigaction(VMS_WAKE_SIGNAL, &action, NULL) < 0 ? -errno : 0;
}

static void note_signal(int sig, siginfo_t *info, void *context)
{
    signalled = 1;
    cancel_read(context);
    struct sigaction *next = &chained[sig];
    if (next->sa_flags & SA_SIGINFO)
        next->sa_sigaction(sig, info, context);
    else if (next->sa_handler != SIG_DFL && next->sa_handler != SIG_IGN)
        next->sa_handler(sig);
}

int vms_watch_signal(int sig)
{
    struct sigaction now, ours;
    if (sig <= 0 || sig >= NSIG || sigaction(sig, NULL, &now) < 0)
        return -EINVAL;
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == note_signal)
        return 0; /* already watched: keep the handler it chains to */
    chained[sig] = now;
    ours = now;
    ours.sa_flags |= SA_SIGINFO;
    ours.sa_sigaction = note_signal;
    return sigaction(sig, &ours, NULL) < 0 ? -errno : 0;
}

/* Put back the handler vms_watch_signal found (0 also when it was not watched). */
int vms_unwatch_signal(int sig)
{
    struct sigaction now;
    if (sig <= 0 || sig >= NSIG || sigaction(sig, NULL, &now) < 0)
        return -EINVAL;
    if (!(now.sa_flags & SA_SIGINFO) || now.sa_sigaction != note_signal)
        return 0;
    return sigaction(sig, &chained[sig], NULL) < 0 ? -errno : 0;
}

/* Whether a watched signal came since the last call (and forget it). */
int vms_take_signal(void)
{
    int was = signalled;
    signalled = 0;
    return was;
}

/* A waiter in BELL_IN_READ is woken by VMS_WAKE_SIGNAL through pidfd (if there is one: only a
 * runner rings a worker that sleeps so); one gone already (ESRCH) needs no waking. write_fd is
 * the pipe's non-blocking write end: a pipe too full for the byte (EAGAIN) already holds what
 * wakes its reader. */
int vms_bell_ring(struct vms_bell *bell, int write_fd, int pidfd)
{
    __atomic_fetch_add(&bell->seq, 1, __ATOMIC_SEQ_CST);
    uint32_t sleeping = __atomic_load_n(&bell->sleeping, __ATOMIC_SEQ_CST);
    if (sleeping == BELL_IN_READ && pidfd >= 0) {
        if (syscall(SYS_pidfd_send_signal, pidfd, VMS_WAKE_SIGNAL, NULL, 0) < 0 && errno != ESRCH)
            return -errno;
    } else if (sleeping) {
        const uint8_t one = 1;
        while (write(write_fd, &one, sizeof one) < 0) {
            if (errno == EAGAIN)
                break;
            if (errno != EINTR)
                return -errno;
        }
    }
    return 0;
}

/* Sleep until the pipe's read end is readable and take what it holds (a ring that found the
 * waiter awake after all may have left a byte: one read drains several); -EINTR for a signal,
 * -EPIPE once every write end is closed (no ring can come: the ringer is gone). With a wake_fd
 * (Python's signal wake-up pipe) a signal that came while we polled is seen too: it was
 * handled then, so no EINTR would ever interrupt the read. */
static int sleep_on(int read_fd, int wake_fd)
{
    uint8_t rings[64];
    if (signalled)
        return -EINTR;
    if (wake_fd >= 0) {
        struct pollfd fds[2] = {{.fd = read_fd, .events = POLLIN},
                                {.fd = wake_fd, .events = POLLIN}};
        if (poll(fds, 2, -1) < 0)
            return -errno;
        if (fds[1].revents)
            return -EINTR;
        if (!(fds[0].revents & (POLLIN | POLLHUP)))
            return -EIO;
    }
    ssize_t got = read(read_fd, rings, sizeof rings);
    if (got < 0)
        return -errno;
    return got ? 0 : -EPIPE;
}

/* A plugin whose replies take longer on average (stats->recent_response_ns) is slow: with
 * polling on, its exits are sent by the worker, which then sleeps until the reply while the
 * runner polls; the plugin, woken by a sender that sleeps, gets that CPU to itself. (Sent by
 * the runner, which polls after sending, the plugin would share the runner's CPU with it.) A
 * fast plugin's exits are sent by the runner and its replies polled for by the worker.
 *
 * The average must measure the plugin, not the layout the rule picked, or the rule keeps
 * itself going: a reply the worker slept through also times the worker's own wake-up, which
 * on a slow host alone passes the bar. So only replies the worker polled for count
 * (vms_resumed), each at most REPLY_SAMPLE_MAX_NS, so that one stall (a preempted worker)
 * does not make a fast plugin slow; and while the plugin is slow, the worker polls for the
 * reply to every REPLY_PROBE_EVERY-th exit it sends (a probe), and a quick reply makes the
 * plugin fast again at once. Probes are rare, so that a plugin slow for good pays next to
 * nothing for them, and decisive, so that a fast plugin judged slow (a stretch of slow
 * replies while its threads shared a CPU, say) is not for long. A probe is the worker's send
 * still: an exit the runner sent would move the plugin to the runner's CPU, which it would
 * then share with the polling runner (every 32nd exit probed so made a Python plugin's exits
 * about 40 % slower). So a probe is answered in the slow layout, which costs a fast plugin a
 * few µs more than its polled replies in the fast one: here the native benchmark plugin's
 * probes took 13-24 µs where its replies took 12, a Python plugin's 25 µs and more over
 * pipes. A probe answered under REPLY_PROBE_MAX_NS is quick, and its time, scaled by the
 * bar over that limit to take the layout's cost out, starts the average afresh. */
#define REPLY_POLL_MAX_NS 20000u
#define REPLY_PROBE_MAX_NS 25000u /* the bar and a quarter */
#define REPLY_SAMPLE_MAX_NS 40000u /* twice the bar */
#define REPLY_PROBE_EVERY 256u

static int bell_sleep(struct vms_bell *bell, int read_fd, uint32_t *seen, int wake_fd);

/* 0 once the bell rang since *seen (updated), -EINTR if a signal came, -EPIPE if no ring can
 * come any more (see sleep_on). */
int vms_bell_wait(struct vms_bell *bell, int read_fd, uint32_t *seen, uint64_t spin_ns, int wake_fd)
{
    uint32_t seq = __atomic_load_n(&bell->seq, __ATOMIC_ACQUIRE);
    if (seq != *seen) {
        *seen = seq;
        return 0;
    }
    if (spin_ns) {
        /* Poll, yielding the CPU now and then: on a busy machine the process this one waits
         * for (or the plugin) may be queued behind it on this very CPU. */
        uint64_t deadline = now_ns() + spin_ns;
        for (unsigned i = 1;; i++) {
            __builtin_ia32_pause();
            seq = __atomic_load_n(&bell->seq, __ATOMIC_ACQUIRE);
            if (seq != *seen) {
                *seen = seq;
                return 0;
            }
            if ((i & 15) == 0) {
                if (now_ns() >= deadline)
                    break;
                sched_yield();
            }
        }
    }
    return bell_sleep(bell, read_fd, seen, wake_fd);
}

/* Say the waiter sleeps, then sleep until the bell rings. */
static int bell_sleep(struct vms_bell *bell, int read_fd, uint32_t *seen, int wake_fd)
{
    uint32_t seq;
    __atomic_store_n(&bell->sleeping, BELL_ON_PIPE, __ATOMIC_SEQ_CST);
    for (;;) {
        seq = __atomic_load_n(&bell->seq, __ATOMIC_SEQ_CST);
        if (seq != *seen) {
            __atomic_store_n(&bell->sleeping, BELL_AWAKE, __ATOMIC_SEQ_CST);
            *seen = seq;
            return 0;
        }
        int err = sleep_on(read_fd, wake_fd);
        if (err) {
            __atomic_store_n(&bell->sleeping, BELL_AWAKE, __ATOMIC_SEQ_CST);
            return err;
        }
    }
}

/* -- the runner thread ------------------------------------------------------------------- */

static size_t put_varint(uint8_t *out, uint64_t value);
static int serve_exit(struct vms_runner *r);
enum { SERVED_NOT = 0, SERVED_RUN_AGAIN = 1, SERVED_FORWARDED = 2 };

/* Serve KVM_RUN requests until Python must act (another ioctl, stop, a signal while idle, the
 * first run while runs are held). This is the only place KVM_RUN is made. An exit the runner
 * serves itself (serve_exit) either runs the guest again at once or waits for the worker to
 * ring once the plugin has replied; every other exit is rung back to the worker. */
int vms_runner_loop(struct vms_runner *r)
{
    struct vms_mail *mail = r->mail;
    int again = 0; /* the runner served the last exit itself: run again without a request */
    for (;;) {
        if (!r->held_run && !again) {
            int w = vms_bell_wait(&mail->request, (int)r->request_fd, r->request_seen,
                                  __atomic_load_n(&mail->poll_ns, __ATOMIC_RELAXED), -1);
            if (w == -EINTR)
                return R_INTERRUPTED;
            if (w < 0) {
                r->error = -w;
                return R_FAILED;
            }
        }
        again = 0;
        if (__atomic_load_n(&r->stopping, __ATOMIC_SEQ_CST))
            return R_STOP;
        if (!r->held_run && mail->op != 0)
            return R_CALL;
        if (r->hold_runs) {
            r->held_run = 1;
            return R_HELD_RUN;
        }
        r->held_run = 0;
        /* A pause that came while the worker served the plugin: leave the guest at once (the
         * supervisor set immediate_exit too, but the worker may have cleared it since). */
        if (__atomic_load_n(r->pause_seq, __ATOMIC_ACQUIRE) !=
            __atomic_load_n(r->delivered_seq, __ATOMIC_ACQUIRE))
            r->run->immediate_exit = 1;
        int ret = ioctl((int)r->vcpu_fd, KVM_RUN, 0);
        mail->ret = ret;
        mail->err = ret < 0 ? errno : 0;
        if (ret == 0 && r->forwarding &&
            __atomic_load_n(&mail->forward, __ATOMIC_ACQUIRE) == FORWARD_OK) {
            int served = serve_exit(r);
            if (served == SERVED_RUN_AGAIN)
                again = 1;
            if (served != SERVED_NOT)
                continue;
        }
        int w = vms_bell_ring(&mail->done, (int)r->done_fd, (int)r->wake_pidfd);
        if (w < 0) {
            r->error = -w;
            return R_FAILED;
        }
    }
}

/* -- the VCPU worker: one per-exit engine --------------------------------------------------
 *
 * Every I/O and MMIO exit is decoded here (vms_decode_access), looked up here
 * (vms_find_range) and counted here (the slot's counters and the shared RangeCounts cells).
 * Plain ones are answered here too: unreserved accesses, async writes, and reserved accesses
 * sent as Wait{Io} and answered with a plain Resume{data}. What needs a protocol decision
 * goes back to Python as a decoded event in the context (`access`, `range_index`...): an
 * access at the call hint's address (Python adds the registers), a reply that is another
 * request, a refused datagram, a table that changed, and exits that are not I/O or MMIO
 * (Python decodes those rare ones with kvm.decode_exit). With report_exits set (debug
 * logging) the loop also returns after every exit it completed, so Python can log it. */

/* The worker loop's state between calls; the W_ results and DELIVERED_ values are abi.py's. */
enum { S_IDLE = 0, S_RUNNING = 1, S_AWAIT_REPLY = 2, S_EXIT = 3 };
#define MAX_DATA 4096

/* Index of the range holding (space, address), or -1. */
int64_t vms_find_range(const struct vms_counted_range *ranges, uint64_t n, uint64_t space,
                       uint64_t address)
{
    uint64_t lo = 0, hi = n; /* first index whose (space, start) > (space, address) */
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        const struct vms_counted_range *m = &ranges[mid];
        if (m->space < space || (m->space == space && m->start <= address))
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1;
    const struct vms_counted_range *found = &ranges[lo - 1];
    if (found->space == space && address - found->start < found->length)
        return (int64_t)(lo - 1);
    return -1;
}

/* Decode an I/O or MMIO exit: 1, or 0 for any other exit (or one whose data would lie
 * outside the page, or exceed MAX_DATA: KVM never makes those). */
int vms_decode_access(const struct kvm_run *run, uint64_t run_size, struct vms_access *a)
{
    if (run->exit_reason == KVM_EXIT_IO) {
        a->space = SPACE_IOPORT;
        a->address = run->io.port;
        a->is_write = run->io.direction == KVM_EXIT_IO_OUT;
        a->size = run->io.size;
        a->count = run->io.count;
        a->length = (uint64_t)run->io.size * run->io.count;
        a->offset = run->io.data_offset;
        if (a->offset > run_size || a->length > run_size - a->offset)
            return 0;
    } else if (run->exit_reason == KVM_EXIT_MMIO) {
        a->space = SPACE_MMIO;
        a->address = run->mmio.phys_addr;
        a->is_write = run->mmio.is_write != 0;
        a->size = run->mmio.len;
        a->count = 1;
        a->length = run->mmio.len < 8 ? run->mmio.len : 8;
        a->offset = (uint64_t)((const uint8_t *)run->mmio.data - (const uint8_t *)run);
    } else {
        return 0;
    }
    return a->length <= MAX_DATA;
}

static size_t put_varint(uint8_t *out, uint64_t value)
{
    size_t n = 0;
    while (value >= 0x80) {
        out[n++] = (uint8_t)(value | 0x80);
        value >>= 7;
    }
    out[n++] = (uint8_t)value;
    return n;
}

static size_t varint_size(uint64_t value)
{
    size_t n = 1;
    while (value >= 0x80) {
        value >>= 7;
        n++;
    }
    return n;
}

/* VcpuResponse{wait: {io: {...}}} as protobuf encodes it: fields in number order, proto3
 * defaults left out (tests hold it to protobuf's own encoding). */
size_t vms_encode_io_wait(uint8_t *out, uint64_t space, uint64_t address, int is_write,
                          int no_resume, const uint8_t *data, size_t length)
{
    size_t body = 0;
    if (space)
        body += 1 + varint_size(space);
    if (address)
        body += 1 + varint_size(address);
    if (is_write)
        body += 2;
    if (no_resume)
        body += 2;
    if (length)
        body += 1 + varint_size(length) + length;
    size_t wait = 1 + varint_size(body) + body;
    size_t n = 0;
    out[n++] = 0x12; /* VcpuResponse.wait = 2 */
    n += put_varint(out + n, wait);
    out[n++] = 0x12; /* Wait.io = 2 */
    n += put_varint(out + n, body);
    if (space) {
        out[n++] = 0x08;
        n += put_varint(out + n, space);
    }
    if (address) {
        out[n++] = 0x10;
        n += put_varint(out + n, address);
    }
    if (is_write) {
        out[n++] = 0x18;
        out[n++] = 1;
    }
    if (no_resume) {
        out[n++] = 0x20;
        out[n++] = 1;
    }
    if (length) {
        out[n++] = 0x2a;
        n += put_varint(out + n, length);
        memcpy(out + n, data, length);
        n += length;
    }
    return n;
}

/* -- exits the runner serves without the worker ------------------------------------------
 *
 * Each hand-off between runner and worker costs a wake-up, and when the host has fewer free
 * cores than busy threads every wake-up is a context switch. So when the worker offers it
 * (mail->forward == FORWARD_OK, set before it rings for a KVM_RUN), the runner serves the
 * exits that need no decision of the worker's: an unreserved access (a read gives zeros) and
 * an async write (sent with no_resume) go straight back into the guest, and a plain reserved
 * access goes to the plugin as Wait{Io}, after which the worker, woken by the plugin's reply
 * instead of by the runner, reads and parses that reply (await_run). The runner only writes
 * to the plugin and never reads from it: every byte the plugin sends is still parsed by the
 * confined worker. Everything else (an access at the call hint, a table the worker has not
 * described yet, a large access, the rare exits, an async write the channel cannot take at
 * once) is rung back to the worker as before. The lookup reads the worker's RangeCounts
 * block, which the worker writes only while the runner waits for it. */
#define FORWARD_MAX_DATA 256

/* Write one encoded response: 1 once it went out whole, 0 if it would block, -1 if the
 * channel failed. */
static int send_nowait(struct vms_runner *r, const uint8_t *msg, size_t length)
{
    ssize_t sent;
    size_t total = length;
    if (!r->pipes) {
        sent = send((int)r->out_fd, msg, length, MSG_DONTWAIT | MSG_NOSIGNAL);
    } else {
        uint8_t framed[10 + FORWARD_MAX_DATA + 64];
        size_t head = put_varint(framed, length);
        memcpy(framed + head, msg, length);
        total = head + length;
        /* Less than PIPE_BUF bytes: the pipe takes them whole or not at all. */
        sent = write((int)r->out_fd, framed, total);
    }
    if (sent == (ssize_t)total)
        return 1;
    return sent < 0 && (errno == EAGAIN || errno == EINTR) ? 0 : -1;
}

/* send_nowait, waiting for room while the plugin does not read (a kick interrupts the wait;
 * the runner then gives up if it is stopping): 1, or -1 if the channel failed or it stops. */
static int send_waiting(struct vms_runner *r, const uint8_t *msg, size_t length)
{
    for (;;) {
        int sent = send_nowait(r, msg, length);
        if (sent)
            return sent;
        struct pollfd room = {.fd = (int)r->out_fd, .events = POLLOUT};
        if (poll(&room, 1, -1) < 0 && errno != EINTR)
            return -1;
        if (__atomic_load_n(&r->stopping, __ATOMIC_SEQ_CST))
            return -1;
    }
}

static int serve_exit(struct vms_runner *r)
{
    const struct vms_range_counts *head = r->range_head;
    struct vms_access a;
    if (!vms_decode_access(r->run, r->run_size, &a) || a.length > FORWARD_MAX_DATA)
        return SERVED_NOT;
    if (__atomic_load_n(r->table_gen, __ATOMIC_ACQUIRE) != head->table_gen)
        return SERVED_NOT; /* the worker describes the new table first */
    uint8_t *data = (uint8_t *)r->run + a.offset;
    /* The block is the worker's to write: a count beyond the block must not take the lookup,
     * or the counter it increments, out of it. */
    uint64_t count = head->count < r->max_ranges ? head->count : r->max_ranges;
    int64_t index = vms_find_range(r->ranges, count, a.space, a.address);
    if (index < 0 || (r->ranges[index].async_write && !a.is_write)) {
        if (!a.is_write)
            memset(data, 0, a.length);
        r->counters[K_UNRESERVED]++;
        (*r->served)++;
        return SERVED_RUN_AGAIN;
    }
    uint8_t message[FORWARD_MAX_DATA + 64];
    if (a.is_write && r->ranges[index].async_write) {
        size_t n = vms_encode_io_wait(message, a.space, a.address, 1, 1, data, a.length);
        if (send_nowait(r, message, n) != 1)
            return SERVED_NOT; /* the worker sends it, and sees the channel's error */
        r->counters[K_ASYNC_WRITE]++;
        r->range_counts[index]++;
        (*r->served)++;
        return SERVED_RUN_AGAIN;
    }
    if (head->hint_set && a.space == head->hint_space && a.address == head->hint_address &&
        a.is_write == head->hint_on_write)
        return SERVED_NOT; /* the worker sends it with the registers */
    if (__atomic_load_n(&r->mail->poll_ns, __ATOMIC_RELAXED) &&
        r->stats->recent_response_ns >= REPLY_POLL_MAX_NS)
        return SERVED_NOT; /* a slow plugin while polling: see REPLY_POLL_MAX_NS */
    static const uint8_t zeros[FORWARD_MAX_DATA];
    size_t n = vms_encode_io_wait(message, a.space, a.address, (int)a.is_write, 0,
                                  a.is_write ? data : zeros, a.length);
    /* Everything the worker reads once the reply comes is written before the claim. */
    uint64_t *kind = &r->counters[a.space == SPACE_IOPORT ? (a.is_write ? K_IO_OUT : K_IO_IN)
                                                         : (a.is_write ? K_MMIO_WRITE
                                                                       : K_MMIO_READ)];
    (*kind)++;
    r->range_counts[index]++;
    (*r->served)++;
    r->stats->wait_since = now_ns();
    uint64_t state = __atomic_exchange_n(r->run_state, RUN_STATE_WAITING_PLUGIN, __ATOMIC_SEQ_CST);
    uint64_t offered = FORWARD_OK;
    if (!__atomic_compare_exchange_n(&r->mail->forward, &offered, FORWARD_SENT, 0,
                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        /* The worker withdrew the offer: it serves this exit itself. */
        __atomic_store_n(r->run_state, state, __ATOMIC_SEQ_CST);
        (*kind)--;
        r->range_counts[index]--;
        (*r->served)--;
        return SERVED_NOT;
    }
    /* Claimed: the worker now waits for the plugin's reply, so the Wait must go out. A
     * channel that failed makes the worker's read fail too (or the plugin never answers,
     * as it could anyway); either way it is the worker's to see. */
    send_waiting(r, message, n);
    return SERVED_FORWARDED;
}

/* At most 10 bytes; 0 if cut short, too long or over 64 bits. */
static int get_varint(const uint8_t *p, size_t n, size_t *pos, uint64_t *value)
{
    uint64_t v = 0;
    size_t end = *pos + 10 < n ? *pos + 10 : n;
    for (unsigned shift = 0; *pos < end; shift += 7) {
        uint8_t byte = p[(*pos)++];
        if (shift == 63 && byte > 1)
            return 0;
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (byte < 0x80) {
            *value = v;
            return 1;
        }
    }
    return 0;
}

/* 1 if the request is exactly Resume{data} in the canonical encoding (what every client sends
 * to answer an exit): data at *offset. Anything else, however valid, is for protobuf. */
int vms_plain_resume(const uint8_t *p, size_t n, size_t *offset, size_t *length)
{
    size_t pos = 1;
    uint64_t size;
    if (n < 1 || p[0] != 0x12) /* VcpuRequest.resume = 2 */
        return 0;
    if (!get_varint(p, n, &pos, &size) || size != n - pos)
        return 0;
    if (size == 0) {
        *offset = pos;
        *length = 0;
        return 1;
    }
    if (p[pos] != 0x0a) /* Resume.data = 1, and nothing else */
        return 0;
    pos++;
    if (!get_varint(p, n, &pos, &size) || size != n - pos)
        return 0;
    *offset = pos;
    *length = size;
    return 1;
}

static int hung_up(int err) { return err == EPIPE || err == ECONNRESET; }

/* Send one encoded response: a datagram, or length-delimited on the pipe. 0 or a W_ code. */
int vms_send(struct vms_worker *w, const uint8_t *msg, size_t length)
{
    if (!w->pipes) {
        for (;;) {
            if (send((int)w->out_fd, msg, length, MSG_NOSIGNAL) >= 0)
                return 0; /* a datagram goes whole or not at all */
            if (errno == EINTR)
                continue;
            w->error = errno;
            return hung_up(errno) ? W_HUNGUP : W_FAILED;
        }
    }
    uint8_t head[10];
    size_t head_len = put_varint(head, length), done = 0, total = head_len + length;
    while (done < total) {
        struct iovec iov[2];
        int parts = 0;
        if (done < head_len) {
            iov[parts++] = (struct iovec){.iov_base = head + done, .iov_len = head_len - done};
            iov[parts++] = (struct iovec){.iov_base = (void *)msg, .iov_len = length};
        } else {
            iov[parts++] = (struct iovec){.iov_base = (void *)(msg + (done - head_len)),
                                          .iov_len = total - done};
        }
        ssize_t sent = writev((int)w->out_fd, iov, parts);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            w->error = errno;
            return hung_up(errno) ? W_HUNGUP : W_FAILED;
        }
        done += (size_t)sent;
    }
    return 0;
}

static void close_fds(struct msghdr *msg, uint64_t *count, int *truncated)
{
    *truncated = (msg->msg_flags & MSG_CTRUNC) != 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *fds = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, fds + i, sizeof fd);
            close(fd);
            (*count)++;
        }
    }
}

/* Read one request into buf (request_len): 0, or a W_ code. On the socket a request too large
 * (EMSGSIZE) or with fds (closed; EINVAL) is W_REFUSED and the channel goes on; on the pipes
 * one too large leaves the stream out of step (W_TOO_LARGE). A request read ahead (pending)
 * is returned first. A cancellable read (see read_cancel; the caller cleared the flag and
 * checked its reasons to wait) is W_INTERRUPTED for any signal that would wake it. */
static int receive_request(struct vms_worker *w, int cancel)
{
    size_t room = w->max_request + 1;
    if (w->pending) {
        w->pending = 0;
        return (int)w->pending_code;
    }
    w->request_len = 0;
    w->refusal = 0;
    w->fds = 0;
    if (w->pipes) {
        ssize_t got = cancel ? cancellable(SYS_read, w->in_fd, (long)w->buf, (long)room)
                             : read((int)w->in_fd, w->buf, room);
        if (got < 0) {
            if (errno == EINTR)
                return W_INTERRUPTED;
            w->error = errno;
            return W_FAILED;
        }
        if (got == 0)
            return W_HUNGUP;
        if ((uint64_t)got > w->max_request)
            return W_TOO_LARGE;
        w->request_len = (uint64_t)got;
        return 0;
    }
    union {
        struct cmsghdr align;
        uint8_t space[CMSG_SPACE(16 * sizeof(int))];
    } control;
    struct iovec iov = {.iov_base = w->buf, .iov_len = room};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.space,
        .msg_controllen = w->max_fds ? CMSG_SPACE(w->max_fds * sizeof(int)) : 0,
    };
    if (msg.msg_controllen > sizeof control.space)
        msg.msg_controllen = sizeof control.space;
    int flags = MSG_CMSG_CLOEXEC | MSG_TRUNC;
    ssize_t got = cancel ? cancellable(SYS_recvmsg, w->in_fd, (long)&msg, flags)
                         : recvmsg((int)w->in_fd, &msg, flags);
    if (got < 0) {
        if (errno == EINTR)
            return W_INTERRUPTED;
        w->error = errno;
        return hung_up(errno) ? W_HUNGUP : W_FAILED;
    }
    uint64_t fds = 0;
    int truncated;
    close_fds(&msg, &fds, &truncated);
    w->fds = truncated ? fds + 1 : fds;
    if ((uint64_t)got > w->max_request || (msg.msg_flags & MSG_TRUNC)) {
        w->refusal = EMSGSIZE;
        return W_REFUSED;
    }
    if (got == 0)
        return W_HUNGUP;
    if (truncated || fds > w->max_fds) {
        w->refusal = EINVAL;
        return W_REFUSED;
    }
    if (fds) {
        w->refusal = EINVAL;
        w->request_len = (uint64_t)got;
        return W_REFUSED;
    }
    w->request_len = (uint64_t)got;
    return 0;
}

/* The channel's read for Python (serving requests outside the loop): as the loop reads. */
int vms_receive(struct vms_worker *w) { return receive_request(w, 0); }

/* Waits on the plugin: the run state cell and the statistics block, written only here. */
void vms_begin_wait(struct vms_worker *w, uint64_t state)
{
    w->stats->wait_since = now_ns();
    __atomic_store_n(w->run_state, state, __ATOMIC_RELEASE);
}

/* The plugin resumed the VCPU: a wait on an exit (not Init or a pause) adds its length to the
 * response-time histogram (also kept in response_ns). Then the VCPU is RUNNING. */
void vms_resumed(struct vms_worker *w)
{
    struct vms_stats *stats = w->stats;
    w->response_ns = 0;
    if (__atomic_load_n(w->run_state, __ATOMIC_ACQUIRE) == RUN_STATE_WAITING_PLUGIN) {
        uint64_t now = now_ns(), since = stats->wait_since;
        uint64_t took = now > since ? now - since : 0;
        unsigned bucket = took ? 64 - (unsigned)__builtin_clzll(took) : 0;
        if (bucket >= VMS_BUCKETS)
            bucket = VMS_BUCKETS - 1;
        stats->buckets[bucket]++;
        stats->responses++;
        stats->response_sum_ns += took;
        if (took > stats->response_max_ns)
            stats->response_max_ns = took;
        w->response_ns = took;
        if (w->reply_polled) {
            uint64_t sample = took < REPLY_SAMPLE_MAX_NS ? took : REPLY_SAMPLE_MAX_NS;
            uint64_t recent = stats->recent_response_ns;
            /* A plugin judged slow that answered a probe quickly is fast again at once. */
            stats->recent_response_ns =
                recent >= REPLY_POLL_MAX_NS && sample < REPLY_PROBE_MAX_NS
                    ? sample * REPLY_POLL_MAX_NS / REPLY_PROBE_MAX_NS
                    : recent - (recent >> 3) + (sample >> 3);
        }
    }
    w->reply_polled = 0;
    __atomic_store_n(w->run_state, RUN_STATE_RUNNING, __ATOMIC_RELEASE);
}

/* The plugin's Resume of the forwarded access (read by the loop, or by Python when the reply
 * took the protocol's path): a read's value goes into the data area, at most its size,
 * zero-padded; then the VCPU runs again. */
void vms_finish_access(struct vms_worker *w, const uint8_t *data, size_t size)
{
    const struct vms_access *a = &w->access;
    if (!a->is_write) {
        uint8_t *area = (uint8_t *)w->run + a->offset;
        size_t n = size < a->length ? size : a->length;
        memcpy(area, data, n);
        memset(area + n, 0, a->length - n);
    }
    vms_resumed(w);
    w->state = S_IDLE;
}

/* One exit, fresh from KVM_RUN (or held over a table change): 0 when handled here. */
static int handle_exit(struct vms_worker *w)
{
    struct vms_access *a = &w->access;
    w->state = S_IDLE;
    if (!vms_decode_access(w->run, w->run_size, a))
        return W_EXIT;
    if (__atomic_load_n(w->table_gen, __ATOMIC_ACQUIRE) != w->known_gen) {
        w->state = S_EXIT; /* Python describes the new table, then this exit is handled */
        return W_TABLE;
    }
    uint8_t *data = (uint8_t *)w->run + a->offset;
    int done = w->report_exits ? W_DONE : 0;
    int64_t index = vms_find_range(w->ranges, w->n_ranges, a->space, a->address);
    w->range_index = index;
    w->delivered = DELIVERED_NONE;
    w->response_ns = 0;
    if (index < 0 || (w->ranges[index].async_write && !a->is_write)) {
        if (!a->is_write)
            memset(data, 0, a->length);
        w->counters[K_UNRESERVED]++;
        return done;
    }
    w->range_counts[index]++;
    uint8_t message[MAX_DATA + 64];
    static const uint8_t zeros[MAX_DATA];
    if (a->is_write && w->ranges[index].async_write) {
        size_t n = vms_encode_io_wait(message, a->space, a->address, 1, 1, data, a->length);
        w->counters[K_ASYNC_WRITE]++;
        w->delivered = DELIVERED_NO_RESUME;
        int code = vms_send(w, message, n);
        return code ? code : done;
    }
    if (a->space == SPACE_IOPORT)
        w->counters[a->is_write ? K_IO_OUT : K_IO_IN]++;
    else
        w->counters[a->is_write ? K_MMIO_WRITE : K_MMIO_READ]++;
    w->delivered = DELIVERED_WAIT;
    vms_begin_wait(w, RUN_STATE_WAITING_PLUGIN);
    if (w->hint_set && a->space == w->hint_space && a->address == w->hint_address &&
        a->is_write == w->hint_on_write)
        return W_HINTED; /* Python sends it with the registers and serves until Resume */
    w->state = S_AWAIT_REPLY;
    w->probing = __atomic_load_n(&w->mail->poll_ns, __ATOMIC_RELAXED) &&
                 w->stats->recent_response_ns >= REPLY_POLL_MAX_NS &&
                 ++w->slow_exits % REPLY_PROBE_EVERY == 0;
    size_t n = vms_encode_io_wait(message, a->space, a->address, (int)a->is_write, 0,
                                  a->is_write ? data : zeros, a->length);
    return vms_send(w, message, n);
}

/* A slow plugin's reply to a probe (see REPLY_POLL_MAX_NS): polled for up to the window, so
 * that its time is the plugin's. 0 once it can be read (or the window is over: then read
 * blocking, the time still counts, the plugin took at least the window), or W_INTERRUPTED. */
static int poll_for_reply(struct vms_worker *w)
{
    uint64_t deadline = now_ns() + __atomic_load_n(&w->mail->poll_ns, __ATOMIC_RELAXED);
    w->reply_polled = 1;
    for (unsigned i = 1;; i++) {
        if (signalled)
            return W_INTERRUPTED;
        struct pollfd in = {.fd = (int)w->in_fd, .events = POLLIN};
        if (poll(&in, 1, 0) != 0)
            return 0; /* readable, or an error that the read reports */
        if ((i & 15) == 0 && now_ns() >= deadline)
            return 0;
        sched_yield();
    }
}

/* The forwarded access's answer: 0 after a plain Resume, else a W_ code. */
static int await_reply(struct vms_worker *w)
{
    size_t offset, size;
    if (w->pending)
        w->probing = 0; /* the reply, read ahead, is in hand: nothing to poll for */
    if (w->probing) {
        int polled = poll_for_reply(w);
        if (polled)
            return polled; /* still waiting: call again */
        w->probing = 0;
    }
    read_cancel = 0;
    if (signalled)
        return W_INTERRUPTED; /* still waiting: call again */
    int code = receive_request(w, 1);
    if (code == W_INTERRUPTED)
        return code;
    w->state = S_IDLE;
    if (code)
        return code;
    if (!vms_plain_resume(w->buf, w->request_len, &offset, &size))
        return W_REQUEST;
    vms_finish_access(w, w->buf + offset, size);
    return w->report_exits ? W_DONE : 0;
}

/* Wait in S_RUNNING while the runner may serve the exit itself (the offer is out): until
 * the runner rings (an exit for the worker: 0) or has claimed an access for the plugin (1:
 * read the reply), or -errno (-EINTR: a signal). Asleep, the worker blocks in the read of the
 * plugin's channel (BELL_IN_READ), so that the plugin's reply to a Wait the runner sent wakes
 * it with the reply in hand; a ring wakes it with VMS_WAKE_SIGNAL (see read_cancel). It never
 * waits for the runner itself. A request that comes while nothing was claimed (a client that
 * answers early) makes the worker withdraw the offer and wait for the runner alone: the
 * request, read ahead (pending), answers the next Wait, as it would without the offer. */
static int await_run(struct vms_worker *w)
{
    struct vms_mail *mail = w->mail;
    struct vms_bell *bell = &mail->done;
    int readable = 0;
    uint64_t spin_ns = __atomic_load_n(&mail->poll_ns, __ATOMIC_RELAXED);
    uint64_t deadline = spin_ns ? now_ns() + spin_ns : 0; /* poll until then; 0: sleep */
    w->reply_polled = 0;
    for (unsigned i = 1;; i++) {
        uint32_t seq = __atomic_load_n(&bell->seq, __ATOMIC_SEQ_CST);
        uint64_t offer = __atomic_load_n(&mail->forward, __ATOMIC_SEQ_CST);
        if (seq != *w->done_seen) {
            *w->done_seen = seq;
            return 0;
        }
        readable |= w->pending != 0;
        /* Once the runner sent the Wait, the reply is all there is to wait for: polled for
         * (a window of its own, and its time then counts: see REPLY_POLL_MAX_NS), then read
         * blocking. */
        if (offer == FORWARD_SENT && (readable || !deadline))
            return 1;
        if (offer == FORWARD_NO)
            return vms_bell_wait(bell, (int)w->done_fd, w->done_seen, spin_ns,
                                 (int)w->wake_fd);
        if (readable) {
            uint64_t expected = FORWARD_OK;
            __atomic_compare_exchange_n(&mail->forward, &expected, FORWARD_NO, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
            readable = 0;
            continue;
        }
        if (signalled)
            return -EINTR;
        if (deadline) {
            /* Poll as the bells do: the runner's ring or claim in memory, and once the
             * runner claimed an access, the plugin's reply on the channel, so neither wakes
             * this process from sleep. */
            __builtin_ia32_pause();
            if (offer == FORWARD_SENT) {
                if (!w->reply_polled) {
                    w->reply_polled = 1;
                    deadline = now_ns() + spin_ns;
                }
                /* A system call a check: yield after each, so the plugin, which may share
                 * this CPU, is never kept waiting longer than one check. */
                struct pollfd in = {.fd = (int)w->in_fd, .events = POLLIN};
                readable = poll(&in, 1, 0) > 0;
                if (readable)
                    continue;
                sched_yield();
            }
            if ((i & 15) == 0) {
                if (now_ns() >= deadline)
                    deadline = 0;
                else
                    sched_yield();
            }
            continue;
        }
        /* The flag is cleared before the bell says how to wake this worker: from then on
         * a ring's signal either finds the read's window or leaves the flag set. */
        read_cancel = 0;
        __atomic_store_n(&bell->sleeping, BELL_IN_READ, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&bell->seq, __ATOMIC_SEQ_CST) != *w->done_seen || signalled) {
            __atomic_store_n(&bell->sleeping, BELL_AWAKE, __ATOMIC_SEQ_CST);
            continue;
        }
        int code = receive_request(w, 1);
        __atomic_store_n(&bell->sleeping, BELL_AWAKE, __ATOMIC_SEQ_CST);
        if (code != W_INTERRUPTED) {
            w->pending = 1;
            w->pending_code = (uint64_t)code;
        }
    }
}

/* The runner sent the access in the run page to the plugin: take it up as if this loop had
 * sent it (handle_exit), to read the reply. */
static void take_forwarded(struct vms_worker *w)
{
    struct vms_access *a = &w->access;
    vms_decode_access(w->run, w->run_size, a);
    w->range_index = vms_find_range(w->ranges, w->n_ranges, a->space, a->address);
    w->delivered = DELIVERED_WAIT;
    w->response_ns = 0;
    w->state = S_AWAIT_REPLY;
}

/* Run the guest and serve its exits until Python must act; returns a W_ code. */
int vms_worker_loop(struct vms_worker *w)
{
    struct vms_mail *mail = w->mail;
    for (;;) {
        int code;
        switch (w->state) {
        case S_IDLE:
            mail->op = 0;
            mail->length = 0;
            mail->ret = 0;
            mail->err = 0;
            /* The runner may serve the exit itself once the table is described (known_gen
             * is odd until then). */
            __atomic_store_n(&mail->forward,
                             w->forwarding && !(w->known_gen & 1) ? FORWARD_OK : FORWARD_NO,
                             __ATOMIC_SEQ_CST);
            code = vms_bell_ring(&mail->request, (int)w->request_fd, -1);
            if (code < 0) {
                w->error = -code;
                return W_BELL_FAILED;
            }
            w->state = S_RUNNING;
            /* fall through */
        case S_RUNNING:
            code = w->forwarding
                       ? await_run(w)
                       : vms_bell_wait(&mail->done, (int)w->done_fd, w->done_seen,
                                       __atomic_load_n(&mail->poll_ns, __ATOMIC_RELAXED),
                                       (int)w->wake_fd);
            if (code == -EINTR)
                return W_INTERRUPTED;
            if (code < 0) {
                w->error = -code;
                return W_BELL_FAILED;
            }
            /* The runner waits for the next request: nothing more of its may be served. */
            __atomic_store_n(&mail->forward, FORWARD_NO, __ATOMIC_SEQ_CST);
            if (code == 1) {
                take_forwarded(w);
                break;
            }
            w->state = S_IDLE;
            if (mail->err) {
                w->error = mail->err;
                return W_RUN_RESULT;
            }
            /* fall through */
        case S_EXIT:
            code = handle_exit(w);
            if (code)
                return code;
            break;
        case S_AWAIT_REPLY:
            code = await_reply(w);
            if (code)
                return code;
            break;
        default:
            w->state = S_IDLE;
            return W_BELL_FAILED;
        }
    }
}

/* -- confinement: naming the system call a confined VCPU worker was killed for ------------ *
 *
 * A confined worker's seccomp filter (workers/confine.py) answers a call outside its allowlist
 * with SECCOMP_RET_TRAP: the kernel skips the call and delivers SIGSYS, whose siginfo names it.
 * The handler stores that number + 1 in the worker's shared slot (0 means none), where the
 * supervisor reads it once it reaps the worker, then asks to reset SIGSYS's handler: the
 * filter kills the process outright for rt_sigaction(SIGSYS), so the worker dies by SIGSYS
 * there, and a hostile worker cannot put a handler of its own in this one's place either.
 * Nothing here returns to the interrupted code. */
static uint64_t *trapped_cell;

static void on_trapped_syscall(int sig, siginfo_t *info, void *context)
{
    (void)context;
    if (trapped_cell != NULL)
        __atomic_store_n(trapped_cell, (uint64_t)(uint32_t)info->si_syscall + 1, __ATOMIC_SEQ_CST);
    struct sigaction fallback;
    memset(&fallback, 0, sizeof fallback);
    fallback.sa_handler = SIG_DFL;
    /* The kernel's sigaction for x86-64 takes the sigset's size, 8 bytes. */
    syscall(SYS_rt_sigaction, sig, &fallback, NULL, 8);
    /* Reached only without the filter (a test of this handler alone): die all the same. */
    sigset_t unblock;
    sigemptyset(&unblock);
    sigaddset(&unblock, sig);
    signal(sig, SIG_DFL);
    sigprocmask(SIG_UNBLOCK, &unblock, NULL);
    raise(sig);
    _exit(128 + sig);
}

/* Catch SIGSYS with the handler above, storing into `cell` (a 64-bit cell of shared memory);
 * 0, or -errno. Call it before the filter is installed. */
int vms_trap_syscalls(uint64_t *cell)
{
    struct sigaction action;
    sigset_t sigsys;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_trapped_syscall;
    action.sa_flags = SA_SIGINFO;
    sigfillset(&action.sa_mask); /* nothing else runs on top of it */
    trapped_cell = cell;
    if (sigaction(SIGSYS, &action, NULL) < 0)
        return -errno;
    sigemptyset(&sigsys);
    sigaddset(&sigsys, SIGSYS);
    return sigprocmask(SIG_UNBLOCK, &sigsys, NULL) < 0 ? -errno : 0;
}
