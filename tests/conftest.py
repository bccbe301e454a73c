"""Shared fixtures: tiny random weights in the real Hub layout, and a Predictor set up on them."""

import os
import sys
from pathlib import Path

import pytest
import torch


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

    saved = {k: os.environ.get(k) for k in ("WEIGHTS_DIR", "ENABLED_MODES", "WEIGHTS_OFFLINE")}
    os.environ["WEIGHTS_DIR"] = str(tiny_weights)
    os.environ["WEIGHTS_OFFLINE"] = "1"  # the tiny files are not the manifest's
    os.environ.pop("ENABLED_MODES", None)
    p = Predictor()
    p.setup()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return p


class Metrics(dict):
    def __call__(self, key, value, mode="replace"):
        self[key] = value


@pytest.fixture
def run(predictor):
    """run(**inputs) -> (list of output paths, metrics dict), through Predictor.run like Cog calls it."""
    from lib.local import collect, run_inputs

    def _run(**inputs):
        metrics = Metrics()
        predictor.record_metric = metrics
        try:
            paths = collect(predictor, **run_inputs(predictor, **inputs))
        finally:
            del predictor.record_metric
        return paths, metrics

    return _run
