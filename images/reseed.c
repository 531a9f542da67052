/*
 * vmcgi-reseed HEX EPOCH: credits the bytes HEX to the guest kernel's entropy
 * pool, makes its CRNG reseed now (the RNDADDENTROPY and RNDRESEEDCRNG ioctls
 * of random(4)), and sets the clock to EPOCH seconds. Clones of one snapshot
 * share their RNG state and clock until this runs; writing to /dev/urandom
 * alone would only mix the input pool, and the CRNG would keep its state until
 * its next scheduled reseed. One program rather than two saves a fork, which
 * is dear under emulation.
 *
 * Freestanding (no libc), so that it adds a few hundred bytes to the
 * initramfs and needs no C library for the guest's architecture.
 */

#define RNDADDENTROPY 0x40085203 /* _IOW('R', 0x03, int[2]) */
#define RNDRESEEDCRNG 0x5207     /* _IO('R', 0x07) */
#define AT_FDCWD (-100)
#define O_RDWR 2
#define CLOCK_REALTIME 0
#define MAX_BYTES 256

#if defined(__aarch64__)
#define SYS_openat 56
#define SYS_ioctl 29
#define SYS_clock_settime 112
#define SYS_exit 93
static long syscall3(long number, long a, long b, long c) {
	register long x8 __asm__("x8") = number;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;
	__asm__ volatile("svc #0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
	return x0;
}
__asm__(".global _start\n_start:\n\tmov x0, sp\n\tbl start\n");
#elif defined(__x86_64__)
#define SYS_openat 257
#define SYS_ioctl 16
#define SYS_clock_settime 227
#define SYS_exit 60
static long syscall3(long number, long a, long b, long c) {
	long result;
	__asm__ volatile("syscall" : "=a"(result) : "a"(number), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return result;
}
__asm__(".global _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start\n");
#else
#error "vmcgi-reseed knows aarch64 and x86_64"
#endif

/* struct rand_pool_info from <linux/random.h>, with room for the bytes. */
struct entropy {
	int entropy_count; /* bits */
	int buf_size;      /* bytes */
	unsigned char buf[MAX_BYTES];
};

static int hex_digit(char c) {
	if (c >= '0' && c <= '9') return c - '0';
	if (c >= 'a' && c <= 'f') return c - 'a' + 10;
	if (c >= 'A' && c <= 'F') return c - 'A' + 10;
	return -1;
}

static int reseed(int argc, char **argv) {
	static struct entropy entropy;
	struct { long tv_sec; long tv_nsec; } now = { 0, 0 };
	const char *hex, *digit;
	int n = 0;
	long fd;

	if (argc != 3) return 2;
	for (digit = argv[2]; *digit; digit++) {
		if (*digit < '0' || *digit > '9') return 2;
		now.tv_sec = now.tv_sec * 10 + (*digit - '0');
	}
	for (hex = argv[1]; hex[0] && hex[1]; hex += 2) {
		int high = hex_digit(hex[0]), low = hex_digit(hex[1]);
		if (high < 0 || low < 0 || n == MAX_BYTES) return 2;
		entropy.buf[n++] = (unsigned char)(high << 4 | low);
	}
	if (n == 0 || hex[0]) return 2;
	entropy.entropy_count = n * 8;
	entropy.buf_size = n;

	fd = syscall3(SYS_openat, AT_FDCWD, (long)"/dev/urandom", O_RDWR);
	if (fd < 0) return 1;
	if (syscall3(SYS_ioctl, fd, RNDADDENTROPY, (long)&entropy) < 0) return 1;
	if (syscall3(SYS_ioctl, fd, RNDRESEEDCRNG, 0) < 0) return 1;
	if (syscall3(SYS_clock_settime, CLOCK_REALTIME, (long)&now, 0) < 0) return 1;
	return 0;
}

__attribute__((noreturn, used)) void start(long *stack) {
	syscall3(SYS_exit, reseed((int)stack[0], (char **)(stack + 1)), 0, 0);
	for (;;) {}
}
