"""Cross-request batching in-process: concurrent predictions share pipeline calls, each gets its own images."""

import asyncio
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.engine.batcher import Batcher
from lib.engine.inputs import InputError
from lib.local import Metrics, outputs, run_inputs


@pytest.fixture
def batched(predictor):
    """run_all(list of input dicts, cancel=set of indexes) -> [(paths, metrics) or exception] in one burst."""
    saved = predictor.batcher

    def run_all(inputs_list, window=0.2, max_images=16, cancel=(), cancel_after=0.05, first=None):
        """`first`: a request started alone before the others, which keeps the device busy while they queue."""
        predictor.batcher = Batcher(predictor.engine, window=window, max_images=max_images)

        async def one(i, inputs, metrics=None):
            metrics = Metrics() if metrics is None else metrics
            paths = []
            # Each task is its own prediction: Cog gives each its own context, and so its own metrics.
            predictor.record_metric = metrics
            async for path in outputs(predictor, **run_inputs(predictor, **inputs)):
                paths.append(path)
            return paths, metrics

        async def burst():
            ahead = []
            if first is not None:
                started = Metrics()  # queue_wait is recorded when its batch starts on the device thread
                ahead = [asyncio.create_task(one(-1, first, started))]
                while "queue_wait" not in started:
                    await asyncio.sleep(0.01)
            tasks = [asyncio.create_task(one(i, inputs)) for i, inputs in enumerate(inputs_list)]
            await asyncio.sleep(cancel_after)
            for i in cancel:
                tasks[i].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*ahead)
            return results

        try:
            return asyncio.run(burst())
        finally:
            predictor.batcher = saved
            del predictor.record_metric

    return run_all


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int16)


BASE = dict(mode="sd-turbo", width=256, height=256, output_format="png")


@pytest.mark.parametrize("mode", ["sd-turbo", "sdxl-lightning-4step"])
def test_overlapping_requests_run_as_one_batch_and_match_solo_runs(batched, run, mode):
    inputs = [dict(BASE, mode=mode, prompt=f"prompt {i}", seed=100 + i, num_outputs=1 + i % 2) for i in range(4)]
    results = batched(inputs)
    for (paths, metrics), request in zip(results, inputs, strict=True):
        assert metrics["batch.requests"] == 4 and metrics["batch.images"] == 6
        assert metrics["queue_wait"] >= 0 and metrics["seeds"] == [request["seed"] + k for k in range(len(paths))]
        solo, _ = run(**request)
        assert len(paths) == len(solo) == request["num_outputs"]
        for got, want in zip(paths, solo, strict=True):
            assert np.abs(pixels(got) - pixels(want)).max() <= 2  # batch vs solo: same up to float rounding


def test_incompatible_requests_run_in_separate_batches(batched):
    results = batched(
        [dict(BASE, prompt="a", seed=1), dict(BASE, prompt="b", seed=2, width=264), dict(BASE, prompt="c", seed=3)]
    )
    assert [m["batch.requests"] for _, m in results] == [2, 1, 2]


@pytest.mark.parametrize("cancel_after", [0.05, 0.4], ids=["while-waiting", "while-running"])
def test_cancel_and_invalid_input_inside_a_batch_leave_the_others_intact(batched, run, cancel_after):
    base = dict(BASE, mode="lcm", num_inference_steps=8)  # long enough to cancel mid-batch
    inputs = [
        dict(base, prompt="keep", seed=5),
        dict(base, prompt="cancel me", seed=6),
        dict(base, prompt="bad", seed=7, num_inference_steps=9),
        dict(base, prompt="keep too", seed=8),
    ]
    # While waiting: the device is busy with another batch (the same slow kind, another size), so they queue.
    first = dict(base, prompt="ahead", seed=1, width=264) if cancel_after < 0.2 else None
    results = batched(inputs, cancel={1}, cancel_after=cancel_after, first=first)
    assert isinstance(results[1], asyncio.CancelledError)
    assert isinstance(results[2], InputError) and str(results[2]).startswith("num_inference_steps:")
    for i in (0, 3):
        paths, metrics = results[i]
        # A request canceled while waiting never joins; one canceled mid-run leaves; an invalid one never joins.
        assert metrics["batch.requests"] == (2 if cancel_after < 0.2 else 3)
        solo, _ = run(**inputs[i])
        assert np.abs(pixels(paths[0]) - pixels(solo[0])).max() <= 2


