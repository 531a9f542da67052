/*
 * vmcgi-agent: the guest's PID 1 once the HTTP server is up (images/init execs
 * it). It listens on the console for vmcgi's reseed line: a clone of a
 * snapshot is reseeded and given the time before it serves (see reseed.h,
 * which images/image-init.c shares).
 *
 * It is freestanding (no libc): a few kilobytes in the initramfs, no C library
 * for the guest's architecture, and no fork per reseed, which is dear under
 * emulation.
 */

#define AT_FDCWD (-100)
#define O_RDWR 2
#define CLOCK_REALTIME 0

#if defined(__aarch64__)
#define SYS_openat 56
#define SYS_read 63
#define SYS_write 64
#define SYS_ioctl 29
#define SYS_close 57
#define SYS_clock_settime 112
#define SYS_nanosleep 101
#define SYS_exit 93
static long syscall3(long number, long a, long b, long c) {
	register long x8 __asm__("x8") = number;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;
	__asm__ volatile("svc #0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
	return x0;
}
__asm__(".global _start\n_start:\n\tbl start\n");
#elif defined(__x86_64__)
#define SYS_openat 257
#define SYS_read 0
#define SYS_write 1
#define SYS_ioctl 16
#define SYS_close 3
#define SYS_clock_settime 227
#define SYS_nanosleep 35
#define SYS_exit 60
static long syscall3(long number, long a, long b, long c) {
	long result;
	__asm__ volatile("syscall" : "=a"(result) : "a"(number), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return result;
}
__asm__(".global _start\n_start:\n\tand $-16, %rsp\n\tcall start\n");
#else
#error "vmcgi-agent knows aarch64 and x86_64"
#endif

struct timespec {
	long tv_sec, tv_nsec;
};

#include "reseed.h"

__attribute__((noreturn, used)) void start(void) {
	static struct reseed_console console;
	struct timespec hour = { 3600, 0 };
	long fd = syscall3(SYS_openat, AT_FDCWD, (long)"/dev/console", O_RDWR);

	if (fd >= 0) {
		reseed_listen(&console, fd);
		while (reseed_read_console(&console) > 0) {
		}
	}
	/* PID 1 must never exit. */
	for (;;) syscall3(SYS_nanosleep, (long)&hour, 0, 0);
}
