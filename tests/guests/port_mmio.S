/*
 * Real-mode guest for tests/test_kvm_guest.py, loaded and linked at 0x1000 with CS = DS = 0.
 * It exercises every kind of exit the host must decode: port writes and reads of each width,
 * a string write, MMIO writes and a read beyond the memory slot. Each value it reads is
 * written back out so the host can see what the guest received. It ends by writing to the
 * "done" port: with the in-kernel irqchip, HLT never reaches userspace. Ports are chosen
 * away from the devices KVM emulates itself (PIC 0x20/0xa0, PIT 0x40-0x43, speaker 0x61).
 */
start:
    xor %ax, %ax
    mov %ax, %ds

    /* port writes: byte, word, dword (the last through %dx) */
    mov $0x11, %al
    out %al, $0x10
    mov $0x2233, %ax
    out %ax, $0x12
    mov $0x44556677, %eax
    mov $0x14, %dx
    out %eax, %dx

    /* port reads, each echoed to the next port */
    in $0x50, %al
    out %al, $0x51
    in $0x52, %ax
    out %ax, $0x53
    mov $0x54, %dx
    in %dx, %eax
    out %eax, $0x55

    /* string write */
    cld
    mov $message, %si
    mov $(message_end - message), %cx
    mov $0x30, %dx
    rep outsb

    /* MMIO at 0x20000 and up, outside every memory slot */
    mov $0x2000, %ax
    mov %ax, %es
    movb $0x5a, %es:0x10
    movl $0xdeadbeef, %es:0x20
    mov %es:0x30, %eax
    out %eax, $0x31

    /* done */
    out %al, $0xf0
1:  hlt
    jmp 1b

message:
    .ascii "vmsuper"
message_end:
