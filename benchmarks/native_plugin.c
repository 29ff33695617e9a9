/*
 * A small native vmsuper plugin for the benchmarks: it speaks the wire protocol directly, with
 * hand-encoded protobuf for the few messages it needs, so that the figures show the cost of
 * vmsuper and not of a client library.
 *
 *   native_plugin trivial
 *   native_plugin stamp
 *   native_plugin MODE EXITS GUEST_BIN START_PORT LOOP_PORT DONE_PORT [FIFO]
 *
 * MODE:
 *   loop     START, LOOP and DONE reserved; every exit answered with Resume.
 *   async    LOOP reserved with async_write: its writes arrive with no_resume and are drained.
 *   ioevent  an io_event (eventfd) at LOOP, which is not reserved: the guest's writes there
 *            never leave the kernel; the eventfd's count is read at the end.
 *   hold     each VCPU stops at its START exit; the plugin prints its report, then blocks
 *            until FIFO can be read (EOF or a byte), and exits with the VCPUs still stopped.
 *   profile  loop with two pauses for the harness (to read CPU times, or to place threads), at
 *            the START and the DONE exit: once every VCPU has reached it, one
 *            {"bench": ..., "phase": "start"|"done"} line, then FIFO is read before any VCPU
 *            goes on.
 *   trivial  exit 0 at once.
 *   stamp    print {"bench": "native", "mode": "stamp", "t_main": ...} (the clock on entering
 *            main) and exit 0: the harness times a start up to the plugin's main with it.
 *
 * The guest (GUEST_BIN, loaded at 0x1000 in 64 KiB of memory at guest address 0, run in real
 * mode from 0x1000 on every VCPU) writes once to START_PORT, EXITS times to LOOP_PORT and once
 * to DONE_PORT. The plugin answers each exit, times them with CLOCK_MONOTONIC (the clock of
 * Python's time.monotonic()) and prints one JSON line on stdout.
 *
 * The VCPU transport (socket or pipes) is told apart by the fds GetVcpus returns.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define LOAD_ADDRESS 0x1000
#define MEMORY_SIZE 0x10000
#define MAX_VCPUS 64
#define MAX_FDS (2 * MAX_VCPUS)
#define MAX_MESSAGE 65536

/* Field numbers of plugin.proto. */
enum {
    MAIN_CREATE = 1, MAIN_RESERVE_RANGE = 10, MAIN_GET_VCPUS = 17, MAIN_START = 18,
    CREATE_ID = 1, CREATE_IO_EVENT = 2, CREATE_MEMORY = 3,
    IO_EVENT_SPACE = 1, IO_EVENT_ADDRESS = 2, IO_EVENT_LENGTH = 3,
    MEMORY_START = 2, MEMORY_LENGTH = 3,
    RESERVE_SPACE = 1, RESERVE_START = 2, RESERVE_LENGTH = 3, RESERVE_ASYNC = 4,
    RESP_ERRNO = 1, RESP_CREATE = 2, RESP_RESERVE_RANGE = 11, RESP_GET_VCPUS = 18,
    RESP_START = 19,
    VREQ_WAIT = 1, VREQ_RESUME = 2, VREQ_GET_STATE = 3, VREQ_SET_STATE = 4,
    STATE_SET = 1, STATE_BYTES = 2,
    VRESP_ERRNO = 1, VRESP_WAIT = 2, VRESP_GET_STATE = 4, VRESP_SET_STATE = 5,
    WAIT_INIT = 1, WAIT_IO = 2,
    IO_ADDRESS = 2, IO_IS_WRITE = 3, IO_NO_RESUME = 4,
    GET_STATE_STATE = 1,
};
enum { SET_REGS = 0, SET_SREGS = 1, SET_MP = 5 };
enum { SPACE_IOPORT = 0 };

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("native_plugin: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* --- protobuf encoding ------------------------------------------------------------------ */

struct pb {
    uint8_t b[4096];
    size_t n;
};

static void pb_room(struct pb *p, size_t more) {
    if (p->n + more > sizeof p->b)
        die("message too large");
}

static void pb_varint(struct pb *p, uint64_t v) {
    pb_room(p, 10);
    while (v >= 0x80) {
        p->b[p->n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p->b[p->n++] = (uint8_t)v;
}

static void pb_uint(struct pb *p, unsigned field, uint64_t v) {
    pb_varint(p, (uint64_t)field << 3);
    pb_varint(p, v);
}

static void pb_bytes(struct pb *p, unsigned field, const void *data, size_t len) {
    pb_varint(p, (uint64_t)field << 3 | 2);
    pb_varint(p, len);
    pb_room(p, len);
    memcpy(p->b + p->n, data, len);
    p->n += len;
}

static void pb_msg(struct pb *p, unsigned field, const struct pb *sub) {
    pb_bytes(p, field, sub->b, sub->n);
}

static void pb_empty(struct pb *p, unsigned field) {
    pb_bytes(p, field, "", 0);
}

/* --- protobuf decoding ------------------------------------------------------------------ */

struct field {
    unsigned num;
    uint64_t v;
    const uint8_t *data;
    size_t len;
};

static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out) {
    uint64_t v = 0;
    for (unsigned shift = 0; shift < 64; shift += 7) {
        if (*p >= end)
            return -1;
        uint8_t byte = *(*p)++;
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

/* The last occurrence of field `num` in a message (proto3: the last one wins); 0 if absent. */
static int pb_find(const uint8_t *data, size_t len, unsigned num, struct field *out) {
    const uint8_t *p = data, *end = data + len;
    int found = 0;
    while (p < end) {
        uint64_t key, v = 0;
        struct field f = {0};
        if (read_varint(&p, end, &key) < 0)
            die("bad protobuf key");
        f.num = (unsigned)(key >> 3);
        switch (key & 7) {
        case 0:
            if (read_varint(&p, end, &v) < 0)
                die("bad protobuf varint");
            f.v = v;
            break;
        case 1:
            if (end - p < 8)
                die("short fixed64");
            p += 8;
            break;
        case 2:
            if (read_varint(&p, end, &v) < 0 || v > (uint64_t)(end - p))
                die("bad protobuf length");
            f.data = p;
            f.len = (size_t)v;
            p += v;
            break;
        case 5:
            if (end - p < 4)
                die("short fixed32");
            p += 4;
            break;
        default:
            die("unknown wire type %u", (unsigned)(key & 7));
        }
        if (f.num == num) {
            *out = f;
            found = 1;
        }
    }
    return found;
}

static int64_t pb_errno(const uint8_t *data, size_t len, unsigned field) {
    struct field f;
    if (!pb_find(data, len, field, &f))
        return 0;
    return (int64_t)(f.v >> 1) ^ -(int64_t)(f.v & 1); /* sint32: zigzag */
}

/* --- the main socket ---------------------------------------------------------------------- */

static int main_fd;

/* Send one MainRequest (with `send_fd` attached if >= 0) and take its response: it must carry
 * case `resp_case` and errno 0. Returns the number of fds received into `fds`. */
static int transact(const struct pb *req, int send_fd, unsigned resp_case, int *fds, int max_fds) {
    struct iovec iov = {.iov_base = (void *)req->b, .iov_len = req->n};
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (send_fd >= 0) {
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &send_fd, sizeof(int));
    }
    if (sendmsg(main_fd, &msg, 0) < 0)
        die("send main request: %s", strerror(errno));

    static uint8_t resp[MAX_MESSAGE];
    iov.iov_base = resp;
    iov.iov_len = sizeof resp;
    msg = (struct msghdr){.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                          .msg_controllen = sizeof ctl.buf};
    ssize_t n = recvmsg(main_fd, &msg, MSG_CMSG_CLOEXEC);
    if (n <= 0)
        die("main socket: %s", n == 0 ? "closed" : strerror(errno));
    int count = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (count < max_fds)
                fds[count++] = fd;
            else
                close(fd);
        }
    }
    struct field f;
    int64_t err = pb_errno(resp, (size_t)n, RESP_ERRNO);
    if (err)
        die("main request (response case %u) failed: errno %lld", resp_case, (long long)err);
    if (!pb_find(resp, (size_t)n, resp_case, &f))
        die("main response lacks case %u", resp_case);
    return count;
}

static void reserve(unsigned port, int async_write) {
    struct pb inner = {.n = 0}, req = {.n = 0};
    pb_uint(&inner, RESERVE_SPACE, SPACE_IOPORT);
    pb_uint(&inner, RESERVE_START, port);
    pb_uint(&inner, RESERVE_LENGTH, 1);
    pb_uint(&inner, RESERVE_ASYNC, (uint64_t)async_write);
    pb_msg(&req, MAIN_RESERVE_RANGE, &inner);
    transact(&req, -1, RESP_RESERVE_RANGE, NULL, 0);
}

static void create_memory(int memfd) {
    struct pb mem = {.n = 0}, create = {.n = 0}, req = {.n = 0};
    pb_uint(&mem, MEMORY_START, 0);
    pb_uint(&mem, MEMORY_LENGTH, MEMORY_SIZE);
    pb_uint(&create, CREATE_ID, 0);
    pb_msg(&create, CREATE_MEMORY, &mem);
    pb_msg(&req, MAIN_CREATE, &create);
    transact(&req, memfd, RESP_CREATE, NULL, 0);
}

static int create_io_event(unsigned id, unsigned port) {
    struct pb ev = {.n = 0}, create = {.n = 0}, req = {.n = 0};
    int fd = -1;
    pb_uint(&ev, IO_EVENT_SPACE, SPACE_IOPORT);
    pb_uint(&ev, IO_EVENT_ADDRESS, port);
    pb_uint(&ev, IO_EVENT_LENGTH, 0);
    pb_uint(&create, CREATE_ID, id);
    pb_msg(&create, CREATE_IO_EVENT, &ev);
    pb_msg(&req, MAIN_CREATE, &create);
    if (transact(&req, -1, RESP_CREATE, &fd, 1) != 1)
        die("io_event came without its eventfd");
    return fd;
}

/* --- VCPU channels ------------------------------------------------------------------------ */

struct channel {
    int wfd, rfd, is_pipe;
    uint8_t buf[MAX_MESSAGE];
    size_t start, end; /* buffered bytes of a pipe not yet consumed */
};

static void chan_send(struct channel *ch, const struct pb *msg) {
    ssize_t n = ch->is_pipe ? write(ch->wfd, msg->b, msg->n) : send(ch->wfd, msg->b, msg->n, 0);
    if (n != (ssize_t)msg->n)
        die("send VCPU request: %s", n < 0 ? strerror(errno) : "short write");
}

/* One VcpuResponse; the pointer stays valid until the next call. */
static const uint8_t *chan_recv(struct channel *ch, size_t *len) {
    if (!ch->is_pipe) {
        ssize_t n = recv(ch->rfd, ch->buf, sizeof ch->buf, 0);
        if (n <= 0)
            die("VCPU socket: %s", n == 0 ? "closed" : strerror(errno));
        *len = (size_t)n;
        return ch->buf;
    }
    for (;;) {
        const uint8_t *p = ch->buf + ch->start, *end = ch->buf + ch->end;
        uint64_t size;
        if (read_varint(&p, end, &size) == 0 && size <= (uint64_t)(end - p)) {
            ch->start = (size_t)(p - ch->buf) + size;
            *len = size;
            return p;
        }
        memmove(ch->buf, ch->buf + ch->start, ch->end - ch->start);
        ch->end -= ch->start;
        ch->start = 0;
        if (ch->end == sizeof ch->buf)
            die("VCPU response too large");
        ssize_t n = read(ch->rfd, ch->buf + ch->end, sizeof ch->buf - ch->end);
        if (n <= 0)
            die("VCPU pipe: %s", n == 0 ? "closed" : strerror(errno));
        ch->end += (size_t)n;
    }
}

/* Send a request that has a response and return the response's case `resp_case` payload. */
static struct field vcpu_call(struct channel *ch, const struct pb *req, unsigned resp_case) {
    size_t len;
    chan_send(ch, req);
    const uint8_t *resp = chan_recv(ch, &len);
    struct field f;
    int64_t err = pb_errno(resp, len, VRESP_ERRNO);
    if (err)
        die("VCPU request (response case %u) failed: errno %lld", resp_case, (long long)err);
    if (!pb_find(resp, len, resp_case, &f))
        die("VCPU response lacks case %u", resp_case);
    return f;
}

static void set_state(struct channel *ch, unsigned set, const void *data, size_t size) {
    struct pb inner = {.n = 0}, req = {.n = 0};
    pb_uint(&inner, STATE_SET, set);
    pb_bytes(&inner, STATE_BYTES, data, size);
    pb_msg(&req, VREQ_SET_STATE, &inner);
    vcpu_call(ch, &req, VRESP_SET_STATE);
}

static void resume(struct channel *ch) {
    static const struct pb req = {.b = {VREQ_RESUME << 3 | 2, 0}, .n = 2};
    chan_send(ch, &req);
}

/* --- the benchmark ------------------------------------------------------------------------ */

enum mode { LOOP, ASYNC, IOEVENT, HOLD, PROFILE };

static enum mode mode;
static const char *fifo;
static uint64_t expected_exits;
static unsigned start_port, loop_port, done_port;

struct vcpu {
    int index;
    pthread_t thread;
    struct channel ch;
    double t_init, t_first, t_done;
    uint64_t exits, other_exits;
};

static void init_vcpu(struct vcpu *v) {
    struct pb req = {.n = 0}, inner = {.n = 0};
    pb_uint(&inner, STATE_SET, SET_SREGS);
    pb_msg(&req, VREQ_GET_STATE, &inner);
    struct field got = vcpu_call(&v->ch, &req, VRESP_GET_STATE);
    struct field state = {0};
    pb_find(got.data, got.len, GET_STATE_STATE, &state);
    struct kvm_sregs sregs;
    if (state.len != sizeof sregs)
        die("SREGS came as %zu bytes, not %zu", state.len, sizeof sregs);
    memcpy(&sregs, state.data, sizeof sregs);
    struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss};
    for (size_t i = 0; i < sizeof segs / sizeof segs[0]; i++) {
        segs[i]->base = 0;
        segs[i]->selector = 0;
    }
    set_state(&v->ch, SET_SREGS, &sregs, sizeof sregs);
    struct kvm_regs regs = {.rip = LOAD_ADDRESS, .rflags = 2};
    set_state(&v->ch, SET_REGS, &regs, sizeof regs);
    if (v->index != 0) {
        /* Application processors wait for INIT/SIPI under the in-kernel irqchip. */
        struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE};
        set_state(&v->ch, SET_MP, &mp, sizeof mp);
    }
}

