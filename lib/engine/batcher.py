"""Cross-request batching: concurrent predictions that can share one pipeline call run as one batch.

Cog runs `async def run` predictions concurrently (COG_MAX_CONCURRENCY). Each one streams a Job through here; a
dispatcher hands the oldest group of compatible jobs (same batch_key, up to a cap of images) to the device thread,
so the device runs one batch at a time while the event loop stays free. Requests that arrive while a batch runs
form the next one. The batching window (BATCH_WINDOW_MS) is spent only on requests that might join: while a
compatible request is on its way (`incoming`: validated, its job being prepared: the input image read, the style
LoRA fetched), the dispatcher waits for it, up to the window; a lone request at an idle device starts at once.
Requests are grouped by mode: a pending request whose mode is on the device goes before an older one whose mode the
memory plan keeps in host memory (lib/engine/memory.py), unless that one has waited MODE_SWITCH_WAIT seconds, so
that moves stay rare.

Threads: the device thread runs a batch's device stage (lib/engine.Batch.generate) and the warm-up (CUDA graph
trees are per thread: warm-up and predictions must share one); the host thread makes its images and hands them to
the encoder pool (lib/engine/images.py: all of a batch's images at once), while the device thread goes on with the
next batch; a writer thread waits for the batch's files and records its metrics, so that the next batch's images
are encoded while this batch's still are. At most HOST_BACKLOG batches are between the device and their files.

Cog routes logs and metrics by context variables, which a worker thread does not inherit: a batch runs in
copies of its first request's context (its logs go there), and each request's metrics are recorded in a copy
of that request's own context.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lib.engine.engine import Batch, Cancelled, Engine, Job, Output, batch_key
from lib.engine.inputs import Request
from lib.settings import Settings

_DONE = object()
MODE_SWITCH_WAIT = 1.0  # seconds an older request of a mode in host memory waits for requests of resident modes
HOST_BACKLOG = 2  # batches whose host stage may be pending while the device runs the next


class _Outbox:
    """One request's outputs: put on the event loop (call_soon_threadsafe), read by Cog's drain thread."""

    def __init__(self):
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.arrived = asyncio.Event()

    def put_nowait(self, item) -> None:
        self.items.put(item)
        self.arrived.set()


@dataclass
class _Entry:
    job: Job
    queue: _Outbox  # where the worker puts this job's outputs, then _DONE or an exception
    context: contextvars.Context
    arrived: float = field(default_factory=time.perf_counter)


def _window_from_env() -> float:
    # Batching needs concurrent requests; with one slot a window would only add latency.
    settings = Settings()
    return 0.0 if settings.cog_max_concurrency <= 1 else settings.batch_window_ms / 1000


class Batcher:
    def __init__(self, engine: Engine, window: float | None = None, max_images: int | None = None):
        self.engine = engine
        self.window = _window_from_env() if window is None else window
        self.max_images = max_images or Settings().batch_max_images
        self._pending: list[_Entry] = []
        self._incoming: list[Request] = []  # validated requests whose jobs are being prepared
        self._arrival: asyncio.Event | None = None  # set when a job arrives or an incoming request gives up
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._host = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host")
        self._writers = ThreadPoolExecutor(max_workers=HOST_BACKLOG, thread_name_prefix="writer")
        self._backlog = threading.Semaphore(HOST_BACKLOG)
        self._wakeup: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None

    def warm_up(self, img2img: bool = False) -> dict:
        """The engine's warm-up, on the device thread (the one that will serve the predictions)."""
        return self._device.submit(self.engine.warm_up, img2img).result()

    @contextlib.contextmanager
    def incoming(self, request: Request) -> Iterator[None]:
        """On the event loop, around preparing `request`'s job (before stream() or results()): a batch of the same
        key waits for it, up to the window, instead of starting without it."""
        self._incoming.append(request)
        try:
            yield
        finally:
            self._incoming.remove(request)
            if self._arrival is not None:
                self._arrival.set()

    def _submit(self, job: Job) -> tuple[_Outbox, Callable[[], None]]:
        """Queue `job` for the dispatcher; returns its outbox and what drops it (marks it canceled)."""
        loop = asyncio.get_running_loop()
        if self._dispatcher is None or self._dispatcher.done():
            self._wakeup, self._arrival = asyncio.Event(), asyncio.Event()
            self._dispatcher = loop.create_task(self._dispatch())
        outbox = _Outbox()
        entry = _Entry(job, outbox, contextvars.copy_context())
        record = job.record
        job.record = lambda key, value: entry.context.run(record, key, value)
        self._pending.append(entry)
        self._wakeup.set()
        self._arrival.set()

        def drop() -> None:
            job.cancelled = True
            if entry in self._pending:
                self._pending.remove(entry)

        return outbox, drop

    async def stream(self, job: Job) -> Iterator[Output]:
        """For a Cog server: `return await batcher.stream(job)` from `async def run`. coglet 0.23.1 collects an
        async generator's items until it ends (no image would stream), but drains a sync iterator returned by
        async run() on a thread of its own, sending each item as it comes. It cancels only the coroutine,
        though, so this one waits for the first output (canceled there, the batch drops the job within a
        denoising step) and then returns an iterator over all of them."""
        loop = asyncio.get_running_loop()
        outbox, drop = self._submit(job)
        try:
            await outbox.arrived.wait()
        except BaseException:  # canceled before the first output: the batch drops this job's remaining work
            drop()
            raise

        def outputs() -> Iterator[Output]:
            try:
                while (item := outbox.items.get()) is not _DONE:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                loop.call_soon_threadsafe(drop)

        return outputs()

    async def results(self, job: Job) -> list[Output]:
        """All of `job`'s outputs, awaited on the event loop without blocking it (the realtime server).
        Canceled (a session closed mid-frame), the batch drops the job's remaining work."""
        outbox, drop = self._submit(job)
        outputs: list[Output] = []
        try:
            while True:
                await outbox.arrived.wait()
                outbox.arrived.clear()  # on the loop, like every put: none is missed between the clear and the drain
                while not outbox.items.empty():
                    item = outbox.items.get_nowait()
                    if item is _DONE:
                        return outputs
                    if isinstance(item, BaseException):
                        raise item
                    outputs.append(item)
        finally:
            drop()

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await self._gather(loop)
                if not self._pending:  # every pending request was canceled meanwhile
                    break
                batch = self._take_batch()
                await loop.run_in_executor(self._device, batch[0].context.copy().run, self._work, batch, loop)

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """The window: wait, at most `window` seconds, while a request that would join the next batch is on its way
        (no wait at all for a lone request)."""
        deadline = loop.time() + self.window
        while self._pending and self._joining() and (left := deadline - loop.time()) > 0:
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), left)
            except TimeoutError:
                return

    def _joining(self) -> bool:
        """Whether an incoming request has the next batch's key (and room in it)."""
        key = batch_key(self._next().job.request)
        taken = sum(e.job.request.num_outputs for e in self._pending if batch_key(e.job.request) == key)
        return any(batch_key(r) == key and taken + r.num_outputs <= self.max_images for r in self._incoming)

    def _take_batch(self) -> list[_Entry]:
        """The next job (see the module docstring) and the compatible ones after it, up to max_images and what fits
        the memory budget (lib/engine/memory.py: a request alone always fits)."""
        key = batch_key(self._next().job.request)
        batch, images = [], 0
        for entry in list(self._pending):
            request = entry.job.request
            if batch_key(request) != key:
                continue
            if batch and (
                images + request.num_outputs > self.max_images
                or not self.engine.fits([e.job.request for e in batch] + [request])
            ):
                continue
            batch.append(entry)
            images += request.num_outputs
            self._pending.remove(entry)
        return batch

    def _next(self) -> _Entry:
        oldest = self._pending[0]
        if time.perf_counter() - oldest.arrived >= MODE_SWITCH_WAIT:
            return oldest
        residency = self.engine.residency
        return next((e for e in self._pending if residency.is_resident(e.job.request.mode.name)), oldest)

    def _work(self, batch: list[_Entry], loop: asyncio.AbstractEventLoop) -> None:
        """Device thread: the batch's device stage; each decoded chunk goes to the host thread to be finished."""
        started = time.perf_counter()
        for e in batch:
            e.job.record("queue_wait", round(started - e.arrived, 4))
        host_context = contextvars.copy_context()  # a context is entered by one thread at a time

        def host(fn, *args) -> None:
            self._host.submit(host_context.run, fn, *args)

        self._backlog.acquire()  # bounded: a slow host stage holds the device back, not the memory
        state = {"failed": None}
        try:
            run = Batch(self.engine, [e.job for e in batch])
            for chunk in run.generate():
                host(self._finish, run, chunk, batch, loop, state)
            host(self._close, run, batch, loop, state, None)
        except Cancelled:
            host(self._close, None, batch, loop, state, _DONE)
        except BaseException as exc:  # the batch failed: every job in it reports the error
            host(self._close, None, batch, loop, state, exc)

    def _finish(self, run: Batch, chunk, batch: list[_Entry], loop, state: dict) -> None:
        """Host thread: one chunk's images, each to its job's queue as it is written."""
        if state["failed"] is not None:
            return
        by_job = {id(e.job): e for e in batch}
        try:
            for job, output in run.finish(chunk):
                loop.call_soon_threadsafe(by_job[id(job)].queue.put_nowait, output)
        except BaseException as exc:
            state["failed"] = exc

    def _close(self, run: Batch | None, batch: list[_Entry], loop, state: dict, result) -> None:
        """Host thread, after the batch's last chunk: its end goes to a writer thread, which waits for its files,
        so that the host thread goes on with the next batch's images (their encoding overlaps this batch's)."""
        self._writers.submit(contextvars.copy_context().run, self._end, run, batch, loop, state, result)

    def _end(self, run: Batch | None, batch: list[_Entry], loop, state: dict, result) -> None:
        """Writer thread: the batch's last outputs and metrics, then each job's end (_DONE or the error)."""
        try:
            by_job = {id(e.job): e for e in batch}
            if run is not None and state["failed"] is None:
                try:
                    for job, output in run.end():
                        loop.call_soon_threadsafe(by_job[id(job)].queue.put_nowait, output)
                except BaseException as exc:
                    state["failed"] = exc
            final = state["failed"] if state["failed"] is not None else (result or _DONE)
            for e in batch:
                loop.call_soon_threadsafe(e.queue.put_nowait, final)
        finally:
            self._backlog.release()
