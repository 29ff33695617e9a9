/*
 * Guest for the SDK's I/O scenario (tests/test_sdk_e2e.py): 16-bit real mode, loaded at
 * 0x1000 with CS = DS = 0. Each step talks to the plugin through ports 0x600-0x60f
 * (reserved), 0x620 (reserved with async writes), 0x630 (released by the plugin at its first
 * write) and 0x640 (reserved by the plugin then), or MMIO at 0x30000 (reserved, no memory) and
 * 0x20000 (reserved, over a read-only slot).
 * Whatever the guest reads it writes back to port 0x601, so the plugin sees what arrived.
 * Port 0x60f means "done".
 */
    /* 1: port reads the plugin answers (16 and 32 bits) */
    mov $0x600, %dx
    in %dx, %ax
    mov $0x601, %dx
    out %ax, %dx
    mov $0x600, %dx
    in %dx, %eax
    mov $0x601, %dx
    out %eax, %dx

    /* 2: memory the plugin wrote (0x3000), and memory it reads after this step (0x3100) */
    mov 0x3000, %eax
    out %eax, %dx
    movl $0xc0ffee11, 0x3100

    /* 3: MMIO read at 0x30008 and write at 0x30010 */
    mov $0x3000, %ax
    mov %ax, %es
    mov %es:8, %eax
    mov $0x601, %dx
    out %eax, %dx
    movw $0xbeef, %es:0x10

    /* 4: a read-only slot at 0x20000: reads see the plugin's bytes, a write is an MMIO exit */
    mov $0x2000, %ax
    mov %ax, %es
    mov %es:0, %eax
    mov $0x601, %dx
    out %eax, %dx
    movw $0x5a5a, %es:4

    /* 5: the hinted port with rax matching the hint, then not, then matching after the
     * plugin cleared the hint */
    mov $0x1234, %eax
    mov $0x5678, %ebx
    mov $0x602, %dx
    out %ax, %dx
    mov $0x4321, %eax
    out %ax, %dx
    mov $0x1234, %eax
    out %ax, %dx

    /* 6: a port without hint; the plugin changes rcx there, the guest shows it */
    mov $0x9abc, %ecx
    mov $0x603, %dx
    out %al, %dx
    mov %cx, %ax
    mov $0x601, %dx
    out %ax, %dx

    /* 7: async writes 0..7, then a read in the async range (unreserved for reads: 0) */
    mov $0x620, %dx
    xor %al, %al
burst:
    out %al, %dx
    inc %al
    cmp $8, %al
    jne burst
    mov $0x55, %al
    in %dx, %al
    mov $0x601, %dx
    out %al, %dx

    /* 8: two writes to 0x630 (released at the first), one to 0x640 (reserved then) */
    mov $0x630, %dx
    out %al, %dx
    out %al, %dx
    mov $0x640, %dx
    out %al, %dx

    /* 9: I/O events: any length at 0x700, one byte equal to 7 at 0x702 */
    mov $0x700, %dx
    out %al, %dx
    out %ax, %dx
    out %eax, %dx
    mov $0x702, %dx
    mov $7, %al
    out %al, %dx
    out %al, %dx
    mov $8, %al
    out %al, %dx

    /* 10: dirty the third page of the dirty-logged slot at 0x10000 */
    mov $0x1000, %ax
    mov %ax, %es
    movb $1, %es:0x2000

    mov $0x60f, %dx
    out %al, %dx
halt:
    cli
    hlt
    jmp halt
