/*
 * The C reference for the exit benchmarks: the same VM set-up and guest as a vmsuper run,
 * driven with plain KVM ioctls, so vmsuper's figures can be read against a floor.
 *
 *   reference MODE VCPUS EXITS GUEST_BIN START_PORT LOOP_PORT DONE_PORT
 *
 * MODE:
 *   inline  each VCPU thread handles its exits itself and re-enters at once: the floor that
 *           any VMM pays for an exit that leaves the kernel.
 *   pipe    crosvm's plugin architecture: each VCPU thread forwards every I/O exit to a
 *           separate plugin *process* over a pair of pipes and waits for its one-byte reply.
 *   socket  the same over one SOCK_SEQPACKET socket pair per VCPU.
 *   relay   vmsuper's process layout in C, every exit through the worker: the VCPU thread
 *           rings a bell for a separate worker process, which forwards the exit to the
 *           plugin process over pipes, waits for the reply and rings a second bell to let
 *           the VCPU thread re-enter. It separates the cost of the extra hop from the cost of
 *           Python.
 *   forward relay's three processes with one hand-off less (three wake-ups per exit where
 *           relay has four), as vmsuper serves a plain exit: the VCPU thread writes the exit
 *           to the plugin's pipe itself, and the worker process reads the plugin's reply and
 *           rings a bell to let the VCPU thread re-enter. The worker still reads every
 *           byte the plugin sends; the VCPU's process only writes to the plugin.
 *   forward_socket
 *           forward over one SOCK_SEQPACKET socket pair per VCPU, as vmsuper's socket
 *           transport serves a plain exit: the VCPU thread sends on the socket, the worker
 *           process receives the replies on its copy of the same end.
 *
 * A bell is a pipe, as vmsuper's bells are (shared/shm_doorbell.py: a pipe's write wakes its
 * reader as a synchronous wake-up, an eventfd's does not), opened once for reading and writing
 * so that one fd serves both sides, each ring one 8-byte message.
 *
 * The VM is built as vmsuper builds it (TSS address, in-kernel irqchip, PIT), with 64 KiB of
 * memory at 0 and GUEST_BIN loaded at 0x1000, every VCPU in real mode at 0x1000 (application
 * processors made runnable directly). Times are CLOCK_MONOTONIC, one JSON line on stdout.
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
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LOAD_ADDRESS 0x1000
#define MEMORY_SIZE 0x10000
#define TSS_ADDRESS 0xfffbd000
#define MAX_VCPUS 64

enum mode { INLINE, PIPE, SOCKET, RELAY, FORWARD, FORWARD_SOCKET };
static const char *const mode_names[] = {"inline", "pipe",    "socket",
                                         "relay",  "forward", "forward_socket"};

#define STOP_WORKER (1ULL << 32) /* rung on exit_ready: the worker thread ends */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("reference: ", stderr);
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

/* What a VCPU thread tells the plugin process about one exit. */
struct exit_message {
    uint16_t port;
    uint8_t size;
    uint8_t is_write;
    uint32_t data;
    uint64_t sequence;
};

struct vcpu {
    int index, fd;
    struct kvm_run *run;
    pthread_t thread;
    int to_plugin, from_plugin;       /* VCPU side of the plugin channel (relay: the worker's;
                                         forward: from_plugin is the worker's) */
    int plugin_in, plugin_out;        /* plugin side of the plugin channel */
    int exit_ready, resume;           /* relay: bells VCPU thread -> worker -> VCPU thread;
                                         forward: resume only (-1 when unused) */
    double t_first, t_done;
    uint64_t exits, other_exits;
};

static enum mode mode;
static unsigned start_port, loop_port, done_port;
static struct vcpu vcpus[MAX_VCPUS];

/* forward and forward_socket: the VCPU thread writes, the worker process reads the reply. */
static int forwards(void) {
    return mode == FORWARD || mode == FORWARD_SOCKET;
}

/* relay and the forwards: a worker process stands between the VCPU threads and the plugin. */
static int has_worker(void) {
    return mode == RELAY || forwards();
}