/* Block until the harness opens and closes the FIFO (EOF) or writes to it. */
static void wait_for_harness(void) {
    int fd = open(fifo, O_RDONLY | O_CLOEXEC);
    char byte;
    if (fd < 0 || read(fd, &byte, 1) < 0)
        die("fifo %s: %s", fifo, strerror(errno));
    close(fd);
}

static void pause_for_harness(const char *phase) {
    printf("{\"bench\": \"native\", \"phase\": \"%s\", \"pid\": %d}\n", phase, (int)getpid());
    fflush(stdout);
    wait_for_harness();
}

/* Every VCPU's thread meets here (profile mode): one of them pauses for the harness, while the
 * others wait at the barrier, so the harness sees one pause per phase whatever the VCPU count. */
static pthread_barrier_t phase_barrier;

static void pause_all_for_harness(const char *phase) {
    if (pthread_barrier_wait(&phase_barrier) == PTHREAD_BARRIER_SERIAL_THREAD)
        pause_for_harness(phase);
    pthread_barrier_wait(&phase_barrier);
}

static void *serve_vcpu(void *arg) {
    struct vcpu *v = arg;
    static const struct pb wait = {.b = {VREQ_WAIT << 3 | 2, 0}, .n = 2};
    size_t len;
    chan_send(&v->ch, &wait);
    const uint8_t *resp = chan_recv(&v->ch, &len);
    struct field w, e;
    if (!pb_find(resp, len, VRESP_WAIT, &w) || !pb_find(w.data, w.len, WAIT_INIT, &e))
        die("VCPU %d: the first wait is not Init", v->index);
    v->t_init = now();
    init_vcpu(v);
    resume(&v->ch);
    for (;;) {
        resp = chan_recv(&v->ch, &len);
        double t = now();
        struct field io, address = {0}, no_resume = {0};
        if (!pb_find(resp, len, VRESP_WAIT, &w) || !pb_find(w.data, w.len, WAIT_IO, &io))
            die("VCPU %d: expected an I/O exit", v->index);
        pb_find(io.data, io.len, IO_ADDRESS, &address);
        pb_find(io.data, io.len, IO_NO_RESUME, &no_resume);
        if (address.v == loop_port) {
            v->exits++;
        } else if (address.v == start_port) {
            v->t_first = t;
            if (mode == HOLD)
                return NULL;
            if (mode == PROFILE) {
                pause_all_for_harness("start");
                v->t_first = now();
            }
        } else if (address.v == done_port) {
            v->t_done = t;
            if (mode == PROFILE) /* here, while this thread's CPU time is still on record */
                pause_all_for_harness("done");
            return NULL; /* left stopped: the plugin exits next */
        } else {
            v->other_exits++;
        }
        if (!no_resume.v)
            resume(&v->ch);
    }
}

