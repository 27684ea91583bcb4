/* cortex_m4_startup.c: the smallest start for a Cortex-M4 with newlib (a `qexport to-c` test harness,
 * not needed by the model). The vector table gives the stack and the reset handler; the reset handler
 * turns the FPU on (CPACR: full access to CP10 and CP11) and enters newlib's _start, which clears
 * .bss, copies nothing (data is linked in RAM by QEMU's loader), sets up semihosting and calls main. */
#include <stdint.h>

extern uint32_t __stack_top;
extern void _start(void);

void reset_handler(void);
void default_handler(void);

void reset_handler(void)
{
    volatile uint32_t *cpacr = (volatile uint32_t *)0xE000ED88u;
    *cpacr |= 0xFu << 20;
    __asm volatile("dsb\n\tisb");
    _start();
    for (;;) {
    }
}

void default_handler(void)
{
    for (;;) {
    }
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))(uintptr_t)&__stack_top, reset_handler, default_handler, default_handler,
    default_handler, default_handler, default_handler, 0, 0, 0, 0, default_handler, default_handler, 0,
    default_handler, default_handler,
};