/* One socket per VCPU, one fd for both directions, instead of two pipes. */
static int uses_socket(void) {
    return mode == SOCKET || mode == FORWARD_SOCKET;
}

static void ask_plugin(struct vcpu *v, const struct exit_message *m) {
    char reply;
    if (write(v->to_plugin, m, sizeof *m) != sizeof *m)
        die("write to the plugin: %s", strerror(errno));
    if (read(v->from_plugin, &reply, 1) != 1)
        die("read from the plugin: %s", strerror(errno));
}

/* The VCPU thread's part of one exit: it returns once the exit is answered. */
static void hand_off(struct vcpu *v) {
    uint64_t value = 1;
    if (mode == RELAY) {
        if (write(v->exit_ready, &value, sizeof value) != sizeof value ||
            read(v->resume, &value, sizeof value) != sizeof value)
            die("relay bells: %s", strerror(errno));
        return;
    }
    struct exit_message m = {
        .port = v->run->io.port,
        .size = v->run->io.size,
        .is_write = v->run->io.direction == KVM_EXIT_IO_OUT,
        .sequence = v->exits,
    };
    if (forwards()) {
        if (write(v->to_plugin, &m, sizeof m) != sizeof m)
            die("write to the plugin: %s", strerror(errno));
        if (read(v->resume, &value, sizeof value) != sizeof value)
            die("forward bell: %s", strerror(errno));
        return;
    }
    ask_plugin(v, &m);
}

/* relay: the worker process reads the exit from the shared kvm_run page (mapped before the
 * fork), asks the plugin, and lets the VCPU thread go on. */
static void *relay_serve(void *arg) {
    struct vcpu *v = arg;
    for (;;) {
        uint64_t value;
        if (read(v->exit_ready, &value, sizeof value) != sizeof value || value >= STOP_WORKER)
            return NULL;
        struct exit_message m = {
            .port = v->run->io.port,
            .size = v->run->io.size,
            .is_write = v->run->io.direction == KVM_EXIT_IO_OUT,
        };
        ask_plugin(v, &m);
        value = 1;
        if (write(v->resume, &value, sizeof value) != sizeof value)
            return NULL;
    }
}

/* forward: the worker process reads the plugin's reply to the exit the VCPU thread sent, and
 * lets the VCPU thread go on. It ends when the plugin closes its end. */
static void *forward_serve(void *arg) {
    struct vcpu *v = arg;
    for (;;) {
        char reply;
        uint64_t value = 1;
        if (read(v->from_plugin, &reply, 1) != 1 ||
            write(v->resume, &value, sizeof value) != sizeof value)
            return NULL;
    }
}

static void worker_main(int count) {
    for (int i = 0; i < count; i++) {
        close(vcpus[i].plugin_in);
        if (!uses_socket())
            close(vcpus[i].plugin_out);
        if (mode == FORWARD) /* the VCPU thread's end: the plugin must see it close */
            close(vcpus[i].to_plugin);
    }
    void *(*serve)(void *) = mode == RELAY ? relay_serve : forward_serve;
    for (int i = 0; i < count; i++)
        if (pthread_create(&vcpus[i].thread, NULL, serve, &vcpus[i]))
            _exit(1);
    for (int i = 0; i < count; i++)
        pthread_join(vcpus[i].thread, NULL);
    _exit(0);
}

static void *run_vcpu(void *arg) {
    struct vcpu *v = arg;
    for (;;) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN: %s", strerror(errno));
        }
        if (v->run->exit_reason != KVM_EXIT_IO)
            die("VCPU %d: unexpected exit reason %u", v->index, v->run->exit_reason);
        double t = now();
        unsigned port = v->run->io.port;
        if (port == loop_port) {
            v->exits++;
        } else if (port == start_port) {
            v->t_first = t;
        } else if (port == done_port) {
            v->t_done = t;
            return NULL;
        } else {
            v->other_exits++;
        }
        if (mode != INLINE)
            hand_off(v);
    }
}

