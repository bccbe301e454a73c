"""The safety checker (lib/engine/safety.py) through the Predictor on the tiny checker: on by default, off per request,
flagged images dropped, a request with every image flagged fails, the count is a metric and a log line, and it
runs once per batch, on the device thread; and its verdicts on the device equal diffusers' checker's on PIL images.

The tiny checker is the real StableDiffusionSafetyChecker with a shrunk CLIP tower; its thresholds (2.0) flag
nothing. Tests that need flagged images lower the thresholds on the loaded module, and the checker's own code
decides which images they are.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from lib.engine.batcher import Batcher
from lib.engine.safety import AllImagesFlagged
from lib.local import Metrics, outputs, run_inputs

BASE = dict(prompt="a lighthouse at dusk", mode="sd-turbo", width=256, height=256, output_format="png")


@pytest.fixture
def checker(predictor):
    """The engine's safety checker; its thresholds are put back and its calls recorded (images per call, and the
    thread that made it)."""
    safety = predictor.engine.safety
    assert safety is not None, "the checker is on by default"
    model = safety.model
    saved = model.concept_embeds_weights.clone(), model.special_care_embeds_weights.clone()
    calls, threads = [], []
    real = safety.check

    def check(pixels):
        calls.append(len(pixels))
        threads.append(threading.current_thread().name)
        return real(pixels)

    safety.check = check
    safety.calls, safety.threads = calls, threads
    yield safety
    del safety.check, safety.calls, safety.threads
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


def crafted_images(height: int, width: int, count: int, rng) -> list:
    """Noise, flat colours and colour ramps: images that the tiny checker tells apart."""
    out = []
    for i in range(count):
        if i % 3 == 0:
            a = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        elif i % 3 == 1:
            a = np.broadcast_to(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), (height, width, 3)).copy()
        else:
            y, x = np.linspace(0, 255, height)[:, None, None], np.linspace(0, 255, width)[None, :, None]
            a = ((y * rng.random(3) + x * rng.random(3)) % 256).astype(np.uint8)
        out.append(a)
    return out


def test_verdicts_on_the_device_equal_the_diffusers_checker_on_pil_images(checker):
    """check() on the decoded pixels (its own resize, crop and normalisation, the thresholds compared on the device)
    against StableDiffusionSafetyChecker.forward on CLIPImageProcessor's pixels of the same images as PIL images, at
    three sizes and three settings of the thresholds: as loaded (nothing flagged), one concept's threshold between
    the images (some flagged), and the special-care rule (an image flagged only through the 0.01 that a special-care
    concept adds). Every score stays clear of its threshold by far more than the preprocessing's difference."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    rng = np.random.default_rng(3)
    groups = [crafted_images(h, w, 6, rng) for h, w in ((256, 256), (256, 384), (512, 256))]
    model = checker.model
    weights = model.concept_embeds_weights, model.special_care_embeds_weights

    def reference(arrays) -> list[bool]:
        pixels = checker.processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt").pixel_values
        with torch.no_grad():
            _, nsfw = model(clip_input=pixels.to(checker.dtype), images=np.zeros((len(arrays), 1)))
        return [bool(x) for x in nsfw]

    def similarities(arrays):
        pixels = checker.processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt").pixel_values
        with torch.no_grad():
            embeds = model.visual_projection(model.vision_model(pixels.to(checker.dtype))[1])
            return cosine_distance(embeds, model.concept_embeds), cosine_distance(embeds, model.special_care_embeds)

    concepts, special = (torch.cat(parts).float() for parts in zip(*map(similarities, groups), strict=True))

    def midpoint(values):  # a threshold in the widest gap between the images' values
        v = torch.sort(values).values
        gap = int(torch.argmax(v[1:] - v[:-1]))
        return float(v[gap] + v[gap + 1]) / 2

    def clear_of_thresholds(name):  # round(score, 3) > 0 decides: the scores stay 0.002 away from 0.0005
        special_scores = special - weights[1].float()
        adjustment = (special_scores * 1000 > 0.5).any(dim=1, keepdim=True).float() * 0.01
        for scores in (special_scores, concepts - weights[0].float() + adjustment):
            assert (scores - 0.0005).abs().min() > 0.002, (name, scores)

    def set_thresholds(concept: list[float], special_care: list[float]):
        with torch.no_grad():
            weights[0].copy_(torch.tensor(concept))
            weights[1].copy_(torch.tensor(special_care))

    n_special = special.shape[1]
    loaded = [w.float().tolist() for w in weights]
    split = list(loaded[0])
    split[0] = midpoint(concepts[:, 0])
    # Just above the most similar image, for the concepts where it stands out: nothing flagged without the 0.01.
    ranked = torch.sort(concepts, dim=0, descending=True).values
    top = [float(r[0]) + 0.005 if r[0] - r[1] > 0.012 else 2.0 for r in ranked.T]
    adjusted_special = [midpoint(special[:, 0])] + [2.0] * (n_special - 1)
    outcomes = {}
    for name, concept, special_care in (
        ("as loaded", loaded[0], loaded[1]),
        ("one concept split", split, [2.0] * n_special),
        ("special care adds 0.01", top, adjusted_special),
        ("without special care", top, [2.0] * n_special),
    ):
        set_thresholds(concept, special_care)
        clear_of_thresholds(name)
        want = [v for arrays in groups for v in reference(arrays)]
        got = [v for arrays in groups for v in checker.check(torch.from_numpy(np.stack(arrays))).tolist()]
        assert got == want, name
        outcomes[name] = sum(want)
    total = sum(map(len, groups))
    assert outcomes["as loaded"] == 0 and outcomes["without special care"] == 0
    assert 0 < outcomes["one concept split"] < total and 0 < outcomes["special care adds 0.01"] < total, outcomes


def test_the_checker_runs_on_the_device_thread_with_the_decoded_pixels(predictor, checker, run):
    """Through the batcher, the checker is called on the device thread (right after the decode), not the host one."""
    paths, metrics = run(**BASE, num_outputs=2, seed=8)
    assert len(paths) == 2 and metrics["nsfw_flagged"] == 0
    assert checker.calls == [2] and checker.threads[0].startswith("device")


def test_scores_are_rounded_to_three_decimals_as_the_checker_loop_rounds_them():
    """round(score, 3) > 0 on the float32 score, as StableDiffusionSafetyChecker.forward decides, near the edge."""
    from lib.engine.safety import above_zero

    scores = np.array([0.0004, 0.00049, 0.0005, 0.00050001, 0.00051, 0.0006, 0.001, -0.0006, 0.0, 0.2], np.float32)
    want = [bool(round(score, 3) > 0) for score in scores]  # NumPy's float32 rounding, half to even
    assert above_zero(torch.from_numpy(scores)).tolist() == want
    assert want.count(True) == 5


def test_safety_benchmark_smoke(checker):
    """scripts/bench_safety.py's measurement runs (CI smoke; the figures are not asserted)."""
    from lib.bench.safety import measure

    result = measure(checker, size=256, images=2, repeats=1)
    assert result["size"] == 256 and result["images"] == 2 and result["ratio"] > 0
