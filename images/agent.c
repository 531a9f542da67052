/*
 * vmcgi-agent: the guest's PID 1 once the HTTP server is up (images/init execs
 * it). It listens on the console for vmcgi.
 *
 * A clone of a snapshot resumes here with the template's RNG state and clock.
 * Before it serves, vmcgi writes "vmcgi-seed HEX EPOCH NONCE" on the console;
 * the agent credits the bytes HEX to the kernel's entropy pool, makes its CRNG
 * reseed now (the RNDADDENTROPY and RNDRESEEDCRNG ioctls of random(4)), sets
 * the clock to EPOCH seconds, and answers "vmcgi: reseeded NONCE". Writing to
 * /dev/urandom alone would only mix the input pool, and the CRNG would keep
 * its state until its next scheduled reseed. A cold boot never hears anything.
 *
 * It is freestanding (no libc): a few kilobytes in the initramfs, no C library
 * for the guest's architecture, and no fork per reseed, which is dear under
 * emulation.
 */

#define RNDADDENTROPY 0x40085203 /* _IOW('R', 0x03, int[2]) */
#define RNDRESEEDCRNG 0x5207     /* _IO('R', 0x07) */
#define TCGETS 0x5401
#define TCSETS 0x5402
#define ECHO 0000010
#define AT_FDCWD (-100)
#define O_RDWR 2
#define CLOCK_REALTIME 0
#define MAX_SEED 64
#define LINE_MAX 512

#if defined(__aarch64__)
#define SYS_openat 56
#define SYS_read 63
#define SYS_write 64
#define SYS_ioctl 29
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

/* struct termios of the kernel (asm-generic), the same on both. */
struct termios {
	unsigned int c_iflag, c_oflag, c_cflag, c_lflag;
	unsigned char c_line, c_cc[19];
};

/* struct rand_pool_info from <linux/random.h>, with room for the bytes. */
struct entropy {
	int entropy_count; /* bits */
	int buf_size;      /* bytes */
	unsigned char buf[MAX_SEED];
};

struct timespec {
	long tv_sec, tv_nsec;
};

static long length(const char *text) {
	long n = 0;
	while (text[n]) n++;
	return n;
}

static void say(long console, const char *text) {
	syscall3(SYS_write, console, (long)text, length(text));
}

static int hex_digit(char c) {
	if (c >= '0' && c <= '9') return c - '0';
	if (c >= 'a' && c <= 'f') return c - 'a' + 10;
	return -1;
}

/* Splits off the next space-separated word of *line, or returns 0. */
static char *next_word(char **line) {
	char *word = *line;
	while (*word == ' ') word++;
	if (!*word) return 0;
	*line = word;
	while (**line && **line != ' ') (*line)++;
	if (**line) *(*line)++ = 0;
	return word;
}

static int equal(const char *a, const char *b) {
	while (*a && *a == *b) a++, b++;
	return *a == *b;
}

/* "vmcgi-seed HEX EPOCH NONCE": 0 when done, -1 when the line is not one. */
static int reseed(char *line, char **nonce) {
	static struct entropy entropy;
	struct timespec now = { 0, 0 };
	char *word = next_word(&line), *hex = next_word(&line), *epoch = next_word(&line);
	int n = 0;
	long fd, failed;

	*nonce = next_word(&line);
	if (!word || !equal(word, "vmcgi-seed") || !hex || !epoch || !*nonce) return -1;
	for (; hex[0] && hex[1] && n < MAX_SEED; hex += 2) {
		int high = hex_digit(hex[0]), low = hex_digit(hex[1]);
		if (high < 0 || low < 0) return 1;
		entropy.buf[n++] = (unsigned char)(high << 4 | low);
	}
	for (; *epoch; epoch++) {
		if (*epoch < '0' || *epoch > '9') return 1;
		now.tv_sec = now.tv_sec * 10 + (*epoch - '0');
	}
	if (n == 0) return 1;
	entropy.entropy_count = n * 8;
	entropy.buf_size = n;

	fd = syscall3(SYS_openat, AT_FDCWD, (long)"/dev/urandom", O_RDWR);
	if (fd < 0) return 1;
	failed = syscall3(SYS_ioctl, fd, RNDADDENTROPY, (long)&entropy) < 0
		|| syscall3(SYS_ioctl, fd, RNDRESEEDCRNG, 0) < 0
		|| syscall3(SYS_clock_settime, CLOCK_REALTIME, (long)&now, 0) < 0;
	return failed ? 1 : 0;
}

__attribute__((noreturn, used)) void start(void) {
	static char line[LINE_MAX];
	struct termios tty;
	struct timespec hour = { 3600, 0 };
	long console = syscall3(SYS_openat, AT_FDCWD, (long)"/dev/console", O_RDWR), used = 0, got;

	/* vmcgi's seed must not come back in the console log. */
	if (syscall3(SYS_ioctl, console, TCGETS, (long)&tty) == 0) {
		tty.c_lflag &= ~ECHO;
		syscall3(SYS_ioctl, console, TCSETS, (long)&tty);
	}
	while (console >= 0 && (got = syscall3(SYS_read, console, (long)(line + used), LINE_MAX - 1 - used)) > 0) {
		long end, start_of_line = 0;
		used += got;
		for (end = 0; end < used; end++) {
			char *nonce;
			int result;
			if (line[end] != '\n' && line[end] != '\r') continue;
			line[end] = 0;
			result = reseed(line + start_of_line, &nonce);
			if (result >= 0) {
				say(console, result == 0 ? "vmcgi: reseeded " : "vmcgi: reseed failed ");
				say(console, nonce);
				say(console, "\n");
			}
			start_of_line = end + 1;
		}
		/* Keep the unfinished line; drop an overlong one. */
		for (end = 0; start_of_line + end < used; end++) line[end] = line[start_of_line + end];
		used = used - start_of_line >= LINE_MAX - 1 ? 0 : used - start_of_line;
	}
	/* PID 1 must never exit. */
	for (;;) syscall3(SYS_nanosleep, (long)&hour, 0, 0);
}
