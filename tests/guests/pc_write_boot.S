# A boot sector that writes a sector through INT 13h, reads it back into another buffer,
# compares, and prints what it read on COM1; then writes 0x10 to port 0xf4 (status 33).
# On any failure it prints why and writes 0x01 (status 3).

        .set    COM1, 0x3f8
        .set    OUT_BUFFER, 0x8000
        .set    IN_BUFFER, 0x8200

        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7c00, %sp
        sti
        mov     %dl, boot_drive
        cld

        mov     $OUT_BUFFER, %di        # the sector to write: the text, then zeros
        mov     $1024, %cx              # both buffers
        xor     %al, %al
        rep     stosb
        mov     $text, %si
        mov     $OUT_BUFFER, %di
        mov     $text_end - text, %cx
        rep     movsb

        mov     $0x0301, %ax            # AH=03h write, 1 sector
        mov     $0x0003, %cx            # cylinder 0, sector 3 (LBA 2)
        xor     %dh, %dh
        mov     boot_drive, %dl
        mov     $OUT_BUFFER, %bx
        int     $0x13
        mov     $write_failed, %si
        jc      fail

        mov     $0x0201, %ax            # AH=02h read it back
        mov     $0x0003, %cx
        xor     %dh, %dh
        mov     boot_drive, %dl
        mov     $IN_BUFFER, %bx
        int     $0x13
        mov     $read_failed, %si
        jc      fail

        mov     $OUT_BUFFER, %si
        mov     $IN_BUFFER, %di
        mov     $512, %cx
        repe    cmpsb
        mov     $mismatch, %si
        jne     fail

        mov     $read_back, %si
        call    print
        mov     $IN_BUFFER, %si
        call    print
        mov     $0x10, %al
        out     %al, $0xf4
        jmp     halt

fail:
        call    print
        mov     $0x01, %al
        out     %al, $0xf4
halt:
        cli
        hlt
        jmp     halt

boot_drive:
        .byte   0
text:
        .asciz  "written by the boot sector\r\n"
text_end:
read_back:
        .asciz  "read back: "
write_failed:
        .asciz  "write failed\r\n"
read_failed:
        .asciz  "read failed\r\n"
mismatch:
        .asciz  "read back something else\r\n"
