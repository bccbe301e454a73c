"""Servers for tests: nginx on loopback for the download tests (Range support as a CDN has it), a small proxy in
front of it that injects faults into chosen responses, and the process handling of the servers under test."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lib import ROOT

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
MISSING_NGINX = (
    "nginx is not installed: scripts/test.sh installs it (the Debian package nginx-light), or run "
    "`sudo apt-get install nginx-light`"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class ServerProcess:
    """A server under test in its own process group, its output in `self.log_path`; set workdir, env, log_path."""

    proc: subprocess.Popen | None = None
    log_path: Path
    env: dict

    def spawn(self, argv: list[str]) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


class Nginx:
    """nginx serving `root` on 127.0.0.1 with its own config, pid and logs in `workdir` (no root paths)."""

    def __init__(self, root: Path, workdir: Path):
        self.root, self.workdir = Path(root), Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Nginx":
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        temp = "\n".join(f"  {k}_temp_path {w}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # As root, workers would drop to `nobody`, who cannot read pytest's private tmp dirs.
        user = "user root;" if os.geteuid() == 0 else ""
        (w / "nginx.conf").write_text(f"""
daemon off; {user}
worker_processes 2;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
{temp}
  sendfile on;
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{self.port}; root {self.root}; }}
}}
""")
        if NGINX is None:
            raise RuntimeError(MISSING_NGINX)  # a failure, not a skip: these tests run wherever the suite runs
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(w), "-c", str(w / "nginx.conf"), "-e", str(w / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=open(w / "stderr.log", "wb"),
        )
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {(w / 'stderr.log').read_text()}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Rule:
    """Which requests (path substring, method) get which fault, and how many times (None: always)."""

    match: str
    method: str | None = None
    range_from: int | None = None  # only requests whose Range starts at this offset
    times: int | None = None
    status: int | None = None  # answer this instead of asking nginx
    cut_after: int | None = None  # close after this many body bytes
    flip_at: int | None = None  # file offset whose byte is inverted
    stall: float | None = None  # seconds of silence after `stall_at` body bytes
    stall_at: int = 0
    throttle: float | None = None  # body bytes per second
    headers: dict = field(default_factory=dict)  # added to the response


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int = 0
    sent: int = 0  # body bytes sent to the client


class FaultProxy:
    """A threaded HTTP proxy to an upstream on loopback. Every request gets its own upstream connection
    (both sides are told Connection: close), so each response can be altered alone."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.rules: list[Rule] = []
        self.log: list[Logged] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                try:
                    proxy._handle(self.request)
                except OSError:
                    pass  # the client hung up (timeouts, cancelled transfers)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def add(self, match: str, **kw) -> Rule:
        rule = Rule(match, **kw)
        with self.lock:
            self.rules.append(rule)
        return rule

    def reset(self) -> None:
        with self.lock:
            self.rules.clear()
            self.log.clear()

    def requests(self, method: str | None = None, contains: str = "") -> list[Logged]:
        with self.lock:
            return [r for r in self.log if (method is None or r.method == method) and contains in r.path]

    def _take_rule(self, method: str, path: str, range_: str | None) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.range_from is not None and not (range_ or "").startswith(f"bytes={rule.range_from}-"):
                    continue
                if rule.match in path and rule.method in (None, method) and rule.times != 0:
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    def _handle(self, client: socket.socket) -> None:
        head = _read_head(client)
        if not head:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = [h for h in lines[1:] if h and not h.lower().startswith("connection:")]
        get = lambda name: next((h.split(":", 1)[1].strip() for h in headers if h.lower().startswith(name + ":")), None)
        entry = Logged(method, path, get("range"), get("authorization"))
        with self.lock:
            self.log.append(entry)
        rule = self._take_rule(method, path, entry.range) or Rule("")
        if rule.status:
            entry.status = rule.status
            client.sendall(f"HTTP/1.1 {rule.status} Fault\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            return
        with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
            up.sendall("\r\n".join([lines[0], *headers, "Connection: close", "", ""]).encode("latin-1"))
            resp_head, body = _read_head(up, keep_rest=True)
            status_line, *resp_headers = resp_head.decode("latin-1").split("\r\n")
            entry.status = int(status_line.split()[1])
            resp_headers = [h for h in resp_headers if h] + [f"{k}: {v}" for k, v in rule.headers.items()]
            client.sendall("\r\n".join([status_line, *resp_headers, "", ""]).encode("latin-1"))
            if method == "HEAD":
                return
            m = re.search(r"Content-Range: bytes (\d+)-", resp_head.decode("latin-1"), re.I)
            self._pipe(up, client, body, int(m[1]) if m else 0, rule, entry)

    def _pipe(self, up, client, first: bytes, file_offset: int, rule: Rule, entry: Logged) -> None:
        t0, data = time.monotonic(), first
        while True:
            if not data:
                data = up.recv(1 << 16)
                if not data:
                    return
            if rule.cut_after is not None and entry.sent + len(data) > rule.cut_after:
                client.sendall(data[: rule.cut_after - entry.sent])
                entry.sent = rule.cut_after
                return
            if rule.stall is not None and entry.sent + len(data) > rule.stall_at:
                keep = rule.stall_at - entry.sent
                client.sendall(data[:keep])
                entry.sent += keep
                self.stopping.wait(rule.stall)
                return
            start = file_offset + entry.sent
            if rule.flip_at is not None and start <= rule.flip_at < start + len(data):
                i = rule.flip_at - start
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
            client.sendall(data)
            entry.sent += len(data)
            if rule.throttle:
                time.sleep(max(0.0, entry.sent / rule.throttle - (time.monotonic() - t0)))
            data = b""


def _read_head(sock: socket.socket, keep_rest: bool = False):
    buf = b""
    while b"\r\n\r\n" not in buf:
        more = sock.recv(1 << 16)
        if not more:
            return (buf, b"") if keep_rest else buf
        buf += more
    head, rest = buf.split(b"\r\n\r\n", 1)
    return (head, rest) if keep_rest else head