static struct vcpu vcpus[MAX_VCPUS];

static int open_vcpus(int *fds, int nfds) {
    struct stat st;
    if (nfds == 0 || fstat(fds[0], &st) < 0)
        die("GetVcpus returned no usable fd");
    int is_pipe = S_ISFIFO(st.st_mode);
    int count = is_pipe ? nfds / 2 : nfds;
    if (count > MAX_VCPUS)
        die("too many VCPUs");
    for (int i = 0; i < count; i++) {
        vcpus[i].index = i;
        vcpus[i].ch.is_pipe = is_pipe;
        vcpus[i].ch.wfd = is_pipe ? fds[2 * i] : fds[i];
        vcpus[i].ch.rfd = is_pipe ? fds[2 * i + 1] : fds[i];
    }
    return count;
}

static void load_guest(const char *path, uint8_t *memory) {
    FILE *f = fopen(path, "rb");
    if (!f)
        die("cannot open %s: %s", path, strerror(errno));
    size_t n = fread(memory + LOAD_ADDRESS, 1, MEMORY_SIZE - LOAD_ADDRESS, f);
    if (n == 0 || ferror(f))
        die("cannot read the guest from %s", path);
    fclose(f);
}

static unsigned parse_uint(const char *text, const char *what) {
    char *end;
    errno = 0;
    unsigned long v = strtoul(text, &end, 0);
    if (errno || *end || end == text || v > 0xffffffffUL)
        die("bad %s: %s", what, text);
    return (unsigned)v;
}

