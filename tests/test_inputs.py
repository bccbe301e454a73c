"""Input resolution against the mode table (no weights needed)."""

import pytest

from lib.engine.inputs import InputError, denoising_schedule, fit_to_area, resolve_request
from lib.engine.modes import MODES

ALL = tuple(MODES)


@pytest.mark.parametrize("mode", ALL)
def test_defaults_come_from_the_mode_table(mode):
    m = MODES[mode]
    r = resolve_request(enabled=ALL, prompt="x", mode=mode)
    assert (r.width, r.height) == (m.size, m.size)
    assert r.num_inference_steps == m.steps.default and r.guidance_scale == m.guidance.default
    assert m.steps.range[0] <= m.steps.default <= m.steps.range[1] and m.guidance.allows(m.guidance.default)


def test_random_seed_is_32_bit_and_reported():
    seeds = {resolve_request(enabled=ALL, prompt="x").seed for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)


@pytest.mark.parametrize(
    "mode, steps, strength, expected",
    [
        ("sd-turbo", 4, 1.0, (4, 4)),
        ("sd-turbo", 4, 0.5, (4, 2)),
        ("sdxl-turbo", 1, 0.5, (2, 1)),  # int(1 * 0.5) == 0: lengthened to 2 steps, the last one runs
        ("sdxl-turbo", 1, 0.02, (50, 1)),
        ("lcm-lora-sd15", 2, 0.3, (4, 1)),
        ("lcm", 4, 1.0, (4, 4)),
        ("lcm", 8, 0.1, (5, 5)),  # the LCM pipeline picks steps within int(50 * strength)
        ("lcm", 4, 0.02, (1, 1)),
    ],
)
def test_img2img_always_runs_at_least_one_step(mode, steps, strength, expected):
    assert denoising_schedule(MODES[mode], steps, strength) == expected


@pytest.mark.parametrize("strength", [0.02, 0.03, 0.07, 0.29, 0.33, 0.51, 0.99])
def test_lengthened_schedule_runs_exactly_one_step(strength):
    scheduled, runs = denoising_schedule(MODES["sdxl-turbo"], 1, strength)
    assert runs == int(scheduled * strength) >= 1


def test_fit_to_area_keeps_aspect_in_multiples_of_8():
    w, h = fit_to_area(4000, 3000, 512 * 512)
    assert (w % 8, h % 8) == (0, 0) and abs(w / h - 4 / 3) < 0.02
    assert fit_to_area(100, 10000, 512 * 512)[0] == 256  # clamped to the allowed range


def test_error_names_mode_and_range():
    with pytest.raises(InputError, match=r"num_inference_steps: 6 is not allowed for mode sdxl-turbo; allowed: 1 to 4"):
        resolve_request(enabled=ALL, prompt="x", mode="sdxl-turbo", num_inference_steps=6)
    with pytest.raises(
        InputError,
        match=r"guidance_scale: 0.5 is not allowed for mode lcm-lora-sdxl; "
        r"allowed: exactly 0 or 1 to 2",
    ):
        resolve_request(enabled=ALL, prompt="x", mode="lcm-lora-sdxl", guidance_scale=0.5)


def test_the_readme_mode_table_is_the_mode_tables():
    from lib import ROOT
    from lib.engine.modes import markdown_table

    assert markdown_table() in (ROOT / "README.md").read_text()
