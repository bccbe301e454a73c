"""Every invalid input fails with a clear error naming the input, and the predictor keeps working."""

import pytest

from lib.engine.inputs import InputError
from lib.engine.modes import MODES


def mode_limit_cases(names=tuple(MODES)):
    """Each limit of each mode (of `names`): steps just outside the range, guidance just outside what is allowed."""
    for m in (MODES[name] for name in names):
        lo, hi = m.steps.range
        yield pytest.param(
            dict(mode=m.name, num_inference_steps=lo - 1), "num_inference_steps", id=f"{m.name}-steps-low"
        )
        yield pytest.param(
            dict(mode=m.name, num_inference_steps=hi + 1), "num_inference_steps", id=f"{m.name}-steps-high"
        )
        if m.guidance.range:
            g_lo, g_hi = m.guidance.range
            yield pytest.param(
                dict(mode=m.name, guidance_scale=g_hi + 0.5), "guidance_scale", id=f"{m.name}-guidance-high"
            )
            below = (g_lo + max(m.guidance.values, default=g_lo - 1)) / 2 if m.guidance.values else g_lo - 0.5
            yield pytest.param(dict(mode=m.name, guidance_scale=below), "guidance_scale", id=f"{m.name}-guidance-gap")
        else:
            yield pytest.param(dict(mode=m.name, guidance_scale=0.5), "guidance_scale", id=f"{m.name}-guidance-nonzero")
            yield pytest.param(dict(mode=m.name, guidance_scale=7.5), "guidance_scale", id=f"{m.name}-guidance-cfg")


GENERAL_CASES = [
    pytest.param(dict(prompt=""), "prompt", id="empty-prompt"),
    pytest.param(dict(prompt="   "), "prompt", id="blank-prompt"),
    pytest.param(dict(prompt="x" * 10_001), "prompt", id="prompt-too-long"),
    pytest.param(dict(mode="sd3"), "mode", id="unknown-mode"),
    pytest.param(dict(mode=["sd-turbo"]), "mode", id="mode-a-list"),  # a jobs file's JSON can carry one
    pytest.param(dict(width=260), "width", id="width-not-multiple-of-8"),
    pytest.param(dict(height=100), "height", id="height-too-small"),
    pytest.param(dict(width=4096), "width", id="width-too-large"),
    pytest.param(dict(width="wide"), "width", id="width-not-a-number"),
    pytest.param(dict(num_outputs=0), "num_outputs", id="no-outputs"),
    pytest.param(dict(num_outputs=9), "num_outputs", id="too-many-outputs"),
    pytest.param(dict(output_format="gif"), "output_format", id="bad-format"),
    pytest.param(dict(output_quality=0), "output_quality", id="quality-low"),
    pytest.param(dict(output_quality=101), "output_quality", id="quality-high"),
    pytest.param(dict(seed=-1), "seed", id="seed-negative"),
    pytest.param(dict(seed=2**32), "seed", id="seed-too-large"),
    pytest.param(dict(num_inference_steps=2.5), "num_inference_steps", id="steps-fraction"),
    pytest.param(dict(guidance_scale=float("nan")), "guidance_scale", id="guidance-nan"),
    pytest.param(dict(strength=0.0, image="@photo"), "strength", id="strength-zero"),
    pytest.param(dict(strength=1.5, image="@photo"), "strength", id="strength-above-one"),
    pytest.param(dict(image="@text"), "image", id="image-not-an-image"),
    pytest.param(dict(image="@huge"), "image", id="image-too-many-pixels"),
    pytest.param(dict(image="@truncated"), "image", id="image-truncated"),
]


@pytest.mark.parametrize("inputs, named", [*mode_limit_cases(), *GENERAL_CASES])
def test_invalid_input_is_a_clear_error(run, files, inputs, named):
    inputs = {k: files.get(v, v) if isinstance(v, str) else v for k, v in inputs.items()}
    inputs.setdefault("prompt", "a cat")
    with pytest.raises(InputError) as err:
        run(width=inputs.pop("width", 256), height=inputs.pop("height", 256), **inputs)
    message = str(err.value)
    assert message.startswith(f"{named}:"), message
    assert "allowed" in message or "not" in message, message
    if "mode" in inputs and named in ("num_inference_steps", "guidance_scale"):
        assert inputs["mode"] in message  # the error names the mode whose range was broken


def test_the_predictor_still_works_after_errors(run):
    for bad in (dict(mode="nope"), dict(num_outputs=99), dict(mode="sd-turbo", guidance_scale=3)):
        with pytest.raises(InputError):
            run(prompt="x", **bad)
    paths, _ = run(prompt="x", mode="sd-turbo", width=256, height=256)
    assert paths[0].stat().st_size > 0