/* The plugin process: one thread per VCPU answers each exit message with one byte. */
static void *plugin_serve(void *arg) {
    struct vcpu *v = arg;
    struct exit_message m;
    for (;;) {
        ssize_t n = read(v->plugin_in, &m, sizeof m);
        if (n <= 0)
            return NULL;
        if (write(v->plugin_out, "", 1) != 1)
            return NULL;
    }
}

static void plugin_main(int count) {
    for (int i = 0; i < count; i++) {
        close(vcpus[i].to_plugin);
        if (!uses_socket()) /* a socket is one fd for both directions */
            close(vcpus[i].from_plugin);
        if (has_worker())
            close(vcpus[i].resume);
        if (mode == RELAY)
            close(vcpus[i].exit_ready);
    }
    for (int i = 0; i < count; i++)
        if (pthread_create(&vcpus[i].thread, NULL, plugin_serve, &vcpus[i]))
            _exit(1);
    for (int i = 0; i < count; i++)
        pthread_join(vcpus[i].thread, NULL);
    _exit(0);
}

/* A bell (see the top): a pipe, opened read-write through /proc so that one fd has both ends. */
static int new_bell(void) {
    int ends[2];
    char path[64];
    if (pipe2(ends, O_CLOEXEC) < 0)
        die("bell pipe: %s", strerror(errno));
    snprintf(path, sizeof path, "/proc/self/fd/%d", ends[0]);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("bell pipe, opened read-write: %s", strerror(errno));
    close(ends[0]);
    close(ends[1]);
    return fd;
}

static void make_channel(struct vcpu *v) {
    v->exit_ready = mode == RELAY ? new_bell() : -1;
    v->resume = has_worker() ? new_bell() : -1;
    if (!uses_socket()) {
        int req[2], resp[2];
        if (pipe2(req, O_CLOEXEC) < 0 || pipe2(resp, O_CLOEXEC) < 0)
            die("pipe: %s", strerror(errno));
        v->to_plugin = req[1];
        v->plugin_in = req[0];
        v->plugin_out = resp[1];
        v->from_plugin = resp[0];
    } else {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
            die("socketpair: %s", strerror(errno));
        v->to_plugin = v->from_plugin = sv[0];
        v->plugin_in = v->plugin_out = sv[1];
    }
}

