# The PC demo disk's boot sector (loaded by the BIOS at 0x7c00, run in real mode).
# It reads the disk's second sector through INT 13h, prints the text it holds on COM1,
# then writes 0x10 to the isa-debug-exit port 0xf4: the run ends with status 33.
# On a disk error it prints a message and writes 0x01 instead (status 3).

        .set    COM1, 0x3f8
        .set    EXIT_PORT, 0xf4
        .set    BUFFER, 0x7e00

        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7c00, %sp
        sti
        mov     %dl, boot_drive         # the BIOS passes the boot drive in DL

        mov     $hello, %si
        call    print

        mov     $0x0201, %ax            # AH=02h read, AL=1 sector
        mov     $0x0002, %cx            # cylinder 0, sector 2
        xor     %dh, %dh                # head 0
        mov     boot_drive, %dl
        mov     $BUFFER, %bx
        int     $0x13
        jc      failed

        mov     $BUFFER, %si
        call    print
        mov     $0x10, %al
        jmp     finish

failed:
        mov     $error, %si
        call    print
        mov     $0x01, %al
finish:
        out     %al, $EXIT_PORT
halt:
        cli
        hlt
        jmp     halt

boot_drive:
        .byte   0
hello:
        .asciz  "Boot sector: reading sector 1 through INT 13h\r\n"
error:
        .asciz  "Boot sector: INT 13h failed\r\n"
