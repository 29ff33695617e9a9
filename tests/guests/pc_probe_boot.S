# A boot sector that checks what the BIOS left behind, then asks for a reset.
# 1. It flips a byte of the BIOS in the f-segment (F000:FFF5, the date string) and reads it
#    back: PAM made that segment read-only, so the write must not stick.
# 2. It looks for the SMBIOS entry point ("_SM_" ... "_DMI_", 16-byte aligned in the
#    f-segment), walks the structure table it points to and prints the product name of the
#    type 1 (system) structure.
# It prints its findings on COM1, then writes 0x06 to port 0xcf9 (PIIX reset control: hard
# reset).

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
        je      1f
        mov     $writable, %si
1:      call    print

        xor     %di, %di                # ES = 0xf000 still
find_anchor:
        cmpl    $0x5f4d535f, %es:(%di)  # "_SM_"
        jne     2f
        cmpl    $0x494d445f, %es:0x10(%di)      # "_DMI"
        je      found_anchor
2:      add     $16, %di
        jnz     find_anchor
        mov     $no_smbios, %si
        jmp     report_smbios
found_anchor:
        mov     %es:0x18(%di), %eax     # the structure table's linear address
        mov     %ax, %si
        and     $0xf, %si
        shr     $4, %eax
        mov     %ax, %es                # ES:SI = the first structure
walk:
        mov     %es:(%si), %al          # type
        cmp     $127, %al
        je      no_type1
        cmp     $1, %al
        je      type1
        call    skip_structure
        jmp     walk
type1:
        push    %si
        mov     $product, %si
        call    print
        pop     %si
        movzbw  %es:1(%si), %ax         # formatted length: the strings follow
        add     %ax, %si
        call    skip_string             # string 1: manufacturer; string 2: product name
        call    print_es
        mov     $newline, %si
        jmp     report_smbios
no_type1:
        mov     $no_system, %si
report_smbios:
        call    print

        mov     $0x06, %al
        mov     $0xcf9, %dx
        out     %al, %dx
halt:
        hlt
        jmp     halt

# ES:SI: a structure -> the next one (past its formatted area and its strings' double NUL).
skip_structure:
        movzbw  %es:1(%si), %ax
        add     %ax, %si
1:      call    skip_string
        cmpb    $0, %es:(%si)
        jne     1b
        inc     %si
        ret

skip_string:
        mov     %es:(%si), %al
        inc     %si
        test    %al, %al
        jnz     skip_string
        ret

# Print the NUL-terminated string at ES:SI on COM1 (`print`, added after this code, prints
# from DS:SI).
print_es:
        push    %ds
        push    %es
        pop     %ds
        call    print
        pop     %ds
        ret

read_only:
        .asciz  "f-segment: read-only\r\n"
writable:
        .asciz  "f-segment: WRITABLE\r\n"
product:
        .asciz  "SMBIOS product: "
newline:
        .asciz  "\r\n"
no_smbios:
        .asciz  "SMBIOS: no entry point\r\n"
no_system:
        .asciz  "SMBIOS: no system structure\r\n"
