/*
 * Guest for the SDK's interrupt scenario (tests/test_sdk_e2e.py): 16-bit real mode at
 * 0x1000. It programs the master PIC (vectors 0x08-0x0f, only IRQs 5 and 6 unmasked),
 * points the real-mode vectors of IRQs 5 and 6 at handlers that write the IRQ number to
 * port 0x610 and acknowledge it, says "ready" at port 0x601 and waits with interrupts on.
 */
    movw $irq5, 0x34            /* vector 0x0d: offset, segment */
    movw $0, 0x36
    movw $irq6, 0x38            /* vector 0x0e */
    movw $0, 0x3a
    mov $0x8000, %sp

    mov $0x11, %al              /* ICW1: edge triggered, cascade, ICW4 follows */
    out %al, $0x20
    mov $0x08, %al              /* ICW2: vector base 0x08 */
    out %al, $0x21
    mov $0x04, %al              /* ICW3: slave on IRQ 2 */
    out %al, $0x21
    mov $0x01, %al              /* ICW4: 8086 mode */
    out %al, $0x21
    mov $0x9f, %al              /* OCW1: unmask IRQs 5 and 6 only */
    out %al, $0x21

    mov $0x601, %dx
    out %al, %dx
    sti
idle:
    hlt
    jmp idle

irq5:
    push %ax
    mov $5, %al
    jmp report
irq6:
    push %ax
    mov $6, %al
report:
    push %dx
    mov $0x610, %dx
    out %al, %dx
    mov $0x20, %al              /* non-specific EOI */
    out %al, $0x20
    pop %dx
    pop %ax
    iret
