# The demo's guest program: 16-bit real mode, loaded at guest physical 0x1000 with CS = DS = 0.
# VCPU 0 starts at 0x1000, VCPU 1 at 0x1010: two fixed entry points that jump to the code
# (the plugin sets each VCPU's RIP and stack).
# Both greet through the serial port at 0x3f8, polling the line-status register (0x3fd) for
# "transmit holding register empty" before each byte, as a driver for a 16550 would.
# VCPU 0 then computes the sum of the squares of 1..100 and writes it, 32 bits, to port 0x500.
# Each VCPU finally writes its number to port 0x501 ("done") and halts.

        jmp     vcpu0                   # 0x1000: VCPU 0's entry
        .org    0x10
        jmp     vcpu1                   # 0x1010: VCPU 1's entry

vcpu0:
        mov     $greeting0, %si
        call    puts
        xor     %ecx, %ecx              # i
        xor     %ebx, %ebx              # sum of i*i
next_square:
        inc     %ecx
        mov     %ecx, %eax
        imul    %ecx, %eax
        add     %eax, %ebx
        cmp     $100, %ecx
        jne     next_square
        mov     %ebx, %eax
        mov     $0x500, %dx
        out     %eax, %dx               # the result, for the plugin to check
        mov     $0, %al
        jmp     done

vcpu1:
        mov     $greeting1, %si
        call    puts
        mov     $1, %al

done:
        mov     $0x501, %dx
        out     %al, %dx
halt:
        cli
        hlt
        jmp     halt

# puts: write the NUL-terminated string at DS:SI to the serial port.
puts:
        lodsb
        test    %al, %al
        jz      puts_end
        mov     %al, %ah
wait_thre:
        mov     $0x3fd, %dx             # line status register
        in      %dx, %al
        test    $0x20, %al              # transmit holding register empty?
        jz      wait_thre
        mov     %ah, %al
        mov     $0x3f8, %dx             # transmit holding register
        out     %al, %dx
        jmp     puts
puts_end:
        ret

greeting0:
        .asciz  "Hello from VCPU 0!\n"
greeting1:
        .asciz  "Hello from VCPU 1!\n"
