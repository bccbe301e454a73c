"""Cog adapter: declares the inputs and hands them to the engine in lib/."""

import asyncio
import logging
import sys
from typing import Iterator, Optional

from cog import BaseRunner, Input, Path, concurrent

from lib import cog_inputs
from lib.cog_outputs import Outputs
from lib.engine.batcher import Batcher
from lib.engine.engine import Engine

# `cog build` reads this file without running it (cog's static schema parser), and takes only literals: each value
# below repeats what lib/ defines (the mode table, lib/engine/inputs.py), and tests/test_cog_schema.py keeps them equal.
MODES = [
    "sdxl-turbo",
    "sd-turbo",
    "lcm",
    "lcm-lora-sdxl",
    "lcm-lora-sd15",
    "sdxl-lightning-2step",
    "sdxl-lightning-4step",
    "sdxl-lightning-8step",
]
MODE_HELP = "sdxl-turbo: SDXL Turbo: 1-4 steps, no guidance, 512px (non-commercial use only: Stability AI Non-Commercial Research Community License); sd-turbo: SD Turbo: 1-4 steps, no guidance, 512px (non-commercial use only: Stability AI Non-Commercial Research Community License); lcm: LCM Dreamshaper v7: 1-8 steps, guidance embedded in the UNet, 768px; lcm-lora-sdxl: SDXL base + LCM-LoRA: 2-8 steps, guidance 0, or 1-2, 1024px; lcm-lora-sd15: SD 1.5 + LCM-LoRA: 2-8 steps, guidance 0, or 1-2, 512px; sdxl-lightning-2step: SDXL base + SDXL-Lightning 2-step LoRA: 2 steps, no guidance, 1024px; sdxl-lightning-4step: SDXL base + SDXL-Lightning 4-step LoRA: 4 steps, no guidance, 1024px; sdxl-lightning-8step: SDXL base + SDXL-Lightning 8-step LoRA: 8 steps, no guidance, 1024px"
STEPS_HELP = "Denoising steps; default (allowed) per mode: sdxl-turbo 1 (1-4); sd-turbo 1 (1-4); lcm 4 (1-8); lcm-lora-sdxl 4 (2-8); lcm-lora-sd15 4 (2-8); sdxl-lightning-2step 2 (only 2); sdxl-lightning-4step 4 (only 4); sdxl-lightning-8step 8 (only 8)"
GUIDANCE_HELP = "Default (allowed) per mode: sdxl-turbo 0 (only 0); sd-turbo 0 (only 0); lcm 8 (1-15, an embedding in the UNet); lcm-lora-sdxl 1 (0, or 1-2); lcm-lora-sd15 1 (0, or 1-2); sdxl-lightning-2step 0 (only 0); sdxl-lightning-4step 0 (only 0); sdxl-lightning-8step 0 (only 0)"
OUTPUT_FORMATS = ["webp", "jpg", "png"]


