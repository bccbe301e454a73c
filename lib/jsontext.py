"""JSON objects from untrusted text (a jobs file's lines, the realtime page's messages), one way."""

from __future__ import annotations

import json


def json_object(text: str) -> dict:
    """`text` as a JSON object; otherwise a ValueError that says what it is instead."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{type(value).__name__} is not a JSON object")
    return value
