"""The app of the python test image: reports what the guest sees, as JSON.

Built into the image by test/images/build.sh (layer 2, /app/server.py, with
/app/server-link.py a hard link to it). Every field answers one question the
tests ask about how vmcgi ran the image: which user (User: app, uid 999),
which directory (WorkingDir), which environment (Env), which arguments
(Entrypoint + Cmd), whether the layers were applied (the whiteout, the
opaque directory, the hard link) and whether the file system is fresh.

Python 3.11 standard library only. PORT (default 8080) exists for the build
script's own check, which runs it in a chroot on a free port.
"""

import http.server
import json
import os
import random
import signal
import socket
import socketserver
import sys

# Drawn once, when the interpreter loads this file: equal in two answers only
# if one process served both, or clones of one snapshot of it (unless the
# restore signal below draws it again).
IMPORT_RANDOM = random.random()
RESTORES = 0


def on_restore(_signum, _frame):
    # vmcgi's init sends SIGUSR2 in each clone when the image was built with
    # --clone ready --restore-signal SIGUSR2: the generator is seeded again
    # from the clone's own entropy, and the start-up value drawn again.
    global IMPORT_RANDOM, RESTORES
    random.seed()
    IMPORT_RANDOM = random.random()
    RESTORES += 1


signal.signal(signal.SIGUSR2, on_restore)
MARK = "/var/tmp/vmcgi-mark"
WHITED_OUT = "/etc/issue.net"


def read_boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def same_inode(a, b):
    try:
        return os.stat(a).st_ino == os.stat(b).st_ino
    except OSError:
        return False


def report(path):
    # Every request but the readiness probe's (GET /) leaves a mark: a request
    # that finds one was served by a VM that served another before it.
    written_before = os.path.exists(MARK)
    if path != "/":
        try:
            with open(MARK, "a"):
                pass
        except OSError:
            pass
    try:
        opt_cfg = sorted(os.listdir("/opt/cfg"))
    except OSError:
        opt_cfg = None
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "cwd": os.getcwd(),
        "greeting": os.environ.get("GREETING"),
        "hostname": socket.gethostname(),
        "boot_id": read_boot_id(),
        "import_random": IMPORT_RANDOM,
        "request_random": random.random(),
        "restores": RESTORES,
        "issue_net_exists": os.path.exists(WHITED_OUT),
        "opt_cfg": opt_cfg,
        "hardlink_same_inode": same_inode("/app/server.py", "/app/server-link.py"),
        "written_before": written_before,
        "argv": sys.argv,
    }


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (json.dumps(report(self.path), sort_keys=True) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Powered-By", "python-test-image")
        self.end_headers()
        self.wfile.write(body)


class Server(http.server.ThreadingHTTPServer):
    # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that
    # stalls without a resolver; bind like a plain TCPServer instead.
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port


def main():
    port = int(os.environ.get("PORT", "8080"))
    server = Server(("0.0.0.0", port), Handler)
    print(f"python-test-image: listening on 0.0.0.0:{port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
