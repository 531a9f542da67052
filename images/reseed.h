/*
 * The guest's side of vmcgi's reseed protocol, shared by the two programs
 * that can be a guest's PID 1: images/agent.c (the default guest,
 * freestanding) and images/image-init.c (container images, with libc).
 *
 * A clone of a snapshot resumes with the template's RNG state and clock.
 * Before it serves, vmcgi writes "vmcgi-seed HEX EPOCH NONCE" on the console
 * (and "vmcgi-seed HEX EPOCH NONCE save" to a template just before it is
 * saved, which is not a clone's restore);
 * the guest credits the bytes HEX to the kernel's entropy pool, makes its
 * CRNG reseed now (the RNDADDENTROPY and RNDRESEEDCRNG ioctls of random(4)),
 * sets the clock to EPOCH seconds, and answers "vmcgi: reseeded NONCE" (or
 * "vmcgi: reseed failed NONCE"). Writing to /dev/urandom alone would only
 * mix the input pool, and the CRNG would keep its state until its next
 * scheduled reseed. A cold boot never hears anything.
 *
 * No libc here, so that agent.c stays freestanding. The file that includes
 * this one provides:
 *   long syscall3(long number, long a, long b, long c), negative on failure;
 *   SYS_openat, SYS_read, SYS_write, SYS_ioctl, SYS_close, SYS_clock_settime;
 *   AT_FDCWD, O_RDWR, CLOCK_REALTIME and struct timespec.
 * agent.c defines them itself; image-init.c has them from glibc (syscall(2)).
 * The names defined here have a RESEED_ or reseed_ prefix so as not to clash
 * with libc's headers.
 */

#define RESEED_RNDADDENTROPY 0x40085203 /* _IOW('R', 0x03, int[2]) */
#define RESEED_RNDRESEEDCRNG 0x5207     /* _IO('R', 0x07) */
#define RESEED_TCGETS 0x5401
#define RESEED_TCSETS 0x5402
#define RESEED_ECHO 0000010
#define RESEED_MAX_SEED 64
#define RESEED_LINE_MAX 512

/* struct termios of the kernel (asm-generic), the same on both. */
struct reseed_termios {
	unsigned int c_iflag, c_oflag, c_cflag, c_lflag;
	unsigned char c_line, c_cc[19];
};

/* struct rand_pool_info from <linux/random.h>, with room for the bytes. */
struct reseed_entropy {
	int entropy_count; /* bits */
	int buf_size;      /* bytes */
	unsigned char buf[RESEED_MAX_SEED];
};

/* The console and the line being read from it. */
struct reseed_console {
	long fd;
	long used;
	long reseeded; /* seeds taken so far */
	/* If set, called once a clone's seed is taken (not a template's, marked
	 * "save") and before it is answered: what it does is done before vmcgi
	 * forwards the clone its request. */
	void (*on_seed)(void);
	char line[RESEED_LINE_MAX];
};

static int reseed_hex_digit(char c) {
	if (c >= '0' && c <= '9') return c - '0';
	if (c >= 'a' && c <= 'f') return c - 'a' + 10;
	return -1;
}

/* Splits off the next space-separated word of *line, or returns 0. */
static char *reseed_next_word(char **line) {
	char *word = *line;
	while (*word == ' ') word++;
	if (!*word) return 0;
	*line = word;
	while (**line && **line != ' ') (*line)++;
	if (**line) *(*line)++ = 0;
	return word;
}

static int reseed_equal(const char *a, const char *b) {
	while (*a && *a == *b) a++, b++;
	return *a == *b;
}

/* "vmcgi-seed HEX EPOCH NONCE [save]": 0 when done, 1 when it failed, -1
 * when the line is not one; *saving tells whether it said "save". */
static int reseed(char *line, char **nonce, int *saving) {
	static struct reseed_entropy entropy;
	struct timespec now = { 0, 0 };
	char *word = reseed_next_word(&line), *hex = reseed_next_word(&line), *epoch = reseed_next_word(&line), *purpose;
	int n = 0;
	long fd, failed;

	*nonce = reseed_next_word(&line);
	if (!word || !reseed_equal(word, "vmcgi-seed") || !hex || !epoch || !*nonce) return -1;
	purpose = reseed_next_word(&line);
	*saving = purpose && reseed_equal(purpose, "save");
	for (; hex[0] && hex[1] && n < RESEED_MAX_SEED; hex += 2) {
		int high = reseed_hex_digit(hex[0]), low = reseed_hex_digit(hex[1]);
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
	failed = syscall3(SYS_ioctl, fd, RESEED_RNDADDENTROPY, (long)&entropy) < 0
		|| syscall3(SYS_ioctl, fd, RESEED_RNDRESEEDCRNG, 0) < 0
		|| syscall3(SYS_clock_settime, CLOCK_REALTIME, (long)&now, 0) < 0;
	syscall3(SYS_close, fd, 0, 0);
	return failed ? 1 : 0;
}

/* "vmcgi: reseeded NONCE" or "vmcgi: reseed failed NONCE", in one write:
 * whatever else the guest prints cannot get inside the line. */
static void reseed_answer(long fd, int result, const char *nonce) {
	char answer[RESEED_LINE_MAX + 32];
	const char *prefix = result == 0 ? "vmcgi: reseeded " : "vmcgi: reseed failed ";
	long n = 0;
	while (*prefix) answer[n++] = *prefix++;
	while (*nonce && n < RESEED_LINE_MAX + 30) answer[n++] = *nonce++;
	answer[n++] = '\n';
	syscall3(SYS_write, fd, (long)answer, n);
}

/* Starts listening on the console fd, with echo off: vmcgi's seed must not
 * come back in the console log. */
static void reseed_listen(struct reseed_console *console, long fd) {
	struct reseed_termios tty;
	console->fd = fd;
	console->used = 0;
	console->reseeded = 0;
	console->on_seed = 0;
	if (syscall3(SYS_ioctl, fd, RESEED_TCGETS, (long)&tty) == 0) {
		tty.c_lflag &= ~RESEED_ECHO;
		syscall3(SYS_ioctl, fd, RESEED_TCSETS, (long)&tty);
	}
}

/* Reads the console once (blocking until it has something) and answers
 * every seed line now complete. Returns what read returned: > 0, or 0 at
 * end of file, or < 0 on an error, after which the console is of no more
 * use. */
static long reseed_read_console(struct reseed_console *console) {
	char *line = console->line;
	long got = syscall3(SYS_read, console->fd, (long)(line + console->used), RESEED_LINE_MAX - 1 - console->used);
	long end, start_of_line = 0, used;

	if (got <= 0) return got;
	used = console->used + got;
	for (end = 0; end < used; end++) {
		char *nonce;
		int result, saving = 0;
		if (line[end] != '\n' && line[end] != '\r') continue;
		line[end] = 0;
		result = reseed(line + start_of_line, &nonce, &saving);
		if (result == 0 && !saving && console->on_seed) console->on_seed();
		if (result >= 0) reseed_answer(console->fd, result, nonce);
		if (result == 0) console->reseeded++;
		start_of_line = end + 1;
	}
	/* Keep the unfinished line; drop an overlong one. */
	for (end = 0; start_of_line + end < used; end++) line[end] = line[start_of_line + end];
	console->used = used - start_of_line >= RESEED_LINE_MAX - 1 ? 0 : used - start_of_line;
	return got;
}
