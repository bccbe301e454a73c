"""lib/settings.py: every environment variable declared once and read through one parser; the generated
docs/configuration.md is current; setup fails at once on a bad value, naming it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lib import ROOT
from lib.settings import Settings, SettingsError, markdown

READ = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^\]]+\](?!\s*=)")


def test_the_configuration_page_is_generated_from_the_declarations():
    assert (ROOT / "docs/configuration.md").read_text() == markdown(), (
        "regenerate it: python -m lib.settings > docs/configuration.md"
    )
    assert "docs/configuration.md" in (ROOT / "README.md").read_text()


def test_every_variable_is_declared_once_and_read_nowhere_else():
    names = [v.name for v in Settings.variables()]
    assert len(names) == len(set(names)) and len(names) > 40
    readers = []
    for path in [*ROOT.glob("lib/**/*.py"), *ROOT.glob("scripts/*.py"), ROOT / "predict.py"]:
        rel = path.relative_to(ROOT)
        if rel.parts[:2] in (("lib", "settings.py"), ("lib", "testkit")):
            continue  # the parser itself; the test kit sets up servers' environments
        readers += [f"{rel}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1) if READ.search(line)]
    assert readers == []
    source = "\n".join(p.read_text() for p in [*ROOT.glob("lib/**/*.py"), *ROOT.glob("scripts/*.py")])
    for name in names:  # and every declared variable is used somewhere
        attr = name.lower()
        assert re.search(rf"\.{attr}\b", source), f"{name} is declared but never read"


def test_defaults_types_and_one_error_naming_every_bad_variable():
    s = Settings({})
    assert s.weights_dir == ROOT / "weights" and s.lora_cache_dir == ROOT / "weights" / ".loras"
    assert s.safety_checker is True and s.weights_offline is False and s.device_memory_budget is None
    typed = Settings(
        {
            "WEIGHTS_OFFLINE": "YES",
            "DEVICE_MEMORY_BUDGET": "20GiB",
            "WEIGHTS_TIMEOUT": "2.5",
            "ENABLED_MODES": "lcm, sd-turbo",
            "SPEED_COMPILE": "1",
            "LORA_CACHE_BYTES": "1GB",
        }
    )
    assert (typed.weights_offline, typed.device_memory_budget, typed.weights_timeout) == (True, 20 * 2**30, 2.5)
    assert typed.enabled_modes == ("lcm", "sd-turbo") and typed.speed_compile == ("unet", "vae")
    assert typed.lora_cache_bytes == 10**9
    bad = Settings(
        {"WEIGHTS_OFFLINE": "maybe", "WEIGHTS_RETRIES": "0", "MODEL_DTYPE": "half", "SPEED_WEBP_METHOD": "9"}
    )
    with pytest.raises(SettingsError) as err:
        bad.check()
    msg = str(err.value)
    for part in (
        "WEIGHTS_OFFLINE: 'maybe' is not true or false",
        "WEIGHTS_RETRIES: 0 is out of range",
        "MODEL_DTYPE: 'half' is not allowed; allowed: float16, bfloat16, float32",
        "SPEED_WEBP_METHOD: 9 is out of range; allowed: 0 to 6",
    ):
        assert part in msg, msg


def test_setup_fails_at_once_on_a_bad_value(monkeypatch, tmp_path):
    from predict import Predictor

    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path))  # empty: setup would fail later, for another reason
    monkeypatch.setenv("BATCH_MAX_IMAGES", "lots")
    with pytest.raises(SettingsError, match="BATCH_MAX_IMAGES: 'lots' is not a whole number"):
        Predictor().setup()


def test_the_page_lists_every_variable():
    page = Path(ROOT / "docs/configuration.md").read_text()
    assert all(f"| `{v.name}` |" in page for v in Settings.variables())
