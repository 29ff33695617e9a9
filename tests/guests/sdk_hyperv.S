/*
 * Guest for the SDK's Hyper-V scenario (tests/test_sdk_e2e.py): 32-bit protected mode (set
 * up by the plugin through sregs) at 0x1000. It enables the SynIC (a SynIC exit), declares a
 * guest OS (needed for hypercalls), makes a HvPostMessage hypercall (a hypercall exit whose
 * result the plugin gives) and writes that result's low half to port 0x601.
 */
    mov $0x40000080, %ecx           /* HV_X64_MSR_SCONTROL */
    mov $1, %eax
    xor %edx, %edx
    wrmsr

    mov $0x40000000, %ecx           /* HV_X64_MSR_GUEST_OS_ID */
    mov $0x8100, %eax
    xor %edx, %edx
    wrmsr

    mov $0x5c, %eax                 /* input: HvPostMessage (edx:eax) */
    xor %edx, %edx
    mov $0x2000, %ecx               /* input page (ebx:ecx) */
    xor %ebx, %ebx
    mov $0x3000, %esi               /* output page (edi:esi) */
    xor %edi, %edi
    vmcall

    mov $0x601, %dx
    out %eax, %dx
    mov $0x60f, %dx
    out %al, %dx
halt:
    cli
    hlt
    jmp halt