class Predictor(BaseRunner):
    def setup(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
        self.engine = Engine.from_env()
        self.batcher = Batcher(self.engine)
        cog_inputs.install()  # file inputs: only what Cog fetched for the request (lib/cog_inputs.py)
        self.outputs = Outputs.from_env()  # output files: removed once Cog has read them (lib/cog_outputs.py)
        if self.engine.switches.warmup:  # on the thread that will serve the predictions
            self.batcher.warm_up()

    @concurrent(max=8)  # concurrent predictions share the GPU through the batcher (lib/engine/batcher.py)
    async def run(
        self,
        prompt: str = Input(description="What to draw"),
        negative_prompt: Optional[str] = Input(
            default=None,
            description="What to keep out; acts only where classifier-free guidance runs (LCM-LoRA modes at guidance_scale > 1); elsewhere ignored with a note in the logs",
        ),
        mode: str = Input(default="sdxl-turbo", choices=MODES, description=MODE_HELP),
        width: Optional[int] = Input(
            default=None,
            ge=256,
            le=2048,
            description="Multiple of 8; default: the mode's size (img2img: the input image's aspect ratio at the mode's pixel count)",
        ),
        height: Optional[int] = Input(default=None, ge=256, le=2048, description="Multiple of 8; default as width"),
        num_outputs: int = Input(default=1, ge=1, le=8, description="Number of images"),
        num_inference_steps: Optional[int] = Input(default=None, ge=1, le=8, description=STEPS_HELP),
        guidance_scale: Optional[float] = Input(default=None, ge=0, le=15, description=GUIDANCE_HELP),
        seed: Optional[int] = Input(
            default=None, ge=0, le=4294967295, description="Random if not set; image i uses seed + i"
        ),
        image: Optional[Path] = Input(
            default=None,
            description="Input image, turns the prediction into img2img: an https URL or a data URI of a PNG, JPEG or WebP image (up to 50 MiB and 4096x4096 pixels)",
        ),
        strength: float = Input(
            default=0.5,
            ge=0.02,
            le=1,
            description="img2img: how much to change the image (1 = entirely). At least one denoising step always runs (see README)",
        ),
        output_format: str = Input(default="webp", choices=OUTPUT_FORMATS, description="File format"),
        output_quality: int = Input(default=80, ge=1, le=100, description="webp/jpg quality; png is lossless"),
        lora_url: Optional[str] = Input(
            default=None,
            description="A style LoRA for the mode's base model: an https URL of a .safetensors file (kohya or diffusers layout). Checked, cached, and removed after the prediction",
        ),
        lora_scale: float = Input(default=1.0, ge=0, le=2, description="Strength of the style LoRA (0 = none)"),
        disable_safety_checker: bool = Input(
            default=False, description="Skip the safety checker (images it flags as NSFW are otherwise dropped)"
        ),
        fast_decode: bool = Input(
            default=False,
            description="Decode with the tiny autoencoder (TAESD / TAESDXL): several times faster decoding, slightly softer fine detail",
        ),
        control_image: Optional[Path] = Input(
            default=None,
            description="Guides the layout (ControlNet; modes sdxl-turbo, lcm, lcm-lora-sdxl, lcm-lora-sd15, where the server enables ControlNet). Fitted to the output size like the input image; without width and height the output takes its aspect ratio",
        ),
        control_type: str = Input(
            default="canny",
            choices=["canny", "depth", "scribble", "edge_map", "depth_map"],
            description="What guides: canny (the image's edges), depth (its estimated depth), scribble (lines drawn on a light background), edge_map or depth_map (the image already is the map)",
        ),
        control_scale: float = Input(
            default=0.8, ge=0.0, le=2.0, description="How strongly the control guides (0 = not at all)"
        ),
        control_start: float = Input(
            default=0.0,
            ge=0.0,
            le=1.0,
            description="Fraction of the denoising steps after which the control starts acting",
        ),
        control_end: float = Input(
            default=1.0,
            ge=0.0,
            le=1.0,
            description="Fraction of the denoising steps after which it stops; the window must cover at least one step",
        ),
        control_2_type: str = Input(
            default="none",
            choices=["none", "canny", "depth", "scribble", "edge_map", "depth_map"],
            description="A second control at once (for example depth beside canny): its type, or none",
        ),
        control_2_image: Optional[Path] = Input(
            default=None, description="The second control's image; default: control_image"
        ),
        control_2_scale: float = Input(default=0.8, ge=0.0, le=2.0, description="The second control's strength"),
        control_2_start: float = Input(default=0.0, ge=0.0, le=1.0, description="The second control's start"),
        control_2_end: float = Input(default=1.0, ge=0.0, le=1.0, description="The second control's end"),
        return_control_maps: bool = Input(
            default=False, description="Also output each control map (the edges, depth or lines that guided the image)"
        ),
    ) -> Iterator[Path]:
        # Never a path to a file already on the server: only what Cog fetched for this request.
        image = cog_inputs.received("image", image)
        control_image = cog_inputs.received("control_image", control_image)
        control_2_image = cog_inputs.received("control_2_image", control_2_image)
        request = self.engine.request(
            prompt=prompt,
            negative_prompt=negative_prompt,
            mode=mode,
            width=width,
            height=height,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            image=image,
            strength=strength,
            output_format=output_format,
            output_quality=output_quality,
            lora_url=lora_url,
            lora_scale=lora_scale,
            disable_safety_checker=disable_safety_checker,
            fast_decode=fast_decode,
            control_image=control_image,
            control_type=control_type,
            control_scale=control_scale,
            control_start=control_start,
            control_end=control_end,
            control_2_type=control_2_type,
            control_2_image=control_2_image,
            control_2_scale=control_2_scale,
            control_2_start=control_2_start,
            control_2_end=control_2_end,
            return_control_maps=return_control_maps,
        )
        folder = self.outputs.new()
        try:
            # In a thread: fetching a LoRA is network work, and the event loop serves the other predictions meanwhile;
            # a batch of the same kind about to start waits for this one (up to BATCH_WINDOW_MS).
            with self.batcher.incoming(request):
                job = await asyncio.to_thread(self.engine.job, request, folder, self.record_metric)
            # A sync iterator returned from async run() streams: Cog sends each image as it is written (a
            # yielding async generator's images would all be sent at the end; see Batcher.stream).
            outputs = await self.batcher.stream(job)
        except BaseException:  # an input that fails, or a cancel: nothing is left on disk
            self.outputs.discard(folder)
            raise
        return self.outputs.deliver(folder, (Path(output.path) for output in outputs), cancel=job.cancel)
