"""One page's connection: its settings and latest picture, the frame being made, and its figures.

Latest wins: an input (settings or a picture) replaces the one waiting, if any, so at most one frame is being
made and one input waits, however fast someone types or paints; the replaced input counts as dropped. The
frame itself runs through the engine's batcher, shared with every other session (their frames batch together
where their settings allow). A closed session cancels its frame: the batch drops it within a denoising step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from PIL import Image

from lib.engine.batcher import Batcher
from lib.engine.engine import Engine, Job
from lib.engine.inputs import InputError, Request
from lib.engine.safety import AllImagesFlagged
from lib.realtime import protocol
from lib.realtime.protocol import RateLimit
from lib.stats import stats_ms

log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 30.0  # an open session's figures go to the log this often, and once more when it closes
LATENCIES_KEPT = 10_000


@dataclass(frozen=True)
class Work:
    params: dict
    picture: bytes | None
    input: int  # the message number it answers
    received: float  # perf_counter when that message arrived


class Session:
    def __init__(
        self,
        number: int,
        peer: str,
        engine: Engine,
        batcher: Batcher,
        settings,
        send_text: Callable[[dict], Awaitable[None]],
        send_bytes: Callable[[bytes], Awaitable[None]],
    ):
        self.number, self.peer, self.engine, self.batcher = number, peer, engine, batcher
        self.enabled, self.settings = engine.enabled, settings
        self.format, self.quality = settings.realtime_frame_format, settings.realtime_frame_quality
        self.max_bytes, self.rate = settings.realtime_max_message_bytes, settings.realtime_messages_per_second
        self._send_text, self._send_bytes = send_text, send_bytes
        self._sending = asyncio.Lock()  # a frame's two messages go out together
        self.limit = RateLimit(self.rate)
        self.params = protocol.defaults(self.enabled)
        self.picture: bytes | None = None
        self._decoded: tuple[bytes, Image.Image] | None = None  # the latest picture decoded, for its next frames
        self.pending: Work | None = None
        self._wake = asyncio.Event()
        self.started = self._logged = time.perf_counter()
        self.received = self.frames = self.dropped = self.refused = self.errors = self.flagged = 0
        self.latencies: deque[float] = deque(maxlen=LATENCIES_KEPT)  # seconds, input received -> frame sent
        self._last_refusal_notice = -1e9

    def hello(self) -> dict:
        tiny = {name: self.engine.modes[name].tiny_vae is not None for name in self.enabled}
        return protocol.hello(
            self.enabled,
            tiny,
            self.settings,
            safety_checker=self.engine.safety is not None,
            controlnet=self.engine.controlnet,
        )

    # -- receiving: runs for every message, on the event loop ------------------------------------------------------
    async def receive(self, text: str | None, data: bytes | None) -> None:
        self.received += 1
        number = self.received
        if not self.limit.allow():
            self.refused += 1
            now = time.perf_counter()
            if now - self._last_refusal_notice >= 1.0:  # one notice a second, not one per refused message
                self._last_refusal_notice = now
                await self.error(
                    number,
                    f"message: more than {self.rate} messages a second; allowed: up to {self.rate} "
                    "(REALTIME_MESSAGES_PER_SECOND); this one and the next ones this second are ignored",
                )
            return
        try:
            if data is not None:
                if len(data) > self.max_bytes:
                    raise InputError(
                        f"picture: {len(data):,} bytes is too large; allowed: up to {self.max_bytes:,} bytes "
                        "(REALTIME_MAX_MESSAGE_BYTES)"
                    )
                protocol.check_picture(data)
                self.picture = data
                if not self.params["img2img"]:
                    return  # kept for when img2img is turned on; no frame of its own
            else:
                params = {**self.params, **protocol.parse_settings(text or "")}
                self._build(params)  # checked now, run later
                self.params = params
        except InputError as e:
            await self.error(number, str(e))
            return
        self._offer(number)

    def _offer(self, number: int) -> None:
        """Latest wins: this input replaces the waiting one."""
        if self.params["img2img"] and self.picture is None:
            return  # nothing to start from yet
        if self.pending is not None:
            self.dropped += 1
            self.pending = None
        if protocol.is_empty(self.params["prompt"]):
            return  # nothing to draw: an empty prompt makes no frame (and cancels the waiting one)
        picture = self.picture if self.params["img2img"] else None
        self.pending = Work(dict(self.params), picture, number, time.perf_counter())
        self._wake.set()

    # -- making frames: one at a time per session ------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            work, self.pending = self.pending, None
            if work is not None:
                await self._frame(work)
            if time.perf_counter() - self._logged >= LOG_EVERY_SECONDS:
                self.log_figures("open")

    async def _frame(self, work: Work) -> None:
        try:
            request = self._build(work.params)
            if (
                work.picture is not None
            ):  # decoding a picture takes a few ms: off the event loop (other frames may wait)
                with self.batcher.incoming(request):
                    job = await asyncio.to_thread(self._job, request, work.picture)
            else:
                job = self._job(request, None)
            outputs = await self.batcher.results(job)
        except AllImagesFlagged as e:
            self.flagged += 1
            await self.send({"type": "flagged", "input": work.input, "message": str(e)})
            return
        except InputError as e:
            await self.error(work.input, str(e))
            return
        except Exception as e:  # a failed frame is this session's error, never the server's
            log.exception("realtime session %d: the frame for input %d failed", self.number, work.input)
            await self.error(work.input, f"the frame failed: {type(e).__name__}: {e}")
            return
        output = outputs[0]
        seconds = time.perf_counter() - work.received
        self.latencies.append(seconds)
        self.frames += 1
        meta = {
            "type": "frame",
            "input": work.input,
            "ms": round(seconds * 1000, 1),
            "mode": request.mode.name,
            "prompt": request.prompt,
            "seed": output.seed,
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.num_inference_steps,
            "img2img": request.img2img,
            "control": request.controls[0].kind if request.controls else None,
            "strength": request.strength if request.img2img else None,
            "fast_decode": request.fast_decode,
            "bytes": len(output.data),
        }
        async with self._sending:
            await self._send_text(meta)
            await self._send_bytes(output.data)

    def _build(self, params: dict) -> Request | None:
        return protocol.build_request(params, self.enabled, self.format, self.quality, self.engine.controlnet)

    def _job(self, request: Request, picture: bytes | None) -> Job:
        image = None
        if picture is not None:  # decoded once, however many frames start from it (typing over a painting)
            if self._decoded is None or self._decoded[0] is not picture:
                self._decoded = (picture, protocol.decode_picture(picture))
            image = self._decoded[1]
        if request.controls:  # the picture guides the ControlNet
            return self.engine.job(request, None, control_pictures=[image], quiet=True)
        return self.engine.job(request, None, picture=image, quiet=True)

    # -- replies and figures ---------------------------------------------------------------------------------------
    async def send(self, message: dict) -> None:
        async with self._sending:
            await self._send_text(message)

    async def error(self, number: int, message: str) -> None:
        self.errors += 1
        await self.send({"type": "error", "input": number, "message": message})

    def figures(self) -> dict:
        latency = stats_ms(list(self.latencies)) if self.latencies else {"p50": None, "p95": None}
        elapsed = time.perf_counter() - self.started
        return {
            "seconds": round(elapsed, 1),
            "frames": self.frames,
            "fps": round(self.frames / elapsed, 2) if elapsed > 0 else 0.0,
            "inputs": self.received,
            "dropped": self.dropped,
            "refused": self.refused,
            "errors": self.errors,
            "flagged": self.flagged,
            "p50_ms": latency["p50"],
            "p95_ms": latency["p95"],
        }

    def log_figures(self, state: str) -> None:
        self._logged = time.perf_counter()
        f = self.figures()
        log.info(
            "realtime session %d (%s) %s after %.1f s: %d frames (%.1f/s), %d inputs, %d dropped (latest wins), "
            "%d refused, %d errors, %d flagged; latency p50 %s ms, p95 %s ms",
            self.number,
            self.peer,
            state,
            f["seconds"],
            f["frames"],
            f["fps"],
            f["inputs"],
            f["dropped"],
            f["refused"],
            f["errors"],
            f["flagged"],
            f["p50_ms"] if f["p50_ms"] is not None else "-",
            f["p95_ms"] if f["p95_ms"] is not None else "-",
        )
