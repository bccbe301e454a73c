"""The SDXL-Lightning modes on tiny weights: their limits and errors, the model card's own diffusers code giving the
same images, SDXL base's text encoders and VAE loaded once beside the other SDXL base modes and counted once by the
memory plan, the opt-in set, and their files pinned and verified. img2img, style LoRAs, batching, fast decode, the
safety checker and the realtime server run them through the tests of every mode (test_predictor.py and the others
name them)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from lib.engine import memory
from lib.engine.engine import plan_memory
from lib.engine.inputs import InputError, resolve_request
from lib.engine.loading import ComponentLoader
from lib.engine.modes import DEFAULT_ENABLED, MODES, SDXL_BASE, SDXL_LIGHTNING, TAESDXL, all_repos, repo_files
from lib.settings import Settings

CPU, FP32 = torch.device("cpu"), torch.float32
LIGHTNING = {"sdxl-lightning-2step": 2, "sdxl-lightning-4step": 4, "sdxl-lightning-8step": 8}
SIZE = 256


def lora_file(steps: int) -> str:
    return f"sdxl_lightning_{steps}step_lora.safetensors"  # ByteDance's names


@pytest.mark.parametrize("name, steps", LIGHTNING.items())
def test_steps_fixed_to_the_checkpoint_guidance_0_and_1024_by_default(name, steps):
    everything = tuple(MODES)
    r = resolve_request(enabled=everything, prompt="x", mode=name)
    assert (r.width, r.height, r.num_inference_steps, r.guidance_scale) == (1024, 1024, steps, 0.0)
    assert resolve_request(enabled=everything, prompt="x", mode=name, num_inference_steps=steps).num_inference_steps
    for wrong in (steps - 1, steps + 1):
        with pytest.raises(InputError) as err:
            resolve_request(enabled=everything, prompt="x", mode=name, num_inference_steps=wrong)
        assert str(err.value) == (
            f"num_inference_steps: {wrong} is not allowed for mode {name}; allowed: only {steps} "
            "(the mode's checkpoint is distilled for that many steps)"
        )
    with pytest.raises(InputError, match=rf"guidance_scale: 1.5 is not allowed for mode {name}; allowed: exactly 0$"):
        resolve_request(enabled=everything, prompt="x", mode=name, guidance_scale=1.5)
    mode = MODES[name]
    assert mode.weights.repo == SDXL_BASE and mode.weights.lora_file == lora_file(steps)
    assert mode.weights.lora.repo_id == SDXL_LIGHTNING.repo_id and mode.weights.tiny_vae == TAESDXL
    assert mode.summary == f"SDXL base + SDXL-Lightning {steps}-step LoRA: {steps} steps, no guidance, 1024px"


def test_the_4_step_mode_is_in_the_default_set_and_the_2_and_8_step_ones_are_opt_in(monkeypatch):
    monkeypatch.delenv("ENABLED_MODES", raising=False)
    enabled = Settings().enabled_modes
    assert (
        enabled
        == DEFAULT_ENABLED
        == tuple(n for n in MODES if n not in ("sdxl-lightning-2step", "sdxl-lightning-8step"))
    )
    with pytest.raises(
        InputError, match=r"mode: 'sdxl-lightning-8step' is not enabled on this server \(ENABLED_MODES\)"
    ):
        resolve_request(enabled=enabled, prompt="x", mode="sdxl-lightning-8step")
    # The default set fetches the 4-step LoRA only, beside SDXL base (which lcm-lora-sdxl needs as well).
    [lightning] = [r for r in all_repos(enabled) if r.repo_id == SDXL_LIGHTNING.repo_id]
    assert repo_files(lightning) == [lora_file(4)]
    monkeypatch.setenv("ENABLED_MODES", "sdxl-lightning-2step,sdxl-lightning-8step")
    assert Settings().enabled_modes == ("sdxl-lightning-2step", "sdxl-lightning-8step")
    [lightning] = [r for r in all_repos(Settings().enabled_modes) if r.repo_id == SDXL_LIGHTNING.repo_id]
    assert repo_files(lightning) == [lora_file(2), lora_file(8)]
    # docs/configuration.md says which modes are left out of the default.
    shown = Settings.enabled_modes.shown
    assert all((f"`{n}`" in shown) == m.opt_in for n, m in MODES.items())


# -- the model card's code -------------------------------------------------------------------------------------------
def model_card_image(tiny_weights, steps: int, seed: int, timestep_spacing="trailing") -> np.ndarray:
    """ByteDance/SDXL-Lightning's model card, "2-Step, 4-Step, 8-Step LoRA" (diffusers), on the tiny weights, in fp32
    on the CPU and at the test's size: SDXL base, the step's LoRA loaded and fused, Euler with trailing timesteps,
    guidance 0. The seed goes in as a CPU generator, as the engine draws its noise."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    base = tiny_weights / SDXL_BASE.repo_id
    pipe = StableDiffusionXLPipeline.from_pretrained(base, dtype=torch.float32, variant="fp16")
    pipe.load_lora_weights(str(tiny_weights / SDXL_LIGHTNING.repo_id / lora_file(steps)))  # hf_hub_download's path
    pipe.fuse_lora()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing=timestep_spacing)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "A girl smiling",
        num_inference_steps=steps,
        guidance_scale=0,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("name, steps", LIGHTNING.items())
