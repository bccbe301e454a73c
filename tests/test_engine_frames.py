"""What the realtime server asks of the engine: a job with a picture rather than a file, its image encoded in
memory (the same bytes as the file), and the img2img input encoded with TAESD (fast_encode)."""

from __future__ import annotations

import contextlib

import pytest
from PIL import Image

from lib.engine.inputs import resolve_request

PICTURE = Image.new("RGB", (256, 256), (200, 120, 40))


def request(engine, **extra):
    inputs = dict(prompt="a frame", mode="sd-turbo", width=256, height=256, seed=9, output_format="jpg")
    return resolve_request(enabled=engine.enabled, image_size=(256, 256), strength=0.6, **{**inputs, **extra})


def outputs(engine, job):
    return [output for _, output in engine.run_batch([job])]


@contextlib.contextmanager
def encoder_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_a_job_without_out_dir_gives_the_files_bytes_in_memory(predictor, tmp_path):
    engine = predictor.engine
    in_memory = outputs(engine, engine.job(request(engine), None, picture=PICTURE))
    on_disk = outputs(engine, engine.job(request(engine), tmp_path, picture=PICTURE))
    assert in_memory[0].path is None and on_disk[0].data is None
    assert in_memory[0].data == on_disk[0].path.read_bytes()
    assert in_memory[0].settings == on_disk[0].settings


def test_fast_encode_encodes_the_picture_with_taesd(predictor):
    engine = predictor.engine
    loaded = engine.modes["sd-turbo"]
    with encoder_calls(loaded.tiny_vae.encoder) as tiny, encoder_calls(loaded.txt2img.vae.encoder) as vae:
        fast = outputs(engine, engine.job(request(engine, fast_encode=True, fast_decode=True), None, picture=PICTURE))
        assert (len(tiny), len(vae)) == (1, 0)
        plain = outputs(engine, engine.job(request(engine, fast_decode=True), None, picture=PICTURE))
        assert (len(tiny), len(vae)) == (1, 1)
    assert fast[0].data != plain[0].data
    assert fast[0].settings["fast_encode"] is True and "fast_encode" not in plain[0].settings


def test_a_picture_goes_only_with_an_img2img_request(predictor):
    engine = predictor.engine
    with pytest.raises(ValueError, match="an img2img request needs its picture"):
        engine.job(request(engine), None)
    txt2img = resolve_request(enabled=engine.enabled, prompt="a frame", mode="sd-turbo")
    with pytest.raises(ValueError, match="only an img2img request takes one"):
        engine.job(txt2img, None, picture=PICTURE)