static void set_up_vcpu(struct vcpu *v) {
    struct kvm_sregs sregs;
    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS: %s", strerror(errno));
    struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss};
    for (size_t i = 0; i < sizeof segs / sizeof segs[0]; i++) {
        segs[i]->base = 0;
        segs[i]->selector = 0;
    }
    struct kvm_regs regs = {.rip = LOAD_ADDRESS, .rflags = 2};
    if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0 || ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
        die("setting registers: %s", strerror(errno));
    if (v->index != 0) {
        struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE};
        if (ioctl(v->fd, KVM_SET_MP_STATE, &mp) < 0)
            die("KVM_SET_MP_STATE: %s", strerror(errno));
    }
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
    if (argc != 8)
        die("usage: reference inline|pipe|socket|relay|forward|forward_socket VCPUS EXITS"
            " GUEST_BIN START LOOP DONE");
    int m = -1;
    for (int i = 0; i < (int)(sizeof mode_names / sizeof mode_names[0]); i++)
        if (strcmp(argv[1], mode_names[i]) == 0)
            m = i;
    if (m < 0)
        die("unknown mode %s", argv[1]);
    mode = (enum mode)m;
    int count = (int)parse_uint(argv[2], "VCPU count");
    if (count < 1 || count > MAX_VCPUS)
        die("VCPUS must be 1..%d", MAX_VCPUS);
    unsigned expected = parse_uint(argv[3], "exit count");
    start_port = parse_uint(argv[5], "start port");
    loop_port = parse_uint(argv[6], "loop port");
    done_port = parse_uint(argv[7], "done port");

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm: %s", strerror(errno));
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    struct kvm_pit_config pit = {.flags = 0};
    if (vm < 0 || ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDRESS) < 0 ||
        ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0 || ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
        die("creating the VM: %s", strerror(errno));

    int memfd = memfd_create("guest", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, MEMORY_SIZE) < 0)
        die("memfd: %s", strerror(errno));
    uint8_t *memory = mmap(NULL, MEMORY_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (memory == MAP_FAILED)
        die("mmap: %s", strerror(errno));
    FILE *f = fopen(argv[4], "rb");
    if (!f || fread(memory + LOAD_ADDRESS, 1, MEMORY_SIZE - LOAD_ADDRESS, f) == 0)
        die("cannot read the guest from %s", argv[4]);
    fclose(f);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEMORY_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)memory,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));

    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
    for (int i = 0; i < count; i++) {
        struct vcpu *v = &vcpus[i];
        v->index = i;
        v->fd = ioctl(vm, KVM_CREATE_VCPU, i);
        if (v->fd < 0)
            die("KVM_CREATE_VCPU: %s", strerror(errno));
        v->run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
        if (v->run == MAP_FAILED)
            die("mmap kvm_run: %s", strerror(errno));
        set_up_vcpu(v);
    }

    pid_t plugin = -1, worker = -1;
    if (mode != INLINE) {
        for (int i = 0; i < count; i++)
            make_channel(&vcpus[i]);
        /* Forked before any thread exists; the children never issue KVM ioctls. */
        plugin = fork();
        if (plugin < 0)
            die("fork: %s", strerror(errno));
        if (plugin == 0)
            plugin_main(count);
        if (has_worker()) {
            worker = fork();
            if (worker < 0)
                die("fork: %s", strerror(errno));
            if (worker == 0)
                worker_main(count);
        }
        for (int i = 0; i < count; i++) {
            close(vcpus[i].plugin_in);
            if (!uses_socket())
                close(vcpus[i].plugin_out);
            if (mode == RELAY) /* the worker's end of the plugin channel */
                close(vcpus[i].to_plugin), close(vcpus[i].from_plugin);
            if (mode == FORWARD) /* the worker reads the replies */
                close(vcpus[i].from_plugin);
        }
    }

    for (int i = 0; i < count; i++)
        if (pthread_create(&vcpus[i].thread, NULL, run_vcpu, &vcpus[i]))
            die("pthread_create failed");
    for (int i = 0; i < count; i++)
        pthread_join(vcpus[i].thread, NULL);
    /* relay: the worker ends when told, then the plugin at the end of its channels. The other
     * modes close the VCPU side of the channels: the plugin ends, and (the forwards) the worker
     * at the end of the plugin's replies. forward_socket's worker holds the same socket end,
     * so that end is shut for writing first: the plugin sees its end of file. */
    for (int i = 0; i < count && mode == RELAY; i++) {
        uint64_t stop = STOP_WORKER;
        if (write(vcpus[i].exit_ready, &stop, sizeof stop) != sizeof stop)
            die("stopping the worker: %s", strerror(errno));
    }
    for (int i = 0; i < count && plugin > 0 && mode != RELAY; i++) {
        if (mode == FORWARD_SOCKET && shutdown(vcpus[i].to_plugin, SHUT_WR) < 0)
            die("shutdown: %s", strerror(errno));
        close(vcpus[i].to_plugin);
        if (mode == PIPE)
            close(vcpus[i].from_plugin);
    }
    pid_t children[] = {worker, plugin};
    for (int i = 0; i < 2; i++) {
        int status;
        if (children[i] > 0 && (waitpid(children[i], &status, 0) < 0 || !WIFEXITED(status) ||
                                WEXITSTATUS(status)))
            die("the %s process failed", i ? "plugin" : "worker");
    }

    printf("{\"bench\": \"reference\", \"mode\": \"%s\", \"expected_exits\": %u, \"vcpus\": [",
           mode_names[m], expected);
    for (int i = 0; i < count; i++)
        printf("%s{\"t_first\": %.9f, \"t_done\": %.9f, \"exits\": %llu, \"other_exits\": %llu}",
               i ? ", " : "", vcpus[i].t_first, vcpus[i].t_done,
               (unsigned long long)vcpus[i].exits, (unsigned long long)vcpus[i].other_exits);
    printf("]}\n");
    return 0;
}
