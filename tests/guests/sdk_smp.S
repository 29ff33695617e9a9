/*
 * Guest for the SDK's multi-VCPU scenario (tests/test_sdk_e2e.py): every VCPU runs this
 * from 0x1000 in 16-bit real mode, with its number in %si (set by the plugin at Init).
 * It reads port 0x600 (the plugin answers per VCPU), writes the value plus one to 0x601,
 * writes sixteen bytes N*16 .. N*16+15 to the async port 0x620, reports "done" at 0x60f and
 * halts, to be paused by the plugin.
 */
    mov $0x600, %dx
    in %dx, %ax
    inc %ax
    mov $0x601, %dx
    out %ax, %dx

    mov %si, %ax
    shl $4, %al
    mov $16, %cx
    mov $0x620, %dx
burst:
    out %al, %dx
    inc %al
    loop burst

    mov $0x60f, %dx
    out %al, %dx
halt:
    cli
    hlt
    jmp halt
