/*
 * image-init: PID 1 of a guest that runs a container image.
 *
 * The host flattens the image into a read-only erofs disk (/dev/vda) and
 * boots vmcgi's kernel with a tiny initramfs: this program as /init,
 * /dev/console, a few empty directories, and /vmcgi/app, which says how to
 * run the image's program (NUL-terminated "key=value" strings: uid, gid,
 * groups, cwd, port, env (repeated), arg (repeated)).
 *
 * In order, it: mounts the image under a tmpfs overlay, so the program may
 * write anywhere; gives the new root /proc, /sys, /dev, /tmp, /dev/shm and
 * /dev/pts and switches to it; brings up the network QEMU's user networking
 * expects; names the host; starts the program as the image's user; then
 * reaps zombies, forwards signals to the program, answers vmcgi's reseed
 * line (reseed.h) and prints "vmcgi: ready" once the program listens on its
 * port. When the program exits, the VM ends.
 *
 * With vmcgi_start=seed on the kernel's command line (vmcgi adds it for the
 * template of clone mode saved before the app: vm.snapshot.at "boot"), it prints "vmcgi: booted"
 * instead of starting the program, and starts it after the first seed: each
 * clone then starts the program afresh, with entropy and a clock of its own,
 * and nothing the program draws at start-up repeats between clones.
 *
 * With "restore-signal=N" in /vmcgi/app (--restore-signal), a program that
 * was started before the snapshot is sent signal N in each clone, once the
 * seed is taken and before vmcgi hears so: the program's cue to draw again
 * what it drew at start-up.
 *
 * vmcgi parses the console, so nothing else is printed on a normal boot. Any
 * failure prints "vmcgi: init failed: WHAT: REASON" and ends the VM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* What reseed.h needs from its includer (agent.c makes raw system calls). */
static long syscall3(long number, long a, long b, long c) {
	return syscall(number, a, b, c);
}
#include "reseed.h"

#define APP_SPEC "/vmcgi/app"
/* How often to look for the program's listening socket until there is one. */
#define READY_POLL_MS 20

/* What /vmcgi/app says; the strings point into the file's contents. */
struct app {
	uid_t uid;
	gid_t gid;
	gid_t *groups;
	size_t group_count;
	const char *cwd;
	unsigned port;
	char **env;  /* NULL-terminated */
	char **argv; /* NULL-terminated, at least one */
	int restore_signal; /* 0: none */
};

/* The console: the kernel's fd 2 until main opens one of its own. */
static int console = 2;

/* ---------------------------------------------------------------- failing */

/* Prints "vmcgi: init failed: WHAT: strerror(errno)" on the console. */
__attribute__((format(printf, 1, 0)))
static void complain(const char *format, va_list args) {
	int error = errno;
	char what[512];
	vsnprintf(what, sizeof what, format, args);
	dprintf(console, "vmcgi: init failed: %s: %s\n", what, strerror(error));
}

/* Ends the VM. QEMU runs with -no-reboot, so a reset makes it exit, on both
 * machines; a power-off would only halt the x86_64 microvm, which has no
 * ACPI (reboot=t on its command line makes the reset work there). */
__attribute__((noreturn))
static void end_vm(void) {
	sync();
	reboot(RB_AUTOBOOT);
	reboot(RB_POWER_OFF);
	for (;;) pause(); /* PID 1 must never exit: the kernel would panic. */
}

__attribute__((noreturn, format(printf, 1, 2)))
static void fail(const char *format, ...) {
	va_list args;
	va_start(args, format);
	complain(format, args);
	va_end(args);
	end_vm();
}

/* In the program's process, before exec: PID 1 then reports status 127. */
__attribute__((noreturn, format(printf, 1, 2)))
static void fail_child(const char *format, ...) {
	va_list args;
	va_start(args, format);
	complain(format, args);
	va_end(args);
	_exit(127);
}

/* ---------------------------------------------------------------- the spec */

