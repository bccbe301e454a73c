"""The safety checker (lib/engine/safety.py) through the Predictor on the tiny checker: on by default, off per request,
flagged images dropped, a request with every image flagged fails, the count is a metric and a log line, and it
runs once per batch.

The tiny checker is the real StableDiffusionSafetyChecker with a shrunk CLIP tower; its thresholds (2.0) flag
nothing. Tests that need flagged images lower the thresholds on the loaded module, and the checker's own code
decides which images they are.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from PIL import Image

from lib.engine.batcher import Batcher
from lib.engine.safety import AllImagesFlagged
from lib.local import Metrics, outputs, run_inputs

BASE = dict(prompt="a lighthouse at dusk", mode="sd-turbo", width=256, height=256, output_format="png")


@pytest.fixture
def checker(predictor):
    """The engine's safety checker; its thresholds are put back and its calls recorded (images per call)."""
    safety = predictor.engine.safety
    assert safety is not None, "the checker is on by default"
    model = safety.model
    saved = model.concept_embeds_weights.clone(), model.special_care_embeds_weights.clone()
    calls = []
    real = safety.flagged

    def flagged(images):
        calls.append(len(images))
        return real(images)

    safety.flagged = flagged
    safety.calls = calls
    yield safety
    del safety.flagged, safety.calls
    with torch.no_grad():
        model.concept_embeds_weights.copy_(saved[0])
        model.special_care_embeds_weights.copy_(saved[1])


def flag_everything(safety) -> None:
    with torch.no_grad():  # cosine similarity - (-2) > 0 for every image and concept
        safety.model.concept_embeds_weights.fill_(-2.0)


@pytest.mark.parametrize("mode", ["sd-turbo", "sdxl-lightning-4step"])
def test_on_by_default_once_per_batch_nothing_flagged(run, checker, mode):
    paths, metrics = run(**dict(BASE, mode=mode), num_outputs=3, seed=1)
    assert len(paths) == 3
    assert metrics["nsfw_flagged"] == 0 and metrics["timings.safety_checker"] > 0
    assert checker.calls == [3]


def test_disable_safety_checker_skips_it(run, checker):
    flag_everything(checker)
    paths, metrics = run(**BASE, num_outputs=2, seed=1, disable_safety_checker=True)
    assert len(paths) == 2
    assert "nsfw_flagged" not in metrics and "timings.safety_checker" not in metrics
    assert checker.calls == []


def test_all_flagged_fails_with_a_clear_message(run, checker, predictor, caplog):
    flag_everything(checker)
    metrics = Metrics()
    predictor.record_metric = metrics
    from lib.local import collect

    with caplog.at_level(logging.WARNING, logger="lib.engine"), pytest.raises(AllImagesFlagged) as err:
        try:
            collect(predictor, **run_inputs(predictor, **BASE, num_outputs=2, seed=5))
        finally:
            del predictor.record_metric
    assert str(err.value) == (
        "all 2 image(s) were flagged by the safety checker as possibly not safe for work "
        "(NSFW) and dropped; try another prompt or seed"
    )
    assert metrics["nsfw_flagged"] == 2
    assert "safety checker: 2 of 2 image(s) flagged as possibly NSFW and dropped (seeds [5, 6])" in caplog.text


def test_some_flagged_are_dropped_and_the_rest_returned(run, checker, caplog):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    reference, _ = run(**BASE, num_outputs=4, seed=20, disable_safety_checker=True)
    # The checker's similarity of each image to each concept, as its forward computes it.
    pictures = [Image.open(p).convert("RGB") for p in reference]
    pixels = checker.processor(images=pictures, return_tensors="pt").pixel_values
    model = checker.model
    with torch.no_grad():
        cos = cosine_distance(model.visual_projection(model.vision_model(pixels)[1]), model.concept_embeds)
    # A concept and a threshold between two images' similarities, with a margin over the checker's rounding.
    best = max(
        ((c, i) for c in range(cos.shape[1]) for i in range(1, 4)),
        key=lambda ci: torch.sort(cos[:, ci[0]]).values[ci[1]] - torch.sort(cos[:, ci[0]]).values[ci[1] - 1],
    )
    concept, split = best
    values = torch.sort(cos[:, concept]).values
    assert values[split] - values[split - 1] > 0.004, "the tiny images are too alike to split"
    threshold = float(values[split] + values[split - 1]) / 2
    with torch.no_grad():
        model.concept_embeds_weights[concept] = threshold
    flagged = [i for i in range(4) if cos[i, concept] > threshold]

    with caplog.at_level(logging.WARNING, logger="lib.engine"):
        paths, metrics = run(**BASE, num_outputs=4, seed=20)
    kept = [i for i in range(4) if i not in flagged]
    assert metrics["nsfw_flagged"] == len(flagged) == 4 - split
    assert [p.name for p in paths] == [reference[i].name for i in kept]  # out-<i>-<seed>: the same images
    assert [p.read_bytes() for p in paths] == [reference[i].read_bytes() for i in kept]
    seeds = [20 + i for i in flagged]
    assert (
        f"safety checker: {len(flagged)} of 4 image(s) flagged as possibly NSFW and dropped (seeds {seeds})"
        in caplog.text
    )


