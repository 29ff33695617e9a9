/*
 * Guest for the SDK's VCPU-state scenario (tests/test_sdk_e2e.py): 16-bit real mode at
 * 0x1000. It shows the plugin, through port 0x601, the state the plugin set at Init: an
 * MSR, a CPUID leaf and a general register. Port 0x60f means "done".
 */

    mov $0x174, %ecx                /* IA32_SYSENTER_CS */
    rdmsr
    mov $0x601, %dx
    out %eax, %dx

    mov $0x40000000, %eax
    cpuid
    mov %ebx, %eax
    mov $0x601, %dx
    out %eax, %dx

    mov %esi, %eax
    out %eax, %dx

    mov $0x60f, %dx
    out %al, %dx
halt:
    cli
    hlt
    jmp halt
