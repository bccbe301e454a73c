"""Shared fixtures: tiny random weights in the real Hub layout, and a Predictor set up on them."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from lib.testkit.environment import environment

# Same thread count everywhere: a different one can change the last bits of CPU results.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from lib.testkit.models import write_weights

    out = tmp_path_factory.mktemp("tiny-weights")
    write_weights(out)
    return out


@pytest.fixture(scope="session")
def predictor(tiny_weights):
    """The project's Predictor after setup() on the tiny weights, every mode enabled (the opt-in ones too)."""
    from lib.engine.modes import MODES
    from predict import Predictor

    # the tiny files are not the manifest's: WEIGHTS_OFFLINE
    with environment(WEIGHTS_DIR=str(tiny_weights), WEIGHTS_OFFLINE="1", ENABLED_MODES=",".join(MODES)):
        p = Predictor()
        p.setup()
    return p


@pytest.fixture
def run(predictor):
    """run(**inputs) -> (list of output paths, metrics dict), through Predictor.run like Cog calls it."""
    from lib.local import collect, recording, run_inputs

    def _run(**inputs):
        with recording(predictor) as metrics:
            paths = collect(predictor, **run_inputs(predictor, **inputs))
        return paths, metrics

    return _run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad image inputs, by the name the invalid-input cases give them."""
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "notes.txt").write_text("not an image")
    Image.new("L", (5000, 4000)).save(d / "huge.png")  # 20 MP, a few KB on disk
    Image.new("RGB", (300, 300), "red").save(d / "photo.png")
    (d / "truncated.png").write_bytes((d / "photo.png").read_bytes()[:200])
    return {
        "@text": d / "notes.txt",
        "@huge": d / "huge.png",
        "@photo": d / "photo.png",
        "@truncated": d / "truncated.png",
    }


# Modes with different step limits for the page's controls (SDXL-Lightning's: one allowed value).
REALTIME_MODES = "sd-turbo,lcm,sdxl-lightning-4step"
REALTIME_MAX_MESSAGE = 512 * 1024
REALTIME_RATE = 40


@pytest.fixture(scope="session")
def realtime_server(tiny_weights, tmp_path_factory):
    """The realtime server as users start it (scripts/realtime.py), on the tiny weights; shared by the session."""
    from lib.testkit.realtime import RealtimeServer

    env = {
        "WEIGHTS_DIR": str(tiny_weights),
        "WEIGHTS_OFFLINE": "1",
        "ENABLED_MODES": REALTIME_MODES,
        "REALTIME_MAX_MESSAGE_BYTES": str(REALTIME_MAX_MESSAGE),
        "REALTIME_MESSAGES_PER_SECOND": str(REALTIME_RATE),
        "REALTIME_TOKEN": None,
        "CONTROLNET": "1",  # lcm has ControlNets, sd-turbo none: the page offers controls for one mode only
    }
    with RealtimeServer(tmp_path_factory.mktemp("realtime"), env) as server:
        yield server
