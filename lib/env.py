"""On/off values, parsed one way everywhere: environment switches and boolean inputs given as text."""

from __future__ import annotations

import os

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
ALLOWED = "true or false (also 1/0, yes/no, on/off, in any case)"


def parse_bool(name: str, text: str) -> bool:
    """`text` as a boolean; anything but the words above is a ValueError naming `name`."""
    value = text.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"{name}: {text!r} is not true or false; allowed: {ALLOWED}")


def env_flag(name: str, default: bool, env=os.environ) -> bool:
    """The switch `name`: unset or empty gives `default`; otherwise parse_bool's words, else an error."""
    value = env.get(name, "").strip()
    return default if not value else parse_bool(name, value)
