"""ControlNet on the tiny models: each mode with ControlNets gives what the model cards' own diffusers ControlNet code
gives on the same inputs and seeds (canny, depth, a ready-made map, two controls, img2img with a control), the
control maps are what the cards compute, and every bad control is a clear error naming the input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    LCMScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image, ImageDraw, ImageOps
from transformers import AutoImageProcessor, AutoModelForDepthEstimation

from lib.engine.engine import Engine, batch_key
from lib.engine.inputs import InputError
from lib.engine.modes import DEPTH_ANYTHING, LORA_WEIGHT_NAME, MODES, SDXL, control_modes
from lib.testkit.environment import environment

SIZE = 256
PROMPT = "a lighthouse on a cliff"
SEED = 11
# Max abs difference per 8-bit channel against the card's code: the same computation, in another order (prompt
# embeddings encoded by the engine, the VAE decode outside the pipeline).
TOLERANCE = 2


@pytest.fixture(scope="module")
def engine(tiny_weights):
    """The engine as setup() builds it with CONTROLNET=1, every mode enabled."""
    env = dict(WEIGHTS_DIR=str(tiny_weights), WEIGHTS_OFFLINE="1", ENABLED_MODES=None, CONTROLNET="1")
    with environment(**env, SAFETY_CHECKER="0"):
        return Engine.from_env()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A picture with shapes (edges, depth cues), wider than tall: fitted to the square output by a centre crop."""
    image = Image.new("RGB", (360, 240), (235, 225, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 40, 220, 200), fill=(40, 90, 200))
    draw.rectangle((200, 100, 330, 230), fill=(180, 40, 40))
    draw.line((0, 230, 360, 120), fill=(20, 20, 20), width=6)
    path = tmp_path_factory.mktemp("control") / "photo.png"
    image.save(path)
    return path


def fitted(path) -> Image.Image:
    return ImageOps.fit(Image.open(path).convert("RGB"), (SIZE, SIZE), Image.Resampling.LANCZOS)


# -- the model cards' code -------------------------------------------------------------------------------------------
def card_canny(image: Image.Image) -> Image.Image:
    """diffusers' ControlNet docs: cv2.Canny(image, 100, 200), stacked to three channels."""
    edges = cv2.Canny(np.array(image), 100, 200)[:, :, None]
    return Image.fromarray(np.concatenate([edges, edges, edges], axis=2))


def card_depth(weights, image: Image.Image) -> Image.Image:
    """Depth Anything V2's card: the model's predicted depth at the image's size, scaled to 0-255."""
    folder = weights / DEPTH_ANYTHING.repo_id
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForDepthEstimation.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    post = processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])
    depth = post[0]["predicted_depth"]
    depth = (depth - depth.min()) / (depth.max() - depth.min())
    gray = (depth.numpy() * 255).astype("uint8")
    return Image.fromarray(np.stack([gray] * 3, axis=2))


def card_pipeline(weights, mode_name: str, nets: list[str], img2img: bool):
    """The card's diffusers code: the ControlNet pipeline from the mode's repo with its ControlNet(s); LCMScheduler
    and the LCM-LoRA (fused) for the LCM-LoRA modes."""
    mode = MODES[mode_name]
    controlnets = [
        ControlNetModel.from_pretrained(
            weights / mode.controlnets.repo(net).repo_id, variant=mode.controlnets.repo(net).variant
        )
        for net in nets
    ]
    sdxl = mode.family == SDXL
    cls = {
        (True, False): StableDiffusionXLControlNetPipeline,
        (True, True): StableDiffusionXLControlNetImg2ImgPipeline,
        (False, False): StableDiffusionControlNetPipeline,
        (False, True): StableDiffusionControlNetImg2ImgPipeline,
    }[(sdxl, img2img)]
    extra = {} if sdxl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(
        weights / mode.weights.repo.repo_id,
        controlnet=controlnets[0] if len(controlnets) == 1 else controlnets,
        variant=mode.weights.repo.variant,
        dtype=torch.float32,
        **extra,
    )
    if mode.weights.lora:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(weights / mode.weights.lora.repo_id, weight_name=LORA_WEIGHT_NAME)
        pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def card_image(pipe, img2img_latents, control_images, scales, starts, ends, steps, guidance, strength=None):
    single = len(control_images) == 1
    kwargs = dict(
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        controlnet_conditioning_scale=scales[0] if single else scales,
        control_guidance_start=starts[0] if single else starts,
        control_guidance_end=ends[0] if single else ends,
        generator=torch.Generator("cpu").manual_seed(SEED),
        height=SIZE,
        width=SIZE,
    )
    images = control_images[0] if single else control_images
    if img2img_latents is None:
        kwargs["image"] = images
    else:
        kwargs.update(image=img2img_latents, control_image=images, strength=strength)
    return np.asarray(pipe(**kwargs).images[0], dtype=np.int16)