def test_same_seed_same_image_as_the_model_cards_code(predictor, tiny_weights, tmp_path, name, steps):
    engine = predictor.engine
    request = engine.request(prompt="A girl smiling", mode=name, width=SIZE, height=SIZE, seed=21, output_format="png")
    [output] = engine.run(request, tmp_path)
    ours = np.asarray(Image.open(output.path).convert("RGB"), dtype=np.int16)
    card = model_card_image(tiny_weights, steps, seed=21)
    assert np.abs(ours - card).max() <= 1  # same image (float rounding may move a value by one level)
    if steps == 4:  # the comparison can tell: SDXL base's own "leading" timesteps give another image
        assert np.abs(ours - model_card_image(tiny_weights, steps, 21, timestep_spacing="leading")).max() > 10


# -- loading and memory ----------------------------------------------------------------------------------------------
def test_sdxl_bases_text_encoders_and_vae_are_one_copy_and_each_mode_fuses_its_own_unet(predictor):
    modes = predictor.engine.modes
    base = modes["lcm-lora-sdxl"]
    for name in LIGHTNING:
        pipe = modes[name].txt2img
        for component in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"):
            assert getattr(pipe, component) is getattr(base.txt2img, component), (name, component)
        assert modes[name].tiny_vae is base.tiny_vae is modes["sdxl-turbo"].tiny_vae
        assert not any("lora" in n for n, _ in pipe.unet.named_modules())  # fused, no adapter layers left
        scheduler = pipe.scheduler
        # diffusers' Euler (as the engine runs it: without a host sync, lib/engine/schedulers.py)
        assert isinstance(scheduler, EulerDiscreteScheduler) and modes[name].img2img.scheduler is scheduler
        assert (scheduler.config.timestep_spacing, scheduler.config.prediction_type) == ("trailing", "epsilon")
    assert base.txt2img.scheduler.config.timestep_spacing == "leading"  # the repo's own config, elsewhere
    unets = {n: modes[n].txt2img.unet for n in ("lcm-lora-sdxl", *LIGHTNING)}
    weight = "down_blocks.0.resnets.0.conv1.weight"
    for (a, ua), (b, ub) in itertools.combinations(unets.items(), 2):
        assert ua is not ub and not torch.equal(ua.get_parameter(weight), ub.get_parameter(weight)), (a, b)


def test_the_memory_plan_counts_the_shared_modules_once_and_one_unet_per_mode(predictor, tiny_weights):
    names = ("lcm-lora-sdxl", *LIGHTNING)
    plan = plan_memory(ComponentLoader(CPU, FP32), tiny_weights, names, safety_checker=False)
    base = plan.mode_modules["lcm-lora-sdxl"]
    unets = []
    for name in LIGHTNING:
        assert len(plan.mode_modules[name] & base) == 4  # the two text encoders, the VAE, TAESDXL
        [unet] = plan.mode_modules[name] - base
        unets.append(unet)
    assert len(set(unets)) == 3
    assert plan.weights(names) == plan.weights(["lcm-lora-sdxl"]) + sum(plan.module_bytes[u] for u in unets)
    # What the loaded modules hold (CLIP's position ids, a non-persistent buffer, are not in the files).
    modules = {id(m): m for name in names for m in predictor.engine.modes[name].modules()}
    loaded = sum(memory.module_bytes(m) for m in modules.values())
    assert 0 <= loaded - plan.weights(names) < 0.001 * plan.weights(names)


# -- the files -------------------------------------------------------------------------------------------------------
def test_every_lightning_file_is_pinned_in_the_tracked_manifest():
    from lib.weights.download import SHA256_RE
    from lib.weights.manifest import DEFAULT_MANIFEST, load_manifest

    spec = load_manifest(DEFAULT_MANIFEST)["repos"][SDXL_LIGHTNING.repo_id]
    assert sorted(spec["files"]) == [lora_file(n) for n in (2, 4, 8)]
    assert all(SHA256_RE.match(f["sha256"] or "") for f in spec["files"].values()), spec


def test_setup_fetches_only_its_own_lora_and_checks_it_against_the_pin(tmp_path, tiny_weights):
    from lib.testkit.hub import FakeHub
    from lib.weights.cache import ensure_weights
    from lib.weights.download import PinMismatch, Tuning
    from lib.weights.manifest import manifest_for_tree, write_manifest

    repos = [r.repo_id for r in all_repos(["sdxl-lightning-4step"])]
    assert repos == [SDXL_BASE.repo_id, SDXL_LIGHTNING.repo_id, TAESDXL.repo_id]
    fast = Tuning(connections=4, files=4, chunk_size=1 << 20, timeout=2.0, retries=2, backoff=0.05, progress_seconds=30)
    with FakeHub(tiny_weights, repos) as hub:
        pins = manifest_for_tree(tiny_weights)
        manifest = tmp_path / "manifest.json"
        write_manifest(manifest, {"version": 1, "repos": {r: pins["repos"][r] for r in repos}})

        def ensure(cache):
            return ensure_weights(
                ["sdxl-lightning-4step"],
                cache,
                manifest_path=manifest,
                base_url=hub.url,
                log=lambda line: None,
                tuning=fast,
                safety_checker=False,
            )

        report = ensure(tmp_path / "weights")
        assert report["files"] == sum(len(repo_files(r)) for r in all_repos(["sdxl-lightning-4step"]))
        asked = {s.path for s in hub.seen("origin")}
        assert any(p.endswith(lora_file(4)) for p in asked)
        assert not any(p.endswith((lora_file(2), lora_file(8))) for p in asked)
        # A pin the served file does not match stops setup, naming the file.
        data = manifest.read_text().replace(
            pins["repos"][SDXL_LIGHTNING.repo_id]["files"][lora_file(4)]["sha256"], "0" * 64
        )
        manifest.write_text(data)
        with pytest.raises(PinMismatch, match=rf"repo {SDXL_LIGHTNING.repo_id}, file {lora_file(4)}"):
            ensure(tmp_path / "other")
