# A boot sector that checks what the BIOS left write-protected, then asks for a reset.
# It flips a byte of the BIOS in the f-segment (F000:FFF5, the date string) and reads it
# back: PAM made that segment read-only, so the write must not stick. It prints the verdict
# on COM1, then writes 0x06 to port 0xcf9 (PIIX reset control: hard reset).

        .set    COM1, 0x3f8

        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %ss
        mov     $0x7c00, %sp
        mov     $0xf000, %ax
        mov     %ax, %es

        mov     %es:0xfff5, %bl         # original byte
        mov     %bl, %bh
        not     %bh
        mov     %bh, %es:0xfff5         # try to change it
        mov     %es:0xfff5, %cl
        mov     $read_only, %si
        cmp     %bl, %cl
        je      report
        mov     $writable, %si
report:
        call    print
        mov     $0x06, %al
        mov     $0xcf9, %dx
        out     %al, %dx
halt:
        hlt
        jmp     halt

print:
        lodsb
        test    %al, %al
        jz      printed
        mov     %al, %ah
        mov     $COM1 + 5, %dx
wait_ready:
        in      %dx, %al
        test    $0x20, %al
        jz      wait_ready
        mov     %ah, %al
        mov     $COM1, %dx
        out     %al, %dx
        jmp     print
printed:
        ret

read_only:
        .asciz  "f-segment: read-only\r\n"
writable:
        .asciz  "f-segment: WRITABLE\r\n"

        .org    510
        .byte   0x55, 0xaa