def run_engine(engine, tmp_path, **inputs) -> tuple[np.ndarray, list]:
    request = engine.request(
        prompt=PROMPT, width=SIZE, height=SIZE, seed=SEED, output_format="png", return_control_maps=True, **inputs
    )
    outputs = list(engine.run(request, tmp_path))
    image = np.asarray(Image.open(outputs[0].path).convert("RGB"), dtype=np.int16)
    return image, [Image.open(o.path).convert("RGB") for o in outputs[1:]]


CASES = {
    "canny": dict(control_type="canny"),
    # Two controls at once: a depth map estimated in-process, and a ready-made map handed to the canny ControlNet as
    # it is; each with its own scale and window.
    "depth-and-edge-map": dict(
        control_type="depth", control_scale=0.6, control_2_type="edge_map", control_2_scale=1.2, control_2_start=0.25
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode_name", control_modes())
def test_each_mode_gives_the_cards_controlnet_images(engine, tiny_weights, photo, tmp_path, mode_name, case):
    mode = MODES[mode_name]
    inputs = dict(CASES[case], mode=mode_name)
    inputs["control_image"] = photo
    steps = 2  # in every mode's range; with two, a window from 0.25 keeps the second step only
    inputs["num_inference_steps"] = steps
    got, maps = run_engine(engine, tmp_path, **inputs)

    picture = fitted(photo)
    kinds = [inputs["control_type"]] + ([inputs["control_2_type"]] if "control_2_type" in inputs else [])
    card_maps = {"canny": card_canny, "depth": lambda p: card_depth(tiny_weights, p), "edge_map": lambda p: p}
    expected_maps = {kind: card_maps[kind](picture) for kind in kinds}
    for kind, made in zip(kinds, maps, strict=True):  # the maps the engine returned are the cards' maps
        assert np.array_equal(np.asarray(made), np.asarray(expected_maps[kind])), kind
    assert len(maps) == len(kinds)

    nets = ["depth" if k.startswith("depth") else "canny" for k in kinds]
    pipe = card_pipeline(tiny_weights, mode_name, nets, img2img=False)
    scales = [inputs.get("control_scale", 0.8), inputs.get("control_2_scale", 0.8)][: len(kinds)]
    starts = [0.0, inputs.get("control_2_start", 0.0)][: len(kinds)]
    expected = card_image(
        pipe, None, [expected_maps[k] for k in kinds], scales, starts, [1.0] * len(kinds), steps, mode.guidance.default
    )
    assert np.abs(got - expected).max() <= TOLERANCE

    # The control acts: the same request without it gives another image.
    plain = engine.request(prompt=PROMPT, mode=mode_name, width=SIZE, height=SIZE, seed=SEED, output_format="png",
                           num_inference_steps=steps)  # fmt: skip
    (tmp_path / "plain").mkdir()
    [out] = engine.run(plain, tmp_path / "plain")
    assert np.abs(np.asarray(Image.open(out.path).convert("RGB"), dtype=np.int16) - got).max() > TOLERANCE


IMG2IMG_MODES = [m for m in control_modes() if MODES[m].family != "lcm"]


@pytest.mark.parametrize("mode_name", IMG2IMG_MODES)
def test_img2img_with_a_control_gives_the_cards_images(engine, tiny_weights, photo, tmp_path, mode_name):
    """The card's ControlNet img2img pipeline, given the engine's init latents (the VAE's mode of the fitted input:
    img2img noise comes from the seed alone)."""
    mode = MODES[mode_name]
    steps = 2 if mode.steps.range[0] <= 2 <= mode.steps.range[1] else mode.steps.default
    got, [canny_map] = run_engine(
        engine, tmp_path, mode=mode_name, image=photo, strength=0.5, control_image=photo, num_inference_steps=steps
    )
    pipe = card_pipeline(tiny_weights, mode_name, ["canny"], img2img=True)
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(fitted(photo))
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    expected = card_image(
        pipe, latents, [card_canny(fitted(photo))], [0.8], [0.0], [1.0], steps, mode.guidance.default, strength=0.5
    )
    assert np.array_equal(np.asarray(canny_map), np.asarray(card_canny(fitted(photo))))
    assert np.abs(got - expected).max() <= TOLERANCE


def test_scribble_turns_drawn_lines_into_an_edge_map(engine, tmp_path):
    sketch = Image.new("RGB", (SIZE, SIZE), "white")
    ImageDraw.Draw(sketch).line((20, 20, 200, 220), fill=(31, 111, 235), width=12)
    ImageDraw.Draw(sketch).line((30, 200, 220, 40), fill=(250, 248, 240), width=12)  # too pale to be a line
    path = tmp_path / "sketch.png"
    sketch.save(path)
    (tmp_path / "out").mkdir()
    _, [scribble] = run_engine(
        engine, tmp_path / "out", mode="lcm-lora-sd15", control_image=path, control_type="scribble"
    )
    values = np.asarray(scribble)
    assert set(np.unique(values)) == {0, 255}
    assert values[120, 110].tolist() == [255, 255, 255] and values[5, 5].tolist() == [0, 0, 0]  # [row, column]
    assert values[168, 68].tolist() == [0, 0, 0]  # on the pale line


def test_the_control_image_sets_the_aspect_and_is_cropped_not_stretched(engine, photo, tmp_path):
    request = engine.request(prompt=PROMPT, mode="sdxl-turbo", seed=1, control_image=photo, return_control_maps=True)
    assert (request.width, request.height) == (624, 416)  # 3:2 at the mode's 512x512 pixels, multiples of 8
    outputs = list(engine.run(request, tmp_path))
    assert [Image.open(o.path).size for o in outputs] == [(624, 416), (624, 416)]
    assert outputs[1].path.name == "control-0-canny.png"


def test_a_control_window_that_skips_every_step_is_an_error(engine, photo):
    with pytest.raises(InputError, match=r"^control_end: the window 0-0.5 covers none of the 1 denoising step"):
        engine.request(prompt="x", mode="sdxl-turbo", control_image=photo, control_end=0.5)
    with pytest.raises(InputError, match=r"^control_2_end: the window 0.5-1 covers none"):
        engine.request(prompt="x", mode="sdxl-turbo", control_image=photo, control_2_type="depth", control_2_start=0.5)
    request = engine.request(prompt="x", mode="sdxl-turbo", num_inference_steps=2, control_image=photo, control_end=0.5)
    assert request.controls[0].end == 0.5  # with 2 steps the first one keeps it


BAD = [
    (dict(mode="sd-turbo"), "control_image: mode sd-turbo has no ControlNet; allowed: a control with modes "
     + ", ".join(control_modes())),
    (dict(control_type="pose"), "control_type: 'pose' is not a kind of control; allowed: canny, depth, scribble"),
    (dict(control_scale=2.5), "control_scale: 2.5 is out of range; allowed: 0 to 2"),
    (dict(control_start=-0.1), "control_start: -0.1 is out of range; allowed: 0 to 1"),
    (dict(control_start=0.6, control_end=0.4), "control_end: 0.4 is not after control_start 0.6"),
    (dict(control_2_type="depth", control_2_end=1.5), "control_2_end: 1.5 is out of range"),
    (dict(mode="lcm", image="@photo"), "control_image: mode lcm takes a control for text-to-image only"),
    (dict(control_image="@text"), "control_image: 'notes.txt' is not a PNG, JPEG or WebP image"),
    (dict(control_2_type="depth", control_2_image="@truncated"), "control_2_image: 'truncated.png'"),
]  # fmt: skip


@pytest.mark.parametrize("inputs, message", BAD)
def test_bad_controls_are_clear_errors(engine, files, photo, inputs, message):
    inputs = {k: files.get(v, v) if isinstance(v, str) else v for k, v in inputs.items()}
    inputs.setdefault("control_image", photo)
    inputs.setdefault("mode", "lcm-lora-sd15")
    with pytest.raises(InputError) as err:
        request = engine.request(prompt="x", width=SIZE, height=SIZE, **inputs)
        engine.job(request, None)
    assert str(err.value).startswith(message), str(err.value)


def test_without_the_setting_no_controlnet_is_loaded_and_a_control_is_refused(run, predictor, photo):
    """The shared predictor runs without CONTROLNET: it boots as before and refuses a control, naming the setting;
    then serves as usual."""
    assert all(not m.controlnets for m in predictor.engine.modes.values()) and predictor.engine.depth is None
    with pytest.raises(InputError, match="^control_image: ControlNet is not enabled on this server.*CONTROLNET=1"):
        run(prompt="x", mode="lcm-lora-sd15", width=SIZE, height=SIZE, control_image=photo)
    with pytest.raises(InputError, match="^control_image: mode sd-turbo has no ControlNet"):
        run(prompt="x", mode="sd-turbo", width=SIZE, height=SIZE, control_image=photo)
    paths, _ = run(prompt="x", mode="lcm-lora-sd15", width=SIZE, height=SIZE)
    assert len(paths) == 1


def test_batches_group_requests_with_compatible_controls(engine, photo):
    def key(**inputs):
        return batch_key(engine.request(prompt="x", mode="lcm-lora-sd15", width=SIZE, height=SIZE, **inputs))

    canny = key(control_image=photo)
    assert key(control_image=photo, control_type="scribble", seed=3) == canny  # the same net, scale and window
    assert key(control_image=photo, control_type="depth") != canny
    assert key(control_image=photo, control_scale=0.5) != canny
    assert key(control_image=photo, control_2_type="depth") != canny
    assert key() != canny


def test_a_batch_of_controlled_requests_gives_each_its_solo_images(engine, photo, tmp_path):
    from lib.engine.engine import Batch

    requests = [
        engine.request(
            prompt=p,
            mode="lcm-lora-sd15",
            width=SIZE,
            height=SIZE,
            seed=s,
            output_format="png",
            control_image=photo,
            control_type=kind,
        )  # fmt: skip
        for p, s, kind in (("a red barn", 1, "canny"), ("a blue sea", 2, "scribble"))
    ]
    solo = []
    for k, r in enumerate(requests):
        (tmp_path / f"solo{k}").mkdir()
        solo += [np.asarray(Image.open(o.path), dtype=np.int16) for o in engine.run(r, tmp_path / f"solo{k}")]
    (tmp_path / "batch").mkdir()
    jobs = [engine.job(r, tmp_path / "batch") for r in requests]
    batch = Batch(engine, jobs)
    outputs = [o for chunk in batch.generate() for _, o in batch.finish(chunk)] + [o for _, o in batch.end()]
    together = [np.asarray(Image.open(o.path), dtype=np.int16) for o in outputs]
    assert len(together) == 2
    assert max(np.abs(a - b).max() for a, b in zip(solo, together, strict=True)) <= TOLERANCE


def test_control_pipelines_share_the_modes_modules_and_keep_their_dtypes(engine, tiny_weights):
    for name in control_modes():
        loaded = engine.modes[name]
        pipe = loaded.control_pipeline(("canny", "depth"), img2img=False)
        assert pipe.unet is loaded.txt2img.unet and pipe.vae is loaded.txt2img.vae
        assert list(pipe.controlnet.nets) == [loaded.controlnets["canny"], loaded.controlnets["depth"]]
        assert loaded.control_pipeline(("canny", "depth"), img2img=False) is pipe  # built once
    sdxl = engine.modes["sdxl-turbo"].controlnets
    assert sdxl["canny"] is engine.modes["lcm-lora-sdxl"].controlnets["canny"]  # the same files: loaded once
    assert sdxl["canny"] is not sdxl["depth"]

    from lib.engine.loading import load_modes

    [half] = load_modes(tiny_weights, ["sdxl-turbo"], torch.device("cpu"), torch.float16, controlnet=True).values()
    pipe = half.control_pipeline(("canny",), img2img=True)  # no cast of the shared modules, unlike from_pipe's
    assert (half.txt2img.unet.dtype, half.txt2img.vae.dtype, pipe.controlnet.dtype) == (
        torch.float16,
        torch.float32,  # the SDXL VAE's config forces an upcast
        torch.float16,
    )


def test_the_memory_plan_counts_the_controlnets_and_the_depth_estimator(tiny_weights):
    from lib.engine.engine import plan_memory
    from lib.engine.loading import ComponentLoader
    from lib.engine.memory import file_bytes

    names = ["sdxl-turbo", "lcm-lora-sdxl", "sd-turbo"]
    loader = ComponentLoader(torch.device("cpu"), torch.float16)
    without = plan_memory(loader, tiny_weights, names, False)
    planned = plan_memory(loader, tiny_weights, names, False, controlnet=True)
    assert planned.mode_modules["sd-turbo"] == without.mode_modules["sd-turbo"]
    extra = planned.mode_modules["sdxl-turbo"] - without.mode_modules["sdxl-turbo"]
    assert len(extra) == 2 and extra == planned.mode_modules["lcm-lora-sdxl"] - without.mode_modules["lcm-lora-sdxl"]
    assert planned.always == {"depth_estimator"}
    cn_bytes = sum(
        file_bytes(next((tiny_weights / r.repo_id).glob("*.safetensors")), torch.float16)
        for r in MODES["sdxl-turbo"].controlnets.repos
    )
    depth_bytes = file_bytes(tiny_weights / DEPTH_ANYTHING.repo_id / "model.safetensors", torch.float16)
    assert planned.weights(["sdxl-turbo"]) == without.weights(["sdxl-turbo"]) + cn_bytes + depth_bytes


def test_the_fast_path_covers_the_controlnets(engine, tiny_weights, photo, tmp_path):
    """Fused QKV and channels_last reach the ControlNets (the SD 1.5 ones have attention) and keep the images."""
    from lib.engine import speed
    from lib.engine.loading import load_modes

    cpu = torch.device("cpu")
    fast = Engine(load_modes(tiny_weights, ["lcm-lora-sd15"], cpu, torch.float32, controlnet=True), cpu, torch.float32)
    switches = {"SPEED": "0", "SPEED_FUSE_QKV": "1", "SPEED_CHANNELS_LAST": "1"}
    speed.optimize(fast, speed.Switches.from_env(cpu, switches))
    nets = fast.modes["lcm-lora-sd15"].controlnets.values()
    layers = sum(len(net.attn_processors) for net in nets)
    assert layers and fast.speed["attention"]["ControlNetModel"] == {"FusedAttnProcessor2_0": layers}
    fused = [m for net in nets for m in net.modules() if getattr(m, "fused_projections", False)]
    assert fused and not any(hasattr(m, "to_k") for m in fused)  # the separate projections are dropped
    inputs = dict(mode="lcm-lora-sd15", control_image=photo, control_2_type="depth")
    fast.depth = engine.depth
    (tmp_path / "fast").mkdir()
    got, _ = run_engine(fast, tmp_path / "fast", **inputs)
    plain, _ = run_engine(engine, tmp_path, **inputs)
    assert np.abs(got - plain).max() <= TOLERANCE


def test_the_warm_up_records_graphs_for_one_and_two_controlnets(tiny_weights, photo, tmp_path):
    """With graphs on, setup's warm-up runs the one- and the two-control paths: both ControlNets have their graphs
    before a request, and a two-control request replays them with the images of the models as loaded."""
    from lib.engine import controls, graphs, speed
    from lib.engine.loading import load_modes

    cpu = torch.device("cpu")
    modes = load_modes(tiny_weights, ["lcm-lora-sd15"], cpu, torch.float32, controlnet=True)
    fast = Engine(modes, cpu, torch.float32)
    fast.depth = controls.DepthEstimator.load(tiny_weights, cpu, torch.float32)
    switches = speed.Switches.from_env(
        cpu, {"SPEED_CUDA_GRAPHS": "unet", "SPEED_GRAPH_BATCHES": "1", "SPEED_WARMUP": "1"}
    )
    speed.optimize(fast, switches)
    fast.warm_up()
    nets = fast.modes["lcm-lora-sd15"].controlnets
    assert set(nets) == {"canny", "depth"}
    for net, module in nets.items():
        assert graphs.installed(module).entries, f"the {net} ControlNet has no recorded graph"
    inputs = dict(mode="lcm-lora-sd15", control_image=photo, control_2_type="depth")
    got, _ = run_engine(fast, tmp_path, **inputs)
    with graphs.eager():
        (tmp_path / "eager").mkdir()
        plain, _ = run_engine(fast, tmp_path / "eager", **inputs)
    assert np.abs(got - plain).max() <= TOLERANCE