int main(int argc, char **argv) {
    double t_main = now();
    if (argc == 2 && strcmp(argv[1], "trivial") == 0)
        return 0;
    if (argc == 2 && strcmp(argv[1], "stamp") == 0) {
        printf("{\"bench\": \"native\", \"mode\": \"stamp\", \"t_main\": %.9f}\n", t_main);
        return 0;
    }
    if (argc < 7 || argc > 8)
        die("usage: native_plugin loop|async|ioevent|hold|profile EXITS GUEST START LOOP DONE [FIFO]");
    const char *names[] = {"loop", "async", "ioevent", "hold", "profile"};
    int m = -1;
    for (int i = 0; i < 5; i++)
        if (strcmp(argv[1], names[i]) == 0)
            m = i;
    if (m < 0)
        die("unknown mode %s", argv[1]);
    mode = (enum mode)m;
    expected_exits = parse_uint(argv[2], "exit count");
    start_port = parse_uint(argv[4], "start port");
    loop_port = parse_uint(argv[5], "loop port");
    done_port = parse_uint(argv[6], "done port");
    fifo = argc == 8 ? argv[7] : NULL;
    if ((mode == HOLD || mode == PROFILE) && !fifo)
        die("%s needs a FIFO", argv[1]);
    const char *sock = getenv("CROSVM_SOCKET");
    if (!sock)
        die("CROSVM_SOCKET is not set");
    main_fd = (int)parse_uint(sock, "CROSVM_SOCKET");

    int memfd = memfd_create("guest", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd < 0 || ftruncate(memfd, MEMORY_SIZE) < 0 ||
        fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK) < 0)
        die("memfd: %s", strerror(errno));
    uint8_t *memory = mmap(NULL, MEMORY_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (memory == MAP_FAILED)
        die("mmap: %s", strerror(errno));
    load_guest(argv[3], memory);

    double t_first_request = now();
    create_memory(memfd);
    int eventfd = -1;
    reserve(start_port, 0);
    reserve(done_port, 0);
    if (mode == LOOP || mode == ASYNC || mode == PROFILE)
        reserve(loop_port, mode == ASYNC);
    if (mode == IOEVENT)
        eventfd = create_io_event(1, loop_port);

    int fds[MAX_FDS];
    struct pb req = {.n = 0};
    pb_empty(&req, MAIN_GET_VCPUS);
    int count = open_vcpus(fds, transact(&req, -1, RESP_GET_VCPUS, fds, MAX_FDS));
    if (pthread_barrier_init(&phase_barrier, NULL, (unsigned)count))
        die("pthread_barrier_init failed");
    for (int i = 0; i < count; i++)
        if (pthread_create(&vcpus[i].thread, NULL, serve_vcpu, &vcpus[i]))
            die("pthread_create failed");
    req.n = 0;
    pb_empty(&req, MAIN_START);
    double t_start_sent = now();
    transact(&req, -1, RESP_START, NULL, 0);
    double t_started = now();
    for (int i = 0; i < count; i++)
        pthread_join(vcpus[i].thread, NULL);
    double t_all_done = now();

    uint64_t ioevents = 0;
    if (eventfd >= 0 && read(eventfd, &ioevents, sizeof ioevents) != sizeof ioevents)
        die("read eventfd: %s", strerror(errno));

    printf("{\"bench\": \"native\", \"mode\": \"%s\", \"pid\": %d, \"transport\": \"%s\", "
           "\"expected_exits\": %llu, \"t_main\": %.9f, \"t_first_request\": %.9f, "
           "\"t_start_sent\": %.9f, \"t_started\": %.9f, \"t_all_done\": %.9f, "
           "\"ioevents\": %llu, \"vcpus\": [",
           names[m], (int)getpid(), vcpus[0].ch.is_pipe ? "pipes" : "socket",
           (unsigned long long)expected_exits, t_main, t_first_request, t_start_sent, t_started,
           t_all_done, (unsigned long long)ioevents);
    for (int i = 0; i < count; i++)
        printf("%s{\"t_init\": %.9f, \"t_first\": %.9f, \"t_done\": %.9f, \"exits\": %llu, "
               "\"other_exits\": %llu}",
               i ? ", " : "", vcpus[i].t_init, vcpus[i].t_first, vcpus[i].t_done,
               (unsigned long long)vcpus[i].exits, (unsigned long long)vcpus[i].other_exits);
    printf("]}\n");
    fflush(stdout);

    if (mode == HOLD)
        wait_for_harness();
    return 0;
}