/* A mistake in /vmcgi/app (the host tool's), reported as EINVAL. */
__attribute__((noreturn, format(printf, 1, 2)))
static void fail_spec(const char *format, ...) {
	va_list args;
	errno = EINVAL;
	va_start(args, format);
	complain(format, args);
	va_end(args);
	end_vm();
}

/* A decimal number from 0 to max, or -1. */
static long long number(const char *text, unsigned long max) {
	char *end;
	unsigned long value;
	if (*text < '0' || *text > '9') return -1;
	errno = 0;
	value = strtoul(text, &end, 10);
	if (errno || *end || value > max) return -1;
	return (long long)value;
}

/* A uid or gid: 32 bits, of which -1 means "unchanged" to the kernel. */
static unsigned id(const char *key, const char *text) {
	long long value = number(text, 0xfffffffeUL);
	if (value < 0) fail_spec(APP_SPEC ": %s=%s", key, text);
	return (unsigned)value;
}

/* "N,N,...", or "" for none. */
static void parse_groups(struct app *app, char *list) {
	size_t n = 1;
	char *p;
	for (p = list; *p; p++) n += *p == ',';
	app->groups = calloc(n, sizeof *app->groups);
	if (!app->groups) fail("calloc");
	app->group_count = 0;
	while (*list) {
		char *comma = strchr(list, ',');
		if (comma) *comma = 0;
		app->groups[app->group_count++] = id("groups", list);
		if (!comma) break;
		list = comma + 1;
	}
}

/* The whole file, read to its end: procfs files report a size of 0 or less
 * than they hold. */
static char *read_file(const char *path, size_t *size) {
	char *text = NULL;
	size_t done = 0, room = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) fail("open %s", path);
	for (;;) {
		ssize_t got;
		if (done + 1 >= room) {
			room = room ? room * 2 : 4096;
			text = realloc(text, room);
			if (!text) fail("realloc");
		}
		got = read(fd, text + done, room - done - 1);
		if (got < 0) fail("read %s", path);
		if (got == 0) break;
		done += (size_t)got;
	}
	close(fd);
	text[done] = 0; /* in case the last string lacks its NUL */
	*size = done;
	return text;
}

/* Reads /vmcgi/app, which is in the initramfs: before the switch of root. */
static void read_app(struct app *app) {
	size_t size, strings = 1, env_count = 0, arg_count = 0, i;
	char *text = read_file(APP_SPEC, &size), *entry, *next;
	int have_uid = 0, have_gid = 0;

	memset(app, 0, sizeof *app);
	for (i = 0; i < size; i++) strings += text[i] == 0;
	app->env = calloc(strings + 1, sizeof *app->env);
	app->argv = calloc(strings + 1, sizeof *app->argv);
	if (!app->env || !app->argv) fail("calloc");

	for (entry = text; entry < text + size; entry = next) {
		char *value = strchr(entry, '=');
		next = entry + strlen(entry) + 1;
		if (!*entry) continue;
		if (!value) fail_spec(APP_SPEC ": no '=' in '%s'", entry);
		*value++ = 0;
		if (!strcmp(entry, "uid")) {
			app->uid = id(entry, value);
			have_uid = 1;
		} else if (!strcmp(entry, "gid")) {
			app->gid = id(entry, value);
			have_gid = 1;
		} else if (!strcmp(entry, "groups")) {
			parse_groups(app, value);
		} else if (!strcmp(entry, "cwd")) {
			app->cwd = value;
		} else if (!strcmp(entry, "port")) {
			long long port = number(value, 65535);
			if (port < 1) fail_spec(APP_SPEC ": port=%s", value);
			app->port = (unsigned)port;
		} else if (!strcmp(entry, "env")) {
			app->env[env_count++] = value;
		} else if (!strcmp(entry, "arg")) {
			app->argv[arg_count++] = value;
		} else if (!strcmp(entry, "restore-signal")) {
			long long signo = number(value, 64);
			if (signo < 1 || signo == SIGKILL || signo == SIGSTOP) fail_spec(APP_SPEC ": restore-signal=%s", value);
			app->restore_signal = (int)signo;
		} else {
			fail_spec(APP_SPEC ": unknown key '%s'", entry);
		}
	}
	if (!have_uid || !have_gid || !app->port || !app->cwd || arg_count == 0)
		fail_spec(APP_SPEC ": uid, gid, port, cwd and an arg are required");
	if (app->cwd[0] != '/') fail_spec(APP_SPEC ": cwd=%s is not absolute", app->cwd);
}

