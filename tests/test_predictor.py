"""The Predictor end to end on tiny random weights: every mode, task and format; seeds; metadata; metrics."""

import logging

import numpy as np
import pytest
from PIL import Image

from lib.engine.images import read_settings
from lib.engine.modes import MODES

PIL_FORMAT = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


@pytest.fixture(scope="session")
def photo(tmp_path_factory):
    """An input image with a different aspect ratio from the output, so img2img must fit it."""
    path = tmp_path_factory.mktemp("inputs") / "photo.jpg"
    gradient = np.linspace(0, 255, 320 * 240 * 3).reshape(240, 320, 3).astype(np.uint8)
    Image.fromarray(gradient).save(path)
    return path


@pytest.mark.parametrize("fmt", ["webp", "jpg", "png"])
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_task_and_format(run, photo, mode, img2img, fmt):
    inputs = dict(prompt="a red fox in snow", mode=mode, width=256, height=264, output_format=fmt, seed=7)
    if img2img:
        inputs.update(image=photo, strength=0.6)
    paths, metrics = run(**inputs)

    assert len(paths) == 1
    path = paths[0]
    assert path.suffix == f".{fmt}"
    with Image.open(path) as image:
        assert image.format == PIL_FORMAT[fmt]
        assert image.size == (256, 264)
        assert image.mode == "RGB"
        image.load()
    m = MODES[mode]
    settings = read_settings(path)
    assert settings["mode"] == mode and settings["prompt"] == "a red fox in snow" and settings["seed"] == 7
    assert (settings["width"], settings["height"]) == (256, 264)
    assert settings["num_inference_steps"] == m.steps.default
    assert settings["guidance_scale"] == m.guidance.default
    assert settings["strength"] == (0.6 if img2img else None)
    assert metrics["seeds"] == [7]
    assert len(metrics["timings.steps"]) == settings["denoising_steps"] >= 1
    for stage in ("text_encoding", "denoising", "vae_decode", "image_encoding"):
        assert metrics[f"timings.{stage}"] >= 0
    assert ("timings.vae_encode" in metrics) == img2img


def test_defaults_give_the_mode_size_and_settings(run):
    paths, metrics = run(prompt="a lighthouse", mode="sd-turbo")
    with Image.open(paths[0]) as image:
        assert image.size == (512, 512) and image.format == "WEBP"
    settings = read_settings(paths[0])
    assert settings["num_inference_steps"] == 1 and settings["guidance_scale"] == 0
    assert 0 <= metrics["seeds"][0] < 2**32


def test_img2img_default_size_follows_the_input_aspect(run, photo):
    paths, _ = run(prompt="a lighthouse", mode="sd-turbo", image=photo)
    with Image.open(paths[0]) as image:
        w, h = image.size
    assert (w % 8, h % 8) == (0, 0)
    assert abs(w / h - 320 / 240) < 0.02 and abs(w * h - 512 * 512) / (512 * 512) < 0.05


def as_array(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_same_seed_same_images_and_different_seeds_differ(run):
    inputs = dict(prompt="a castle", mode="lcm", width=256, height=256, num_outputs=2, output_format="png")
    first, m1 = run(seed=123, **inputs)
    again, _ = run(seed=123, **inputs)
    other, m3 = run(seed=124, **inputs)
    assert m1["seeds"] == [123, 124] and m3["seeds"] == [124, 125]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert not np.array_equal(as_array(first[0]), as_array(first[1]))
    # Image i uses seed + i: the second image of seed 123 is the first image of seed 124.
    assert np.abs(as_array(first[1]) - as_array(other[0])).max() <= 2
    assert read_settings(first[1])["seed"] == 124


def test_seeds_wrap_at_32_bits(run):
    _, metrics = run(prompt="x", mode="sd-turbo", width=256, height=256, num_outputs=2, seed=2**32 - 1)
    assert metrics["seeds"] == [2**32 - 1, 0]


def test_img2img_low_strength_runs_one_step(run, photo):
    # int(1 step * 0.1) == 0 would be an empty schedule: one step runs at strength 0.1's noise level instead.
    paths, metrics = run(prompt="x", mode="sdxl-turbo", width=256, height=256, image=photo, strength=0.1)
    assert len(metrics["timings.steps"]) == 1 == read_settings(paths[0])["denoising_steps"]
    paths, metrics = run(
        prompt="x", mode="lcm", width=256, height=256, image=photo, strength=0.02, num_inference_steps=8
    )
    assert len(metrics["timings.steps"]) == 1


def test_negative_prompt_without_guidance_is_logged(run, caplog):
    with caplog.at_level(logging.INFO):
        run(prompt="x", negative_prompt="blurry", mode="sdxl-turbo", width=256, height=256)
    assert "negative_prompt ignored" in caplog.text and "sdxl-turbo" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        paths, _ = run(
            prompt="x", negative_prompt="blurry", mode="lcm-lora-sd15", guidance_scale=1.5, width=256, height=256
        )
    assert "negative_prompt ignored" not in caplog.text
    assert read_settings(paths[0])["negative_prompt"] == "blurry"


def test_guidance_above_one_runs_classifier_free_guidance(run):
    """In the LCM-LoRA modes guidance > 1 changes the image (CFG with the negative prompt)."""
    base = dict(prompt="x", mode="lcm-lora-sd15", width=256, height=256, seed=5, output_format="png")
    plain, _ = run(guidance_scale=1.0, **base)
    guided, _ = run(guidance_scale=2.0, negative_prompt="blurry", **base)
    assert not np.array_equal(as_array(plain[0]), as_array(guided[0]))
