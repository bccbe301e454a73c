"""setup(): loading from the weights directory, sharing identical modules, and its errors."""

import shutil

import pytest
import torch

from lib.engine.engine import Engine
from lib.engine.inputs import InputError
from lib.engine.loading import WeightsMissingError, load_modes
from lib.engine.modes import MODES
from lib.settings import Settings


def storage(module):
    return {name: p.data_ptr() for name, p in module.named_parameters()}


def test_identical_files_are_loaded_once(predictor):
    modes = predictor.engine.modes
    turbo, base = modes["sdxl-turbo"].txt2img, modes["lcm-lora-sdxl"].txt2img
    assert turbo.text_encoder is base.text_encoder
    assert turbo.text_encoder_2 is base.text_encoder_2
    assert storage(turbo.text_encoder_2) == storage(base.text_encoder_2)
    # Different files stay different modules.
    assert turbo.unet is not base.unet and turbo.vae is not base.vae
    assert set(storage(turbo.unet).values()).isdisjoint(storage(base.unet).values())


@pytest.mark.parametrize("mode", list(MODES))
def test_img2img_shares_the_txt2img_modules(predictor, mode):
    loaded = predictor.engine.modes[mode]
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        assert getattr(loaded.img2img, name) is getattr(loaded.txt2img, name)
    assert storage(loaded.img2img.unet) == storage(loaded.txt2img.unet)


def test_lcm_lora_is_fused_without_adapter_layers(predictor, tiny_weights):
    unet = predictor.engine.modes["lcm-lora-sd15"].txt2img.unet
    assert not any("lora" in name for name, _ in unet.named_modules())
    plain = load_modes(tiny_weights, ("lcm-lora-sd15",), torch.device("cpu"), torch.float32)
    # load_modes fuses too; compare with the raw file to prove the fused weights differ from the base.
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(
        tiny_weights / "stable-diffusion-v1-5/stable-diffusion-v1-5",
        subfolder="unet",
        variant="fp16",
        dtype=torch.float32,
    )
    fused, original = dict(unet.named_parameters()), dict(base.named_parameters())
    changed = [n for n in original if not torch.equal(fused[n], original[n])]
    assert any("to_q" in n for n in changed) and any("conv1" in n for n in changed)
    assert torch.equal(dict(plain["lcm-lora-sd15"].txt2img.unet.named_parameters())[changed[0]], fused[changed[0]])


def test_missing_weights_name_what_and_where(tmp_path, tiny_weights):
    shutil.copytree(tiny_weights / "stabilityai/sd-turbo", tmp_path / "stabilityai/sd-turbo")
    (tmp_path / "stabilityai/sd-turbo/unet/diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(WeightsMissingError) as err:
        Engine.load(tmp_path, ("sd-turbo",))
    message = str(err.value)
    assert "stabilityai/sd-turbo/unet/diffusion_pytorch_model.fp16.safetensors" in message
    assert str(tmp_path) in message and "make_tiny_weights" in message


def test_only_enabled_modes_load_and_others_are_refused(tiny_weights):
    engine = Engine.load(tiny_weights, ("sd-turbo",))
    assert set(engine.modes) == {"sd-turbo"}
    with pytest.raises(InputError, match="mode: 'lcm' is not enabled"):
        engine.request(prompt="x", mode="lcm")


def test_enabled_modes_env(monkeypatch):
    monkeypatch.setenv("ENABLED_MODES", "sd-turbo, lcm")
    assert Settings().enabled_modes == ("sd-turbo", "lcm")
    monkeypatch.setenv("ENABLED_MODES", "sd-turbo,dalle")
    with pytest.raises(ValueError, match="ENABLED_MODES: dalle"):
        Settings().check()
