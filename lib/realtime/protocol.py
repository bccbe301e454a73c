"""The realtime WebSocket protocol: what a page may send, how it is checked, and what the server sends back.

The page sends inputs, and the server numbers every message it receives 1, 2, 3, ... in arrival order (a
WebSocket is ordered, so the page counts its own sends the same way); a frame names the input it answers.
- text: a JSON object of settings, any of PARAMS (the prediction inputs' names), merged into the session's;
- binary: a picture (JPEG, PNG or WebP) for img2img: the painting or a webcam frame.
The server sends text JSON messages (`hello` at the start; `frame`, `error`, `flagged`) and each frame's image
as one binary message (REALTIME_FRAME_FORMAT) right after its `frame` message.
"""

from __future__ import annotations

import io
import time

from PIL import Image, UnidentifiedImageError

from lib.engine import inputs
from lib.engine.images import INPUT_FORMATS
from lib.engine.inputs import InputError, Request, resolve_request
from lib.engine.modes import DEFAULT_MODE, MODES, NON_COMMERCIAL
from lib.jsontext import json_object

MAX_TEXT_BYTES = 64 * 1024  # settings are small: a prompt is at most inputs.MAX_PROMPT_CHARS characters
PICTURE_FORMATS = INPUT_FORMATS  # as the img2img input of a prediction
MAX_PICTURE_PIXELS = 2048 * 2048
FRAME_TYPES = {"jpg": "image/jpeg", "webp": "image/webp"}

# The settings a page may send, with their defaults (a session starts from these).
PARAMS = {
    "prompt": "",
    "mode": None,  # the first enabled mode, or the default mode where it is enabled
    "num_inference_steps": None,  # the mode's default
    "strength": 0.5,
    "seed": 0,
    "fast_decode": True,  # TAESD / TAESDXL for the img2img encode and the decode, where the mode has one
    "img2img": False,  # frames from the latest picture (painting, webcam) rather than from the prompt alone
    # With img2img: "none" starts each frame from the picture; a kind of control (REALTIME_CONTROLS) makes the picture
    # guide the mode's ControlNet instead (its painted lines as the layout), the frame starting from noise.
    "control": "none",
}
# The kinds of control the page offers for its picture (where the server runs with CONTROLNET=1 and the mode has them).
REALTIME_CONTROLS = ("scribble", "canny", "depth")


def first_mode(enabled: tuple[str, ...]) -> str:
    return DEFAULT_MODE if DEFAULT_MODE in enabled else enabled[0]


def defaults(enabled: tuple[str, ...]) -> dict:
    """The settings a session starts from."""
    return {**PARAMS, "mode": first_mode(enabled)}


def is_empty(prompt) -> bool:
    """An empty prompt draws nothing (a prompt that is not text is an error, raised when the request is built)."""
    return isinstance(prompt, str) and not prompt.strip()


def hello(
    enabled: tuple[str, ...], tiny_vae: dict[str, bool], settings, safety_checker: bool, controlnet: bool = False
) -> dict:
    """The first message: what the page's controls may offer, from the mode table (enabled modes only); `controlnet`:
    whether the server loaded its ControlNets."""
    modes = []
    for name in enabled:
        m = MODES[name]
        modes.append(
            {
                "name": name,
                "title": m.title,
                "size": m.size,
                "steps": {"default": m.steps.default, "min": m.steps.range[0], "max": m.steps.range[1]},
                "fast_decode": tiny_vae[name],
                "non_commercial": m.weights.repo.licence == NON_COMMERCIAL,
                "licence": m.weights.repo.licence,
                "controls": list(REALTIME_CONTROLS) if controlnet and m.controlnets else [],
            }
        )
    lo, hi = inputs.STRENGTH_RANGE
    return {
        "type": "hello",
        "modes": modes,
        "defaults": defaults(enabled),
        "strength": {"min": lo, "max": hi},
        "seed": {"min": inputs.SEED_RANGE[0], "max": inputs.SEED_RANGE[1]},
        "frame_type": FRAME_TYPES[settings.realtime_frame_format],
        "limits": {
            "max_message_bytes": settings.realtime_max_message_bytes,
            "messages_per_second": settings.realtime_messages_per_second,
        },
        "safety_checker": safety_checker,
    }


def parse_settings(text: str) -> dict:
    """A text message -> the settings it changes (types are checked when the request is built)."""
    if len(text.encode()) > MAX_TEXT_BYTES:
        raise InputError(f"message: {len(text.encode())} bytes of text is too long; allowed: up to {MAX_TEXT_BYTES}")
    try:
        changes = json_object(text)
    except ValueError as e:
        raise InputError(f"message: {e}; send a JSON object of settings: {', '.join(PARAMS)}") from None
    unknown = [k for k in changes if k not in PARAMS]
    if unknown:
        raise InputError(f"message: unknown setting(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(PARAMS)}")
    return changes


def build_request(
    params: dict, enabled: tuple[str, ...], frame_format: str, quality: int, controlnet: bool = False
) -> Request | None:
    """The frame's request at the mode's fixed size, or None while the prompt is empty (nothing to draw; the other
    settings are checked all the same). With img2img and a control, the picture guides the ControlNet (Engine.job's
    `control_pictures`) and the frame is text-to-image."""
    prompt = params["prompt"]
    empty = is_empty(prompt)
    mode = params["mode"] or first_mode(enabled)
    size = inputs.resolve_mode(mode, enabled).size
    img2img = params["img2img"]
    if not isinstance(img2img, bool):
        raise InputError(f"img2img: {img2img!r} is not true or false")
    control = params.get("control", "none")  # a caller of its own (the benchmark) may leave it out
    if control != "none" and control not in REALTIME_CONTROLS:
        raise InputError(f"control: {control!r} is not allowed; allowed: none, {', '.join(REALTIME_CONTROLS)}")
    guided = img2img and control != "none"
    fast = params["fast_decode"]
    request = resolve_request(
        enabled=enabled,
        prompt="-" if empty else prompt,
        mode=mode,
        width=size,
        height=size,
        num_inference_steps=params["num_inference_steps"],
        seed=params["seed"],
        image_size=(size, size) if img2img and not guided else None,
        controls=[{"name": "control", "kind": control, "size": (size, size)}] if guided else (),
        controlnet=controlnet,
        strength=params["strength"],
        output_format=frame_format,
        output_quality=quality,
        fast_decode=fast,
        fast_encode=fast if img2img and not guided else False,
    )
    return None if empty else request


def _open_picture(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=PICTURE_FORMATS)
    except (UnidentifiedImageError, OSError):
        raise InputError(f"picture: {len(data):,} bytes that are not a JPEG, PNG or WebP image") from None
    w, h = image.size
    if w * h > MAX_PICTURE_PIXELS:
        raise InputError(f"picture: {w}x{h} is too large; allowed: up to {MAX_PICTURE_PIXELS:,} pixels")
    return image


def check_picture(data: bytes) -> None:
    """A binary message's format and size, from its header alone (cheap enough for the event loop)."""
    _open_picture(data)


def decode_picture(data: bytes) -> Image.Image:
    """A binary message -> an RGB picture (checked as check_picture does first)."""
    image = _open_picture(data)
    try:
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt pixel data
        raise InputError(f"picture: could not be decoded ({e})") from None


class RateLimit:
    """A token bucket: `rate` messages a second on average, bursts of up to `rate`."""

    def __init__(self, rate: int, clock=time.monotonic):
        self.rate, self.clock = rate, clock
        self.tokens, self.at = float(rate), clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
