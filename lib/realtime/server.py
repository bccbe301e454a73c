"""The realtime server: the page at `/` (plain files from lib/realtime/page, no build step, nothing from a CDN) and
its WebSocket at `/ws`, on Starlette, for uvicorn. The engine and its batcher are the caller's: one copy of the
models in this process, shared by every session.

The handshake is checked before the socket is accepted (a refusal is an HTTP 403, logged with its reason):
- with REALTIME_TOKEN set, `?token=` must carry it (the page passes on its own `?token=`);
- a browser's Origin must be the page's own (or one of REALTIME_ALLOWED_ORIGINS), so that no other site's page
  can drive the GPU from a visitor's browser;
- without a token, the Host must be a loopback name, so that a DNS-rebinding site is not "the page's own".
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from lib.engine.batcher import Batcher
from lib.engine.engine import Engine
from lib.realtime.session import Session

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
# The page's own files only; frames are blob: URLs, the webcam a media stream.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
POLICY_VIOLATION, TRY_AGAIN_LATER = 1008, 1013  # WebSocket close codes


def is_loopback(host: str) -> bool:
    return host.strip("[]") in LOOPBACK_NAMES or host.startswith("127.")


def _host_name(host_header: str) -> str:
    return urlsplit(f"//{host_header}").hostname or ""


def refusal(headers, query, token: str | None, allowed_origins: set[str]) -> str | None:
    """Why the handshake is refused, or None to accept it."""
    host = headers.get("host", "")
    if token is not None:
        given = query.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return "the token is missing or wrong (open the page as http://HOST:PORT/?token=REALTIME_TOKEN)"
    elif not is_loopback(_host_name(host)):
        return f"Host {host!r} is not a loopback name, and without REALTIME_TOKEN only loopback is served"
    origin = headers.get("origin")
    if origin is not None:  # browsers always send it; other clients (scripts, the benchmark) need not
        own = {f"http://{host}", f"https://{host}"}
        if origin.rstrip("/") not in own | allowed_origins:
            return f"Origin {origin!r} is not this page's ({host}) nor in REALTIME_ALLOWED_ORIGINS"
    return None


def new_batcher(engine: Engine, settings) -> Batcher:
    """The batcher every session's frames go through, with the realtime batching window."""
    return Batcher(engine, window=settings.realtime_batch_window_ms / 1000)


def uvicorn_options(settings) -> dict:
    """uvicorn.run / uvicorn.Config options for the app (its host and port aside)."""
    return {
        "ws": "websockets-sansio",
        # Up to 4x the limit is read and answered with an error; larger messages close the socket (1009).
        "ws_max_size": 4 * settings.realtime_max_message_bytes,
        "log_config": None,
        "lifespan": "off",
    }


def create_app(engine: Engine, batcher: Batcher, settings) -> Starlette:
    token = settings.realtime_token
    allowed = {o.strip().rstrip("/") for o in (settings.realtime_allowed_origins or "").split(",") if o.strip()}
    max_sessions = settings.realtime_max_sessions
    sessions: set[int] = set()  # the open sessions' numbers
    numbers = itertools.count(1)

    async def page(request):
        return FileResponse(
            PAGE / "index.html",
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
        )

    async def socket(ws: WebSocket) -> None:
        peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        reason = refusal(ws.headers, ws.query_params, token, allowed)
        if reason:
            log.warning("realtime: refused a connection from %s: %s", peer, reason)
            await ws.close(code=POLICY_VIOLATION)  # before accept(): the client gets HTTP 403
            return
        await ws.accept()
        if len(sessions) >= max_sessions:
            message = f"server busy: {max_sessions} sessions are open (REALTIME_MAX_SESSIONS); try again later"
            await ws.send_text(json.dumps({"type": "error", "input": 0, "message": message}))
            await ws.close(code=TRY_AGAIN_LATER)
            return
        number = next(numbers)
        session = Session(
            number,
            peer,
            engine,
            batcher,
            settings,
            send_text=lambda message: ws.send_text(json.dumps(message)),
            send_bytes=ws.send_bytes,
        )
        sessions.add(number)
        log.info("realtime session %d (%s) opened", number, peer)
        worker = asyncio.create_task(session.run())
        try:
            await session.send(session.hello())
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await session.receive(message.get("text"), message.get("bytes"))
        except (WebSocketDisconnect, RuntimeError):  # closed while sending or receiving
            pass
        finally:
            worker.cancel()  # a frame being made is dropped by its batch
            try:
                await worker
            except (asyncio.CancelledError, WebSocketDisconnect, RuntimeError, OSError):
                pass  # canceled here, or a send that met the closed socket
            except Exception:
                log.exception("realtime session %d: its frames stopped", number)
            sessions.remove(number)
            session.log_figures("closed")

    return Starlette(
        routes=[
            Route("/", page),
            Mount("/static", StaticFiles(directory=PAGE), name="static"),
            WebSocketRoute("/ws", socket),
        ]
    )
