"""Cross-request batching in-process: concurrent predictions share pipeline calls, each gets its own images."""

import asyncio

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

    def run_all(inputs_list, window=0.2, max_images=16, cancel=(), cancel_after=0.05):
        predictor.batcher = Batcher(predictor.engine, window=window, max_images=max_images)

        async def one(i, inputs):
            metrics = Metrics()
            paths = []
            # Each task is its own prediction: Cog gives each its own context, and so its own metrics.
            predictor.record_metric = metrics
            async for path in outputs(predictor, **run_inputs(predictor, **inputs)):
                paths.append(path)
            return paths, metrics

        async def burst():
            tasks = [asyncio.create_task(one(i, inputs)) for i, inputs in enumerate(inputs_list)]
            await asyncio.sleep(cancel_after)
            for i in cancel:
                tasks[i].cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)

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
    results = batched(inputs, cancel={1}, cancel_after=cancel_after)
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
