/*
 * The seqlocks of the shared region (the table, a VCPU's range counts), with C11 atomics:
 * the one order every writer and reader follows, whatever the CPU's memory model.
 *
 * A writer makes the generation odd, writes, and makes it even again: the odd store comes
 * before the data (release fence), the even store after it (release store). A reader loads
 * the generation (acquire), copies, orders its copy before a second load (acquire fence), and
 * keeps the copy only if both loads saw the same even value. Each seqlock has one writer.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Make the generation odd: the writes that follow are not seen before it. Returns it. */
uint64_t vms_seq_begin(uint64_t *gen)
{
    uint64_t odd = __atomic_load_n(gen, __ATOMIC_RELAXED) + 1;
    __atomic_store_n(gen, odd, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return odd;
}

/* Make the generation even again, after every write before it. Returns it. */
uint64_t vms_seq_end(uint64_t *gen)
{
    uint64_t even = __atomic_load_n(gen, __ATOMIC_RELAXED) + 1;
    __atomic_store_n(gen, even, __ATOMIC_RELEASE);
    return even;
}

/* A whole write: n bytes from src to dst under the seqlock. Returns the new generation. */
uint64_t vms_seq_publish(uint64_t *gen, uint8_t *dst, const uint8_t *src, size_t n)
{
    vms_seq_begin(gen);
    memcpy(dst, src, n);
    return vms_seq_end(gen);
}

/* Copy n bytes from src to dst as of one generation: returns that (even) generation, or an
 * odd value when a write was under way or came meanwhile (then dst is torn: try again). */
uint64_t vms_seq_read(const uint64_t *gen, uint8_t *dst, const uint8_t *src, size_t n)
{
    uint64_t before = __atomic_load_n(gen, __ATOMIC_ACQUIRE);
    if (before & 1)
        return before;
    memcpy(dst, src, n);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint64_t after = __atomic_load_n(gen, __ATOMIC_RELAXED);
    return after == before ? before : (after | 1);
}
