# What `vmsuper.pc.demo_disk.boot_sector` adds after every boot sector's own code: `print`,
# which sends the NUL-terminated string at DS:SI to COM1 (the boot sector sets COM1),
# waiting for the transmitter before each byte. Then the boot signature at byte 510.

print:
        lodsb
        test    %al, %al
        jz      print_done
        mov     %al, %ah
        mov     $COM1 + 5, %dx
print_wait_ready:
        in      %dx, %al                # line status: bit 5, transmitter holding register empty
        test    $0x20, %al
        jz      print_wait_ready
        mov     %ah, %al
        mov     $COM1, %dx
        out     %al, %dx
        jmp     print
print_done:
        ret

        .org    510
        .byte   0x55, 0xaa
