"""Shared fixtures: tiny random weights in the real Hub layout, and a Predictor set up on them."""

from pathlib import Path

import pytest
import torch

from lib.testkit.environment import environment


# Same thread count everywhere: a different one can change the last bits of CPU results.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from lib.testkit.tiny import write_tiny_weights

    out = tmp_path_factory.mktemp("tiny-weights")
    write_tiny_weights(out)
    return out


@pytest.fixture(scope="session")
def predictor(tiny_weights):
    """The project's Predictor after setup() on the tiny weights, every mode enabled."""
    from predict import Predictor

    # the tiny files are not the manifest's: WEIGHTS_OFFLINE
    with environment(WEIGHTS_DIR=str(tiny_weights), WEIGHTS_OFFLINE="1", ENABLED_MODES=None):
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