def test_a_burst_over_the_cap_is_served_in_several_batches(batched):
    inputs = [dict(BASE, prompt=f"p{i}", seed=i, num_outputs=2) for i in range(5)]
    results = batched(inputs, max_images=4)
    assert all(len(paths) == 2 for paths, _ in results)
    assert sorted(m["batch.images"] for _, m in results) == [2, 4, 4, 4, 4]


def test_throughput_benchmark_smoke(predictor):
    """scripts/bench_throughput.py's measurement runs (CI smoke; the figures are not asserted)."""
    from lib.bench.throughput import measure

    inputs = run_inputs(predictor, prompt="x", mode="sd-turbo", width=256, height=256, seed=1)
    result = asyncio.run(measure(predictor, inputs, clients=2, requests=1))
    assert result["images"] == 2 and result["images_per_s"] > 0


def test_a_lone_request_at_an_idle_device_starts_without_the_window(predictor, run, batched):
    """The window is spent only on compatible requests on their way: a request alone waits for nothing, and a burst
    waits only until its last request has arrived (far less than this 20 s window), then runs as one batch."""
    saved = predictor.batcher
    predictor.batcher = Batcher(predictor.engine, window=20.0)
    try:
        paths, metrics = run(**BASE, prompt="alone", seed=3)
    finally:
        predictor.batcher = saved
    assert len(paths) == 1 and metrics["batch.requests"] == 1 and metrics["queue_wait"] < 10
    results = batched([dict(BASE, prompt=f"together {i}", seed=i) for i in range(3)], window=20.0)
    assert [m["batch.requests"] for _, m in results] == [3, 3, 3]
    assert max(m["queue_wait"] for _, m in results) < 10


def test_a_batch_waits_for_a_compatible_request_still_being_prepared(batched, tmp_path, monkeypatch):
    """An img2img request whose input image takes a second to read (its job is being prepared) joins the batch of a
    compatible request that arrived before it, within the window; an incompatible one does not hold a batch."""
    import time

    from lib import cog_inputs
    from lib.engine import engine as engine_module

    photo, slow = tmp_path / "photo.png", tmp_path / "slow.png"
    Image.new("RGB", (256, 256), (10, 120, 200)).save(photo)
    Image.new("RGB", (256, 256), (200, 120, 10)).save(slow)
    photo, slow = (cog_inputs.fetch(cog_inputs.data_uri(p)) for p in (photo, slow))  # as Cog hands them to run()
    real_open = engine_module.images.open_input_image

    def open_image(path, *args, **kwargs):
        if Path(path) == Path(slow):
            time.sleep(1.0)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(engine_module.images, "open_input_image", open_image)
    img = dict(BASE, prompt="a frame", strength=0.6)
    results = batched([dict(img, image=photo, seed=1), dict(img, image=slow, seed=2)], window=20.0)
    assert [m["batch.requests"] for _, m in results] == [2, 2], results
    results = batched([dict(img, image=photo, seed=1), dict(img, image=slow, seed=2, strength=0.7)], window=20.0)
    assert [m["batch.requests"] for _, m in results] == [1, 1] and results[0][1]["queue_wait"] < 10


def test_encoding_overlaps_the_next_batch(predictor, batched, monkeypatch):
    """A batch whose image encodes slowly holds back neither the next batch's denoising nor its encoding: the slow
    encoder waits until the next batch's image has started encoding (on the old single host thread that never
    happened: it waited for the slow batch's files first), and the next batch denoised before the slow file was
    written. Order of events, not durations."""
    import threading
    import time

    from lib.engine import images

    events: list[tuple[str, float]] = []
    next_started = threading.Event()
    real_write = images._write

    def write(image, target, fmt, quality, settings):
        events.append((f"encode {settings['prompt']}", time.perf_counter()))
        if settings["prompt"] == "next":
            next_started.set()
        else:
            next_started.wait(timeout=30)
        real_write(image, target, fmt, quality, settings)
        events.append((f"written {settings['prompt']}", time.perf_counter()))

    monkeypatch.setattr(images, "_write", write)
    unet = predictor.engine.modes["sd-turbo"].txt2img.unet
    hook = unet.register_forward_pre_hook(lambda *a: events.append(("denoise", time.perf_counter())))
    try:
        [(paths, _)] = batched([dict(BASE, prompt="next", seed=2, width=264)], first=dict(BASE, prompt="slow", seed=1))
    finally:
        hook.remove()
    assert len(paths) == 1 and next_started.is_set()
    at = {}
    for what, t in events:
        at.setdefault(what, []).append(t)
    assert len(at["denoise"]) == 2  # one step each
    assert at["denoise"][1] < at["written slow"][0]
    assert at["encode slow"][0] < at["encode next"][0] < at["written slow"][0]
