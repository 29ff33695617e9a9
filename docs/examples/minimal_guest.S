# The minimal example's guest: 16-bit real mode, loaded at guest physical 0x1000 with
# CS = DS = 0 (the plugin sets that up at Init). It prints a greeting on the console port
# 0xe9, asks the plugin for a number at port 0x500, writes twice that number to port 0x501
# and halts.

        mov     $greeting, %si
        mov     $0xe9, %dx
print:
        lodsb                           # al = next byte of the greeting
        test    %al, %al
        jz      ask
        out     %al, %dx                # one console byte (an async write)
        jmp     print
ask:
        mov     $0x500, %dx
        in      %dx, %ax                # the plugin answers this read
        add     %ax, %ax
        mov     $0x501, %dx
        out     %ax, %dx                # the doubled number
halt:
        cli
        hlt
        jmp     halt

greeting:
        .asciz  "Hello from the guest!\n"