/* ---------------------------------------------------------------- the root */

static void make_dir(const char *path, mode_t mode) {
	if (mkdir(path, mode) < 0 && errno != EEXIST) fail("mkdir %s", path);
}

static void mount_or_fail(const char *source, const char *target, const char *type, unsigned long flags,
			  const char *options) {
	if (mount(source, target, type, flags, options) < 0) fail("mount %s on %s", type ? type : source, target);
}

/* mkdir -p, as root: the program's cwd need not be in the image. */
static void make_dirs(const char *path) {
	char *copy = strdup(path), *slash;
	if (!copy) fail("strdup");
	for (slash = strchr(copy + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
		*slash = 0;
		make_dir(copy, 0755);
		*slash = '/';
	}
	make_dir(copy, 0755);
	free(copy);
}

/* The image, read-only, under a tmpfs that takes the writes, on /newroot. */
static void mount_image(void) {
	mount_or_fail("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_or_fail("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_or_fail("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL);
	mount_or_fail("/dev/vda", "/lower", "erofs", MS_RDONLY, NULL);
	mount_or_fail("tmpfs", "/rw", "tmpfs", 0, "mode=0755");
	make_dir("/rw/upper", 0755);
	make_dir("/rw/work", 0755);
	mount_or_fail("overlay", "/newroot", "overlay", 0, "lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work");
}

/* What a program expects to find mounted, whatever the image holds there.
 * (The mode of a directory that a mount covers does not show: the tmpfs
 * mounts' mode= does.) */
static void prepare_new_root(void) {
	static const char *const dirs[] = { "/newroot/proc", "/newroot/sys", "/newroot/dev", "/newroot/tmp", "/newroot/etc" };
	size_t i;
	for (i = 0; i < sizeof dirs / sizeof *dirs; i++) make_dir(dirs[i], 0755);
	mount_or_fail("/proc", "/newroot/proc", NULL, MS_MOVE, NULL);
	mount_or_fail("/sys", "/newroot/sys", NULL, MS_MOVE, NULL);
	mount_or_fail("/dev", "/newroot/dev", NULL, MS_MOVE, NULL);
	mount_or_fail("tmpfs", "/newroot/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	make_dir("/newroot/dev/shm", 0755);
	mount_or_fail("tmpfs", "/newroot/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	make_dir("/newroot/dev/pts", 0755);
	mount_or_fail("devpts", "/newroot/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
	/* devtmpfs usually has a ptmx node already, which finds pts/ by itself. */
	if (symlink("pts/ptmx", "/newroot/dev/ptmx") < 0 && errno != EEXIST) fail("symlink /dev/ptmx");
}

/* As switch_root does, minus deleting the initramfs: it is a few kilobytes. */
static void switch_root(void) {
	if (chdir("/newroot") < 0) fail("chdir /newroot");
	if (mount(".", "/", NULL, MS_MOVE, NULL) < 0) fail("move /newroot to /");
	if (chroot(".") < 0) fail("chroot /newroot");
	if (chdir("/") < 0) fail("chdir /");
}

/* ---------------------------------------------------------------- network */

static struct sockaddr ipv4(const char *address) {
	struct sockaddr_in in = { .sin_family = AF_INET, .sin_addr.s_addr = inet_addr(address) };
	struct sockaddr out;
	memcpy(&out, &in, sizeof in);
	return out;
}

static void interface_up(int sock, const char *name) {
	struct ifreq ifr = { 0 };
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0) fail("%s: get flags", name);
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(sock, SIOCSIFFLAGS, &ifr) < 0) fail("%s: up", name);
}

static void interface_address(int sock, const char *name, unsigned long request, const char *address) {
	struct ifreq ifr = { 0 };
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	ifr.ifr_addr = ipv4(address);
	if (ioctl(sock, request, &ifr) < 0) fail("%s: set %s", name, address);
}

/* QEMU's user networking: the guest is 10.0.2.15/24, the gateway 10.0.2.2.
 * (Bringing lo up gives it 127.0.0.1/8.) ioctls, since the image may have
 * no ip(8). */
/* Tells QEMU's user networking this guest's MAC address. Until the guest
 * has sent it a packet, it must ask by ARP before it can deliver the first
 * SYN of a connection, and a SYN that waits for that answer past its next
 * poll is dropped and sent again by its TCP only 6 s later. A datagram to the
 * discard port of the gateway makes the kernel ask for the gateway's address
 * by ARP, which carries ours; the datagram itself goes nowhere (restrict=on).
 * Best effort: nothing here is worth failing the boot for. */
static void announce_to_gateway(void) {
	struct sockaddr_in gateway = { .sin_family = AF_INET, .sin_port = htons(9) };
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0) return;
	gateway.sin_addr.s_addr = inet_addr("10.0.2.2");
	sendto(sock, "", 0, 0, (struct sockaddr *)&gateway, sizeof gateway);
	close(sock);
}

static void bring_up_network(void) {
	struct rtentry route = { 0 };
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0) fail("socket");
	interface_up(sock, "lo");
	interface_address(sock, "eth0", SIOCSIFADDR, "10.0.2.15");
	interface_address(sock, "eth0", SIOCSIFNETMASK, "255.255.255.0");
	interface_up(sock, "eth0");
	route.rt_dst = ipv4("0.0.0.0");
	route.rt_genmask = ipv4("0.0.0.0");
	route.rt_gateway = ipv4("10.0.2.2");
	route.rt_flags = RTF_UP | RTF_GATEWAY;
	if (ioctl(sock, SIOCADDRT, &route) < 0) fail("default route via 10.0.2.2");
	close(sock);
	announce_to_gateway();
}

/* Replaces what the image has at path (a symlink included, say to a
 * resolver's file that is not there) by a file of its own. */
static void write_etc(const char *path, const char *text) {
	size_t length = strlen(text);
	ssize_t wrote;
	int fd;
	if (unlink(path) < 0 && errno != ENOENT) fail("unlink %s", path);
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
	if (fd < 0) fail("create %s", path);
	wrote = write(fd, text, length);
	if (wrote != (ssize_t)length) {
		if (wrote >= 0) errno = EIO;
		fail("write %s", path);
	}
	close(fd);
}

/* There is no DNS server: a resolver pointed at 127.0.0.1 fails at once
 * (connection refused) rather than waiting for an answer that never comes. */
static void name_the_host(void) {
	if (sethostname("vmcgi", 5) < 0) fail("sethostname");
	write_etc("/etc/hostname", "vmcgi\n");
	write_etc("/etc/hosts", "127.0.0.1 localhost\n10.0.2.15 vmcgi\n");
	write_etc("/etc/resolv.conf", "nameserver 127.0.0.1\n");
}

/* ---------------------------------------------------------------- the app */

/* The program gets a clean slate: PID 1 blocks signals for its signalfd,
 * and a blocked mask survives exec. */
static void reset_signals(void) {
	struct sigaction default_action = { .sa_handler = SIG_DFL };
	sigset_t none;
	int sig;
	for (sig = 1; sig < NSIG; sig++) sigaction(sig, &default_action, NULL); /* SIGKILL and the like refuse */
	sigemptyset(&none);
	if (sigprocmask(SIG_SETMASK, &none, NULL) < 0) fail_child("sigprocmask");
}

__attribute__((noreturn))
static void run_app(const struct app *app) {
	int null;
	if (setsid() < 0) fail_child("setsid");
	null = open("/dev/null", O_RDONLY);
	if (null < 0) fail_child("open /dev/null");
	if (dup2(null, 0) < 0 || dup2(console, 1) < 0 || dup2(console, 2) < 0) fail_child("dup2");
	if (null > 2) close(null);
	/* Groups first, then the gid, then the uid: after setuid, no more. */
	if (setgroups(app->group_count, app->groups) < 0) fail_child("setgroups");
	if (setgid(app->gid) < 0) fail_child("setgid %u", (unsigned)app->gid);
	if (setuid(app->uid) < 0) fail_child("setuid %u", (unsigned)app->uid);
	if (chdir(app->cwd) < 0) fail_child("chdir %s", app->cwd);
	reset_signals();
	/* execvp looks argv[0] up in the PATH of environ: the program's own. */
	environ = app->env;
	execvp(app->argv[0], app->argv);
	fail_child("exec %s", app->argv[0]);
}

/* ---------------------------------------------------------------- PID 1's loop */

enum listener { NOT_LISTENING, LISTENING, LOOPBACK_ONLY };

/* What a line of /proc/net/tcp or tcp6 says of port:
 * "  0: 0100007F:1F90 00000000:0000 0A ...", hexadecimal but for the slot.
 * A listener counts if QEMU's forwarded connections reach it: bound to any
 * address (all zeros) or to 10.0.2.15 (0F02000A, in the kernel's order);
 * one on another address (127.0.0.1) is told apart, so that the app's
 * mistake can be named. (sscanf would do, and would add a tenth to the size
 * of this program.) */
static enum listener listener_in_line(const char *line, unsigned port) {
	char *address = strchr(line, ':'), *p; /* the header line has none */
	size_t length;
	if (!address || !(p = strchr(address + 1, ':')) || strtoul(p + 1, &p, 16) != port) return NOT_LISTENING;
	address += 2; /* past ": " */
	length = (size_t)(strchr(address, ':') - address);
	if (!(p = strchr(p, ':'))) return NOT_LISTENING;
	strtoul(p + 1, &p, 16); /* the remote port */
	if (strtoul(p, NULL, 16) != 0x0A) return NOT_LISTENING;
	if (strspn(address, "0") >= length || (length == 8 && !strncmp(address, "0F02000A", 8))) return LISTENING;
	return LOOPBACK_ONLY;
}

static enum listener listener_in(const char *table, unsigned port) {
	char line[512];
	enum listener found = NOT_LISTENING, here;
	FILE *file = fopen(table, "re");
	if (!file) return NOT_LISTENING; /* tcp6: no IPv6 in the kernel */
	while (found != LISTENING && fgets(line, sizeof line, file))
		if ((here = listener_in_line(line, port)) != NOT_LISTENING) found = here;
	fclose(file);
	return found;
}

static enum listener listening(unsigned port) {
	enum listener v4 = listener_in("/proc/net/tcp", port);
	return v4 == LISTENING ? v4 : (listener_in("/proc/net/tcp6", port) == LISTENING ? LISTENING : v4);
}

__attribute__((noreturn))
static void app_exited(int status) {
	if (WIFSIGNALED(status)) dprintf(console, "vmcgi: app killed by signal %d\n", WTERMSIG(status));
	else dprintf(console, "vmcgi: app exited with status %d\n", WEXITSTATUS(status));
	end_vm();
}

/* Orphans of the program are PID 1's children too: reap every zombie. */
static void reap(pid_t app) {
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
		if (pid == app) app_exited(status);
}

static void handle_signal(int signals, pid_t app) {
	struct signalfd_siginfo info;
	if (read(signals, &info, sizeof info) != sizeof info) return;
	if (info.ssi_signo == SIGCHLD) reap(app);
	else if (app > 0) kill(app, (int)info.ssi_signo); /* none yet: kill(0) would signal PID 1's group */
}

static pid_t start_app(const struct app *app) {
	pid_t pid = fork();
	if (pid < 0) fail("fork");
	if (pid == 0) run_app(app);
	return pid;
}

/* The program that restore_signal goes to in each clone (reseed.h's on_seed). */
static pid_t restored_app;
static int restore_signal;

static void signal_restore(void) {
	if (restored_app > 0) kill(restored_app, restore_signal);
}

/* Whether the kernel's command line has this word. */
static int on_command_line(const char *word) {
	size_t size, length = strlen(word);
	char *line = read_file("/proc/cmdline", &size), *at;
	for (at = line; (at = strstr(at, word)); at += length)
		if ((at == line || at[-1] == ' ') && (at[length] == ' ' || at[length] == '\n' || at[length] == 0)) return 1;
	return 0;
}

/* Until the program exits (the VM then ends): signals, the console, and,
 * until it listens, a look at its port every READY_POLL_MS. Started now, or
 * (wait_for_seed) once the console brings the first seed. */
__attribute__((noreturn))
static void supervise(const struct app *app, int wait_for_seed, int signals, struct reseed_console *reseed) {
	int ready = 0, console_open = 1, warned = 0;
	enum listener listens = NOT_LISTENING;
	pid_t pid = wait_for_seed ? 0 : start_app(app);
	if (wait_for_seed) dprintf(console, "vmcgi: booted\n");
	else if (app->restore_signal) {
		/* A program started before the snapshot: each seed is a restore. */
		restored_app = pid;
		restore_signal = app->restore_signal;
		reseed->on_seed = signal_restore;
	}
	for (;;) {
		struct pollfd fds[2] = { { signals, POLLIN, 0 }, { console_open ? reseed->fd : -1, POLLIN, 0 } };
		if (poll(fds, 2, ready || !pid ? -1 : READY_POLL_MS) < 0 && errno != EINTR) fail("poll");
		if (fds[0].revents & POLLIN) handle_signal(signals, pid);
		if (fds[1].revents && reseed_read_console(reseed) <= 0) console_open = 0;
		if (!pid) {
			if (reseed->reseeded == 0) continue;
			pid = start_app(app);
		}
		if (!ready && (listens = listening(app->port)) == LISTENING) {
			dprintf(console, "vmcgi: ready\n");
			ready = 1;
		} else if (listens == LOOPBACK_ONLY && !warned) {
			dprintf(console, "vmcgi: the app listens on port %u of a local address only: it must listen on 0.0.0.0 to be reached\n", app->port);
			warned = 1;
		}
	}
}

/* The signals PID 1 handles, blocked and read from a signalfd; blocked from
 * the start, so that none is lost before the loop. */
static int block_signals(void) {
	static const int handled[] = { SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 };
	sigset_t set;
	size_t i;
	int fd;
	sigemptyset(&set);
	for (i = 0; i < sizeof handled / sizeof *handled; i++) sigaddset(&set, handled[i]);
	if (sigprocmask(SIG_BLOCK, &set, NULL) < 0) fail("sigprocmask");
	fd = signalfd(-1, &set, SFD_CLOEXEC);
	if (fd < 0) fail("signalfd");
	return fd;
}

int main(void) {
	static struct reseed_console reseed;
	struct app app;
	int signals, fd;

	/* The kernel gave us the console as fds 0 to 2 (so this gets a higher
	 * one); ours is close-on-exec, and the program gets its own copies. */
	fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (fd >= 0) console = fd;
	reseed_listen(&reseed, console);
	signals = block_signals();
	read_app(&app);

	mount_image();
	prepare_new_root();
	switch_root();
	bring_up_network();
	name_the_host();
	make_dirs(app.cwd);
	supervise(&app, on_command_line("vmcgi_start=seed"), signals, &reseed);
}
