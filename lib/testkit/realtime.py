"""The realtime server for tests and the benchmark: as a process started by its entry point (scripts/realtime.py),
or in this process on an engine already loaded (uvicorn in a thread); and the browser that drives its page,
headless Chromium from the Debian package through Playwright, which never downloads a browser of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from lib import ROOT
from lib.testkit.servers import ServerProcess, free_port, wait_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MISSING_CHROMIUM = (
    "Chromium is not installed: scripts/test.sh installs it (the Debian package chromium), or run "
    "`sudo apt-get install chromium`"
)
CHROMIUM_FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",  # the webcam: allowed without a prompt,
    "--use-fake-device-for-media-stream",  # and a synthetic camera
]
READY_LINE = "realtime: serving"


class RealtimeServer(ServerProcess):
    """`python scripts/realtime.py --port P [args]`, ready once it logs READY_LINE and its port answers."""

    def __init__(self, workdir: Path, env: dict[str, str | None], args: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.log_path = self.workdir / "realtime.log"
        merged = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.args = args

    def start(self, timeout: float = 180) -> RealtimeServer:
        self.spawn([sys.executable, str(ROOT / "scripts" / "realtime.py"), "--port", str(self.port), *self.args])
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log_tail(100_000):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the realtime server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the realtime server is not serving after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)
        wait_port(self.port, self.proc, timeout=30)
        return self

    def log_text(self) -> str:
        return self.log_tail(10_000_000)

    def __enter__(self) -> RealtimeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RealtimeClient:
    """A WebSocket client that speaks the page's protocol (lib/realtime/protocol.py): it counts its sends as the
    server numbers them, and reads each frame's message and image together."""

    def __init__(self, ws, hello: dict):
        self.ws, self.hello, self.sent = ws, hello, 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, **options):
        import websockets

        async with websockets.connect(url, max_size=2**24, **options) as ws:
            yield cls(ws, json.loads(await ws.recv()))

    async def send(self, message: str | bytes) -> int:
        """Send one message; returns its number (what a frame answering it names)."""
        await self.ws.send(message)
        self.sent += 1
        return self.sent

    async def settings(self, **changes) -> int:
        return await self.send(json.dumps(changes))

    async def receive(self, timeout: float = 60) -> dict:
        """The next message; a frame comes with its image bytes as "image"."""
        message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        if message["type"] == "frame":
            message["image"] = await asyncio.wait_for(self.ws.recv(), timeout)
        return message

    async def answer(self, number: int, timeout: float = 60) -> dict:
        """The first frame, error or flag answering message `number` or a later one (earlier frames skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.receive(max(0.1, deadline - time.monotonic()))
            if message.get("input", 0) >= number:
                return message


def serve_in_thread(engine, batcher, settings):
    """The realtime app for `engine` on a free loopback port, in a thread of this process. Returns (its WebSocket
    URL, the uvicorn Server: set `should_exit` to stop it)."""
    import uvicorn

    from lib.realtime.server import create_app, uvicorn_options

    port = free_port()
    config = uvicorn.Config(
        create_app(engine, batcher, settings), host="127.0.0.1", port=port, **uvicorn_options(settings)
    )
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True, name="realtime-server").start()
    while not server.started:
        time.sleep(0.02)
    return f"ws://127.0.0.1:{port}/ws", server


def launch_chromium(playwright):
    """Headless Chromium (the system's) with a fresh profile."""
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(MISSING_CHROMIUM)
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
