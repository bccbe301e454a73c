"""The device and what each kind of device gets (lib/engine/devices.py, precision.py, speed.py, timeline.py), tested by
their decisions with the device kind given: no MPS device exists here, so the Apple-silicon path is checked up to the
point where torch would run on it (what a Mac does with it is not measured: docs/serving.md says so). Plus the local
scripts' Mac branch (no Docker, no GNU-only tools)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from lib import CONFIGS, ROOT
from lib.engine import devices, precision, speed
from lib.engine.devices import DeviceError
from lib.engine.loading import ComponentLoader, mode_parts
from lib.engine.modes import MODES
from lib.engine.timeline import Timeline
from lib.settings import Settings, SettingsError

CUDA, MPS, CPU = torch.device("cuda"), torch.device("mps"), torch.device("cpu")
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# -- which device ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "found, expected",
    [
        ({"cuda": True, "mps": True, "cpu": True}, "cuda"),
        ({"cuda": True, "mps": False, "cpu": True}, "cuda"),
        ({"cuda": False, "mps": True, "cpu": True}, "mps"),
        ({"cuda": False, "mps": False, "cpu": True}, "cpu"),
    ],
)
def test_without_a_setting_cuda_then_mps_then_the_cpu(found, expected):
    assert devices.choose(None, found) == (torch.device(expected), "the first available of cuda, mps, cpu")


def test_the_setting_comes_first_and_must_be_a_device_this_machine_has():
    everything = {"cuda": True, "mps": True, "cpu": True}
    assert devices.choose("cpu", everything) == (CPU, "MODEL_DEVICE")
    assert devices.choose("cuda:1", everything) == (torch.device("cuda:1"), "MODEL_DEVICE")
    with pytest.raises(DeviceError, match=r"MODEL_DEVICE: 'mps' is not available on this machine \(.*Apple silicon"):
        devices.choose("mps", {"cuda": True, "mps": False, "cpu": True})
    with pytest.raises(DeviceError, match=r"MODEL_DEVICE: 'cuda' is not available .*no CUDA GPU"):
        devices.choose("cuda", {"cuda": False, "mps": True, "cpu": True})
    assert Settings({"MODEL_DEVICE": " MPS "}).model_device == "mps"
    with pytest.raises(SettingsError, match=r"MODEL_DEVICE: 'gpu' is not a device; allowed: cuda, cuda:N, mps, cpu"):
        Settings({"MODEL_DEVICE": "gpu"}).check()


def test_setup_reports_the_device_and_fails_at_once_on_one_it_lacks(monkeypatch, tiny_weights, caplog):
    from lib.engine.engine import Engine

    monkeypatch.setattr(devices, "available", lambda: {"cuda": False, "mps": False, "cpu": True})
    monkeypatch.delenv("MODEL_DEVICE", raising=False)
    monkeypatch.setenv("SAFETY_CHECKER", "0")
    with caplog.at_level(logging.INFO, logger="lib.engine.engine"):
        Engine.load(tiny_weights, ("sd-turbo",))
    assert "device cpu (" in caplog.text and "chosen by the first available of cuda, mps, cpu" in caplog.text
    # A Mac's setting on a machine without MPS: refused before any download (the Hub is not even asked).
    monkeypatch.setenv("MODEL_DEVICE", "mps")
    monkeypatch.setenv("WEIGHTS_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WEIGHTS_DIR", str(tiny_weights.parent / "never-written"))
    monkeypatch.delenv("WEIGHTS_OFFLINE", raising=False)
    with pytest.raises(DeviceError, match="MODEL_DEVICE: 'mps' is not available"):
        Engine.from_env()
    assert not (tiny_weights.parent / "never-written").exists()


# -- which dtypes ----------------------------------------------------------------------------------------------------
def config(repo_path: str) -> dict:
    return json.loads((CONFIGS / repo_path).read_text())


SDXL_VAE = "stabilityai/stable-diffusion-xl-base-1.0/vae/config.json"
SD15_VAE = "stable-diffusion-v1-5/stable-diffusion-v1-5/vae/config.json"
TAESDXL = "madebyollin/taesdxl/config.json"


@pytest.mark.parametrize(
    "device, capability, requested, model, sdxl_vae, sd15_vae",
    [
        (CPU, None, None, F32, F32, F32),
        (CUDA, (9, 0), None, F16, BF16, F16),  # bf16 native: the SDXL VAE's upcast at half fp32's bytes
        (CUDA, (7, 5), None, F16, F32, F16),  # a T4: no native bf16
        (MPS, None, None, F16, F32, F16),  # fp16 SDXL VAEs go black / NaN on Apple GPUs: fp32
        (MPS, None, "float32", F32, F32, F32),
    ],
    ids=["cpu", "cuda-hopper", "cuda-t4", "mps", "mps-float32"],
)
def test_dtypes_per_device_kind(device, capability, requested, model, sdxl_vae, sd15_vae):
    dtypes = precision.choose(device, capability, requested)
    assert dtypes.model == model
    switches = speed.Switches.from_env(device, {})
    assert speed.vae_dtype(config(SDXL_VAE), switches, dtypes, model) == sdxl_vae
    assert speed.vae_dtype(config(SD15_VAE), switches, dtypes, model) == sd15_vae
    assert speed.vae_dtype(config(TAESDXL), switches, dtypes, model) == model  # TAESDXL is fp16-safe


def test_on_mps_the_loader_would_build_an_sdxl_mode_in_fp16_with_its_vae_in_fp32(tiny_weights):
    """What Engine.load gives the loader on a Mac, asked what each module of an SDXL mode is loaded in (nothing is
    moved to the device by asking)."""
    dtypes = precision.choose(MPS)
    switches = speed.Switches.from_env(MPS, {})
    loader = ComponentLoader(MPS, dtypes.model, vae_dtype=lambda c: speed.vae_dtype(c, switches, dtypes, dtypes.model))
    parts = mode_parts(loader, tiny_weights, MODES["sdxl-lightning-4step"])
    assert {name: loader.dtype_of(p) for name, p in parts.items()} == {
        "text_encoder": F16,
        "text_encoder_2": F16,
        "unet": F16,
        "vae": F32,
        "taesd": F16,
    }


# -- the fast path -----------------------------------------------------------------------------------------------------
CUDA_ASKS = {
    "SPEED_TF32": "1",
    "SPEED_CUDNN_BENCHMARK": "1",
    "SPEED_CUDA_GRAPHS": "1",
    "SPEED_COMPILE_MODE": "max-autotune-no-cudagraphs",
}


def test_on_mps_what_only_cuda_has_is_off_with_one_line_in_the_log(caplog):
    with caplog.at_level(logging.INFO, logger="lib.engine.speed"):
        asked = speed.Switches.from_env(MPS, CUDA_ASKS)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("fast path on mps: CUDA graphs, TF32, cuDNN autotuning")
    assert (
        "asked for and turned off: SPEED_TF32=1, SPEED_CUDNN_BENCHMARK=1, SPEED_CUDA_GRAPHS=unet,vae,text" in lines[0]
    )
    assert "SPEED_COMPILE_MODE=max-autotune-no-cudagraphs" in lines[0]
    assert (asked.tf32, asked.cudnn_benchmark, asked.cuda_graphs) == (False, False, ())
    assert asked.compile == () and asked.compile_mode == "default"
    assert asked.sdpa  # SDPA, never sliced attention (NaN in SDXL on MPS)
    assert speed.Switches.from_env(MPS, {}) == speed.Switches.from_env(CPU, {})  # the defaults: the CPU's
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lib.engine.speed"):  # CUDA keeps what it is asked for, silently
        on_cuda = speed.Switches.from_env(CUDA, CUDA_ASKS)
    assert (on_cuda.tf32, on_cuda.cudnn_benchmark, on_cuda.cuda_graphs) == (True, True, speed.COMPILE_TARGETS)
    assert on_cuda.compile_mode == "max-autotune-no-cudagraphs" and not caplog.records
    assert speed.Switches.from_env(CUDA, {}).tf32 and speed.Switches.from_env(CUDA, {}).channels_last


def test_on_mps_timings_wait_for_the_device_before_reading_the_clock(monkeypatch):
    waits = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waits.append(1))
    timeline = Timeline(MPS)
    start, end = timeline.mark(), timeline.mark()
    assert len(waits) == 2 and isinstance(start, float) and timeline.seconds(start, end) >= 0
    assert timeline.done(end)
    Timeline(CPU).mark()
    assert len(waits) == 2  # the CPU has nothing to wait for


def test_memory_is_read_with_mps_own_counters(monkeypatch):
    from lib.bench.device import peak_memory_gb

    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 5_210_000_000)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 6_000_000_000)
    assert devices.memory(MPS) == {"allocated": 5_210_000_000, "driver": 6_000_000_000}
    assert devices.memory_line(MPS) == "5.21 GB allocated, 6.00 GB driver"
    assert peak_memory_gb(MPS) == round(6e9 / 2**30, 2)
    assert devices.memory(CPU) == {}


def test_on_mps_the_memory_plan_keeps_every_mode_in_its_unified_memory(tiny_weights, monkeypatch):
    from lib.engine.engine import plan_memory

    monkeypatch.delenv("DEVICE_MEMORY_BUDGET", raising=False)
    plan = plan_memory(ComponentLoader(MPS, F16), tiny_weights, ("sd-turbo", "sdxl-lightning-4step"), False)
    assert plan.budget is None and plan.resident == ("sd-turbo", "sdxl-lightning-4step")
    assert "no limit on mps (unified memory)" in plan.describe()


# -- the local scripts on a Mac --------------------------------------------------------------------------------------
def fake_tools(folder: Path, system: str) -> dict:
    """A PATH whose `uname -s` says `system`, with `cog` and `docker` that record being called (a Mac with Docker
    Desktop and the cog CLI installed) and no `sha256sum` (macOS has `shasum`)."""
    folder.mkdir()
    (folder / "uname").write_text(f"#!/bin/sh\necho {system}\n")
    for tool in ("cog", "docker"):
        (folder / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{folder}/called"\n')
    for tool in folder.iterdir():
        tool.chmod(0o755)
    keep = [p for p in os.environ["PATH"].split(os.pathsep) if p]
    hidden = folder / "no-sha256sum"
    hidden.mkdir()
    for p in keep:  # every tool of the real PATH but sha256sum, linked into one folder
        for tool in Path(p).glob("*") if Path(p).is_dir() else ():
            target = hidden / tool.name
            if tool.name not in ("sha256sum", "uname", "cog", "docker") and not target.exists():
                target.symlink_to(tool)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{hidden}"}


@pytest.mark.parametrize("system", ["Darwin", "Linux"])
def test_predict_sh_runs_in_process_on_a_mac_and_through_cog_elsewhere(tmp_path, system):
    env = fake_tools(tmp_path / "bin", system)
    env.update(WEIGHTS_DIR=str(tmp_path / "weights"), WEIGHTS_OFFLINE="1", ENABLED_MODES="sd-turbo")
    r = subprocess.run(
        ["scripts/predict.sh", "-i", "prompt=x", "-i", "mode=sd-turbo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    called = (tmp_path / "bin" / "called").read_text() if (tmp_path / "bin" / "called").exists() else ""
    if system == "Linux":  # Docker and cog present: `cog predict`
        assert r.returncode == 0 and "cog predict -i prompt=x -i mode=sd-turbo" in called, (called, r.stderr)
    else:  # a Mac: Docker has no Apple GPU, so in-process (here: setup fails on the empty weights folder, as it says)
        assert "cog" not in called, called
        assert r.returncode == 1 and "setup failed: weights missing" in r.stderr, r.stderr[-2000:]
        assert "command not found" not in r.stderr  # no GNU-only tool was needed (setup_env.sh used shasum)


def test_decoded_pixels_leave_a_device_without_pinned_memory_as_a_plain_host_copy():
    """decoding.to_host: CUDA copies into pinned memory asynchronously; from any other device (MPS) the pixels must
    still reach the host, where PIL reads them (a tensor on MPS has no .numpy())."""
    from lib.engine import decoding

    class OnMps:  # what to_host sees of the decoded pixels on an MPS device
        device = MPS

        def cpu(self):
            return torch.full((1, 8, 8, 3), 7, dtype=torch.uint8)

    host = decoding.to_host(OnMps())
    assert host.device == CPU and [image.getpixel((0, 0)) for image in decoding.to_images(host)] == [(7, 7, 7)]
    pixels = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    assert decoding.to_host(pixels) is pixels  # already on the host: no copy
