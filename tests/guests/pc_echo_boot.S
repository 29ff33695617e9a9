# A boot sector that says "ready" on COM1, reads a line from COM1 (polling the line status
# register for received data), prints it back after "got: ", then writes 0x10 to port 0xf4
# (status 33). The test types the line only after "ready": input that came earlier could be
# taken by the firmware's serial console, or cleared with the FIFO, as on real hardware.

        .set    COM1, 0x3f8
        .set    LINE, 0x8000

        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7c00, %sp
        cld

        mov     $ready, %si
        call    print
        mov     $LINE, %di
receive:
        mov     $COM1 + 5, %dx
wait_data:
        in      %dx, %al                # line status: bit 0, data ready
        test    $0x01, %al
        jz      wait_data
        mov     $COM1, %dx
        in      %dx, %al
        stosb
        cmp     $0x0a, %al
        jne     receive
        movb    $0, (%di)

        mov     $got, %si
        call    print
        mov     $LINE, %si
        call    print
        mov     $0x10, %al
        out     %al, $0xf4
halt:
        hlt
        jmp     halt

ready:
        .asciz  "ready\n"
got:
        .asciz  "got: "
