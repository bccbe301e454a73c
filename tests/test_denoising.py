"""The denoising loop (lib/engine/schedulers.py): no call that makes the host wait for the device inside any step, for
every scheduler family, txt2img and img2img; and the images are exactly those of the plain diffusers pipeline with
diffusers' own scheduler and CPU generators (seeds stay portable).

The counter (lib/testkit/syncs.py) counts on the CPU every tensor-to-Python conversion, value-sized output, 0-dim
tensor index and per-step host noise draw: on a GPU each one stalls the host or copies every step."""

from __future__ import annotations

import io

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from lib.engine import decoding, prompts
from lib.engine.inputs import resolve_request
from lib.engine.modes import PIPELINE_CLASSES
from lib.engine.schedulers import SYNC_FREE, SyncFree
from lib.testkit.syncs import instrument

PIPELINES = [getattr(diffusers, name) for pair in PIPELINE_CLASSES.values() for name in pair]
PICTURE = Image.new("RGB", (256, 256), (180, 90, 30))
# One case per scheduler and pipeline family: (mode, steps, guidance), several steps so that per-step noise is drawn.
CASES = {
    "sd-turbo": ("sd-turbo", 3, None),  # EulerDiscrete, SD pipeline
    "sdxl-turbo": ("sdxl-turbo", 3, None),  # EulerAncestral, SDXL pipeline
    "lcm": ("lcm", 4, None),  # LCM pipeline (guidance embedded in the UNet)
    "lcm-lora-sd15-cfg": ("lcm-lora-sd15", 3, 1.5),  # LCMScheduler in the SD pipeline, classifier-free guidance
    "lcm-lora-sdxl": ("lcm-lora-sdxl", 3, None),  # LCMScheduler in the SDXL pipeline
}


def job(engine, case: str, img2img: bool, seed: int = 11):
    mode, steps, guidance = CASES[case]
    inputs = dict(prompt="a lighthouse", mode=mode, width=256, height=256, seed=seed, num_outputs=2)
    inputs.update(num_inference_steps=steps, output_format="png")
    if guidance is not None:
        inputs.update(guidance_scale=guidance, negative_prompt="fog")
    if img2img:
        request = resolve_request(enabled=engine.enabled, image_size=PICTURE.size, strength=0.8, **inputs)
        return engine.job(request, None, picture=PICTURE)
    return engine.job(engine.request(**inputs), None)


def images(engine, the_job) -> list[np.ndarray]:
    outputs = [output for _, output in engine.run_batch([the_job])]
    return [np.asarray(Image.open(io.BytesIO(o.data))) for o in outputs]


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_host_sync_inside_any_step_and_the_images_of_plain_diffusers(predictor, case, img2img):
    """No synchronizing call in any step; and the plain pipeline (the same modules with diffusers' own scheduler class
    and `generator=[CPU generators]`, fed the same prompt embeddings, decoded the same way) gives the same pixels."""
    engine = predictor.engine
    the_job = job(engine, case, img2img)
    with instrument(PIPELINES, engine.device) as counter:
        got = images(engine, the_job)
    r = the_job.request
    runs = r.schedule[1]
    assert len(got) == 2 and len(counter.steps) == runs > 1
    assert [dict(step) for step in counter.steps] == [{}] * runs, "\n".join(sorted(set(counter.where)))

    loaded = engine.modes[r.mode.name]
    pipe = loaded.img2img if img2img else loaded.txt2img
    scheduler = pipe.scheduler
    assert isinstance(scheduler, SyncFree)
    plain_scheduler = next(base for base, ours in SYNC_FREE.items() if ours is type(scheduler))
    plain = type(pipe)(**dict(pipe.components, scheduler=plain_scheduler.from_config(scheduler.config)))
    plain.set_progress_bar_config(disable=True)
    cfg = r.mode.uses_cfg(r.guidance_scale)
    embeds = prompts.embeddings(pipe, r.mode.family, r.mode.name, [r.prompt] * 2, [r.negative_prompt] * 2, cfg, None)
    extra = {}
    if img2img:
        latents = decoding.encode(pipe.vae, the_job.picture, engine.dtype).expand(2, -1, -1, -1)
        extra = {"image": latents, "strength": r.strength}
    with torch.no_grad():
        latents = plain(
            num_inference_steps=r.schedule[0],
            guidance_scale=r.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in r.seeds],
            height=r.height,
            width=r.width,
            output_type="latent",
            **embeds,
            **extra,
        ).images
    for k, picture in enumerate(got):  # the engine decodes one image per call on a CPU
        assert np.array_equal(picture, decoding.decode(pipe.vae, latents[k : k + 1])[0].numpy()), f"image {k}"
