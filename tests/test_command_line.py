"""Inputs given on the command line (`scripts/predict.sh -i name=value`) keep their meaning: each is parsed by the
type the Predictor declares for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib import cog_inputs
from lib.engine.images import read_settings
from lib.engine.inputs import InputError
from lib.local import collect, recording, run_inputs

ROOT = Path(__file__).resolve().parent.parent
BASE = {"prompt": "a red fox", "mode": "sd-turbo", "width": "256", "height": "256", "seed": "5"}


def run_raw(predictor, **raw):
    with recording(predictor) as metrics:
        return collect(predictor, **run_inputs(predictor, {**BASE, **raw})), metrics


@pytest.mark.parametrize(
    "text, on",
    [
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("true", True),
        ("True", True),
        ("1", True),
        ("YES", True),
    ],
)
def test_booleans_mean_what_they_say(predictor, text, on):
    paths, metrics = run_raw(predictor, disable_safety_checker=text, fast_decode=text)
    assert read_settings(paths[0])["fast_decode"] is on
    # The safety checker ran unless it was disabled: its metrics say so.
    assert ("nsfw_flagged" in metrics) is (not on), metrics


def test_numbers_are_parsed_as_their_declared_type(predictor):
    paths, _ = run_raw(predictor, num_outputs="2", guidance_scale="0.0", strength="0.5", output_quality="90")
    assert len(paths) == 2 and read_settings(paths[0])["seed"] == 5 and read_settings(paths[1])["seed"] == 6


def test_an_image_is_a_local_file_or_a_data_uri(predictor, files):
    """`-i image=@photo.png` (or the bare path) reads the local file and sends it as a data URI, as `cog predict`
    does; a data URI or URL is sent as it is."""
    photo = files["@photo"]
    for text in (f"@{photo}", str(photo), cog_inputs.data_uri(photo)):
        paths, metrics = run_raw(predictor, image=text, strength="0.6")
        assert read_settings(paths[0])["strength"] == 0.6 and "timings.vae_encode" in metrics


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("fast_decode", "maybe", "fast_decode: 'maybe' is not true or false"),
        ("disable_safety_checker", "", "disable_safety_checker: '' is not true or false"),
        ("width", "wide", "width: 'wide' is not a whole number"),
        ("seed", "1.5", "seed: '1.5' is not a whole number"),
        ("guidance_scale", "lots", "guidance_scale: 'lots' is not a number"),
        ("strength", "nan", "strength: 'nan' is not a finite number"),
    ],
)
def test_anything_else_is_an_error_naming_the_input(predictor, name, text, says):
    with pytest.raises(InputError) as err:
        run_inputs(predictor, {**BASE, name: text})
    assert says in str(err.value) and ("allowed: true or false" in str(err.value)) == (
        name in ("fast_decode", "disable_safety_checker")
    )


def test_the_script_refuses_a_bad_value_before_setup(tmp_path):
    env = {**os.environ, "WEIGHTS_DIR": str(tmp_path / "empty"), "WEIGHTS_OFFLINE": "1"}  # setup would fail here
    r = subprocess.run(
        [sys.executable, "-m", "lib.local", "-i", "prompt=x", "-i", "fast_decode=nope"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "invalid input: fast_decode: 'nope' is not true or false" in r.stderr, r.stderr
    assert "setup failed" not in r.stderr


def test_the_readmes_snippet_reads_an_outputs_settings(predictor, tmp_path):
    """The README's Python block, run as a user would (python in the repository), on a file a prediction wrote."""
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'read_settings("outputs/out-0-1234.webp")' in snippet
    paths, _ = run_raw(predictor, output_format="webp")
    code = snippet.replace('read_settings("outputs/out-0-1234.webp")', f"print(read_settings({str(paths[0])!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "'prompt': 'a red fox'" in r.stdout and "'seed': 5" in r.stdout, r.stdout