def test_in_a_batch_each_request_gets_its_own_outcome_from_one_checker_call(predictor, checker):
    """Three requests in one batch: two keep the checker (all their images flagged: they fail), one turns it
    off (it gets its images). The checker runs once, on the 3 images of the two that keep it."""
    flag_everything(checker)
    saved = predictor.batcher
    predictor.batcher = Batcher(predictor.engine, window=0.2)
    inputs = [dict(BASE, seed=1), dict(BASE, seed=2, disable_safety_checker=True), dict(BASE, seed=3, num_outputs=2)]

    async def one(values):
        metrics = Metrics()
        predictor.record_metric = metrics
        return [p async for p in outputs(predictor, **run_inputs(predictor, **values))], metrics

    async def burst():
        return await asyncio.gather(*(one(v) for v in inputs), return_exceptions=True)

    try:
        first, second, third = asyncio.run(burst())
    finally:
        predictor.batcher = saved
        del predictor.record_metric
    assert isinstance(first, AllImagesFlagged) and "all 1 image(s)" in str(first)
    assert isinstance(third, AllImagesFlagged) and "all 2 image(s)" in str(third)
    paths, metrics = second
    assert len(paths) == 1 and metrics["batch.requests"] == 3 and "nsfw_flagged" not in metrics
    assert checker.calls == [3]


def test_safety_checker_off_switch_and_what_it_fetches(monkeypatch, tiny_weights):
    from lib.engine.loading import WeightsMissingError
    from lib.engine.modes import MODES, SAFETY_CHECKER, SD15, all_repos
    from lib.engine.safety import SafetyChecker, load_from_env
    from lib.weights.manifest import DEFAULT_MANIFEST, Lock, load_manifest, plan

    monkeypatch.setenv("SAFETY_CHECKER", "0")
    assert load_from_env(tiny_weights, torch.device("cpu"), torch.float32) is None
    monkeypatch.setenv("SAFETY_CHECKER", "1")
    assert isinstance(load_from_env(tiny_weights, torch.device("cpu"), torch.float32), SafetyChecker)

    # Enabling only SDXL Turbo fetches the checker's files from the SD 1.5 repo, not its UNet.
    manifest = load_manifest(DEFAULT_MANIFEST)
    lock = Lock(DEFAULT_MANIFEST.with_name("nonexistent.lock.json"))
    entries = plan(["sdxl-turbo"], manifest, lock, DEFAULT_MANIFEST, safety_checker=True)
    assert sorted(e.path for e in entries if e.repo_id == SD15.repo_id) == [
        "feature_extractor/preprocessor_config.json",
        "model_index.json",
        "safety_checker/config.json",
        "safety_checker/model.fp16.safetensors",
    ]
    assert not [e for e in plan(["sdxl-turbo"], manifest, lock, DEFAULT_MANIFEST) if e.repo_id == SD15.repo_id]
    checker_file = manifest["repos"][SD15.repo_id]["files"]["safety_checker/model.fp16.safetensors"]
    assert checker_file == {
        "sha256": "08902f19b1cfebd7c989f152fc0507bef6898c706a91d666509383122324b511",
        "size": 608018440,
    }
    # With SD 1.5 enabled too, its repo is planned once with both sets of files.
    sd15 = [r for r in all_repos(MODES, safety_checker=True) if r.repo_id == SD15.repo_id]
    assert len(sd15) == 1 and set(SAFETY_CHECKER.components) < set(sd15[0].components)

    with pytest.raises(WeightsMissingError, match="(?s)safety checker weights missing.*SAFETY_CHECKER=0"):
        SafetyChecker.load(tiny_weights / "nowhere", torch.device("cpu"), torch.float32)


def test_preprocessing_split_over_threads_gives_the_same_pixels(checker):
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)) for _ in range(7)]
    serial = checker.processor(images=images, return_tensors="pt").pixel_values
    saved = checker._threads, checker._pool
    checker._threads, checker._pool = 3, ThreadPoolExecutor(3)
    try:
        assert torch.equal(checker._pixels(images), serial)
    finally:
        checker._pool.shutdown()
        checker._threads, checker._pool = saved
