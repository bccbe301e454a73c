"""On/off switches read from the environment, parsed one way everywhere."""

from __future__ import annotations

import os

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str, default: bool, env=os.environ) -> bool:
    """The switch `name`: unset or empty gives `default`; anything but 1/0, true/false, yes/no, on/off is an error."""
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"{name}: {value!r} is not a switch; allowed: 1 or 0 (true/false, yes/no, on/off)")
