"""Cog adapter: declares the inputs and hands them to the engine in lib/."""

import asyncio
import logging
import sys
from typing import Iterator, Optional

from cog import BaseRunner, Input, Path

from lib.engine import inputs, modes
from lib.engine.batcher import Batcher
from lib.engine.engine import Engine
from lib.engine.images import new_output_dir
from lib.engine.modes import DEFAULT_MODE, MODES, NON_COMMERCIAL

# The model description users see: the turbo modes' weights are licensed for non-commercial use only.
MODE_HELP = "; ".join(
    f"{m.name}: {m.summary}"
    + (
        " (non-commercial use only: Stability AI Non-Commercial Research Community License)"
        if m.weights.repo.licence == NON_COMMERCIAL
        else ""
    )
    for m in MODES.values()
)


class Predictor(BaseRunner):
    def setup(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
        self.engine = Engine.from_env()
        self.batcher = Batcher(self.engine)
        if self.engine.switches.warmup:  # on the thread that will serve the predictions
            self.batcher.warm_up()

    async def run(
        self,
        prompt: str = Input(description="What to draw"),
        negative_prompt: Optional[str] = Input(
            default=None,
            description="What to keep out; acts only where classifier-free guidance runs "
            "(LCM-LoRA modes at guidance_scale > 1); elsewhere ignored with a note in the logs",
        ),
        mode: str = Input(default=DEFAULT_MODE, choices=list(MODES), description=MODE_HELP),
        width: Optional[int] = Input(
            default=None,
            ge=inputs.SIZE_RANGE[0],
            le=inputs.SIZE_RANGE[1],
            description="Multiple of 8; default: the mode's size (img2img: the input "
            "image's aspect ratio at the mode's pixel count)",
        ),
        height: Optional[int] = Input(
            default=None,
            ge=inputs.SIZE_RANGE[0],
            le=inputs.SIZE_RANGE[1],
            description="Multiple of 8; default as width",
        ),
        num_outputs: int = Input(
            default=1, ge=inputs.NUM_OUTPUTS_RANGE[0], le=inputs.NUM_OUTPUTS_RANGE[1], description="Number of images"
        ),
        num_inference_steps: Optional[int] = Input(
            default=None, ge=modes.steps_bounds()[0], le=modes.steps_bounds()[1], description=modes.steps_help()
        ),
        guidance_scale: Optional[float] = Input(
            default=None,
            ge=modes.guidance_bounds()[0],
            le=modes.guidance_bounds()[1],
            description=modes.guidance_help(),
        ),
        seed: Optional[int] = Input(
            default=None,
            ge=inputs.SEED_RANGE[0],
            le=inputs.SEED_RANGE[1],
            description="Random if not set; image i uses seed + i",
        ),
        image: Optional[Path] = Input(default=None, description="Input image: turns the prediction into img2img"),
        strength: float = Input(
            default=0.5,
            ge=inputs.STRENGTH_RANGE[0],
            le=inputs.STRENGTH_RANGE[1],
            description="img2img: how much to change the image (1 = entirely). At least one "
            "denoising step always runs (see README)",
        ),
        output_format: str = Input(default="webp", choices=list(inputs.OUTPUT_FORMATS), description="File format"),
        output_quality: int = Input(
            default=80,
            ge=inputs.QUALITY_RANGE[0],
            le=inputs.QUALITY_RANGE[1],
            description="webp/jpg quality; png is lossless",
        ),
        lora_url: Optional[str] = Input(
            default=None,
            description="A style LoRA for the mode's base model: an https URL of a .safetensors file "
            "(kohya or diffusers layout). Checked, cached, and removed after the prediction",
        ),
        lora_scale: float = Input(
            default=1.0,
            ge=inputs.LORA_SCALE_RANGE[0],
            le=inputs.LORA_SCALE_RANGE[1],
            description="Strength of the style LoRA (0 = none)",
        ),
        disable_safety_checker: bool = Input(
            default=False, description="Skip the safety checker (images it flags as NSFW are otherwise dropped)"
        ),
        fast_decode: bool = Input(
            default=False,
            description="Decode with the tiny autoencoder (TAESD / TAESDXL): several times faster "
            "decoding, slightly softer fine detail",
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
        # In a thread: fetching a LoRA is network work, and the event loop serves the other predictions meanwhile.
        job = await asyncio.to_thread(self.engine.job, request, new_output_dir(), self.record_metric)
        # A sync iterator returned from async run() streams: Cog sends each image as it is written (a
        # yielding async generator's images would all be sent at the end; see Batcher.stream).
        outputs = await self.batcher.stream(job)
        return (Path(output.path) for output in outputs)
