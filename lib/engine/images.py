"""Image files in and out: the img2img input (checked before it is decoded) and the output files, each
carrying its generation settings as JSON in the EXIF ImageDescription tag (one reader for every format)."""

from __future__ import annotations

import functools
import io
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from lib.atomic import replacing
from lib.engine.inputs import InputError, shown
from lib.settings import Settings

MAX_INPUT_BYTES = 50 * 1024 * 1024
MAX_INPUT_PIXELS = 4096 * 4096
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_ALLOWED = (
    "a URL (https://...) or a data URI (data:image/png;base64,...) of a PNG, JPEG or WebP image, "
    f"up to {MAX_INPUT_BYTES // 2**20} MiB and 4096x4096 pixels"
)
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
EXIF_ORIENTATION = 0x0112
SOFTWARE = "fast-sd-cog"
PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def _label(path) -> str:
    """An input image as its sender gave it: the URL or data URI Cog fetched it from (lib/cog_inputs.py), else the
    file's name."""
    return shown(getattr(path, "source", None) or Path(path).name)


def input_image_size(path, name: str = "image") -> tuple[int, int]:
    """An input image's upright (width, height), from its header alone: limits are checked before any pixel is
    decoded. `name`: the input it came as (image, control_image, ...), for messages."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{name}: {shown(path)} is not a file; allowed: {IMAGE_ALLOWED}")
    try:
        size = Path(path).stat().st_size
        if size > MAX_INPUT_BYTES:
            raise InputError(
                f"{name}: {_label(path)} is {size / 2**20:.1f} MiB; allowed: up to {MAX_INPUT_BYTES // 2**20} MiB"
            )
        with Image.open(path, formats=INPUT_FORMATS) as image:
            w, h = image.size
            rotated = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except UnidentifiedImageError:
        raise InputError(f"{name}: {_label(path)} is not a PNG, JPEG or WebP image; allowed: {IMAGE_ALLOWED}") from None
    except OSError as e:
        reason = e.strerror or e
        raise InputError(f"{name}: {_label(path)} could not be read ({reason}); allowed: {IMAGE_ALLOWED}") from None
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(
            f"{name}: {_label(path)} is {w}x{h}, too large; allowed: up to {MAX_INPUT_PIXELS:,} pixels (e.g. 4096x4096)"
        )
    return (h, w) if rotated else (w, h)


def open_input_image(path, name: str = "image") -> Image.Image:
    """An input image (the img2img input, a control image) as upright RGB."""
    input_image_size(path, name)
    try:
        with Image.open(path, formats=INPUT_FORMATS) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt pixel data
        raise InputError(f"{name}: {_label(path)} could not be decoded ({e}); allowed: {IMAGE_ALLOWED}") from None


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop to exactly width x height, keeping the aspect ratio (no stretching)."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)


def _write(image: Image.Image, target, fmt: str, quality: int, settings: dict) -> None:
    """`image` as `fmt` with `settings` embedded, into `target` (a path or a binary file)."""
    exif = Image.Exif()
    # ASCII-only JSON: the EXIF ASCII type cannot carry other bytes.
    exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(settings, ensure_ascii=True, sort_keys=True)
    exif[EXIF_SOFTWARE] = SOFTWARE
    options: dict = {"exif": exif.tobytes()}
    if fmt in ("webp", "jpg"):
        options["quality"] = quality
    if fmt == "webp":
        # libwebp method 0 at 512px: 6 ms vs 25 ms for method 4 (Pillow's default), same PSNR, +12% bytes
        # (docs/benchmarks.md, "Image encoding"). SPEED_WEBP_METHOD (0-6) overrides.
        options["method"] = Settings().speed_webp_method
    if fmt == "png":
        options["compress_level"] = 1  # PNG is lossless either way; level 1 is ~5x faster than 6
    image.save(target, PIL_FORMATS[fmt], **options)


def save_image(image: Image.Image, path: Path, fmt: str, quality: int, settings: dict) -> Path:
    """Write `image` as `fmt` with `settings` embedded; returns the path written."""
    with replacing(path, suffix=".part") as tmp:
        _write(image, tmp, fmt, quality, settings)
    return path


def encode_image(image: Image.Image, fmt: str, quality: int, settings: dict) -> bytes:
    """The bytes save_image would write, in memory."""
    buffer = io.BytesIO()
    _write(image, buffer, fmt, quality, settings)
    return buffer.getvalue()


def save_in_background(image: Image.Image, path: Path | None, fmt: str, quality: int, settings: dict) -> Future:
    """save_image in a worker thread (encoders release the GIL), so that the caller can decode the next image
    meanwhile; with no `path`, encode_image. The future's result is (the path written, or the bytes; seconds
    spent encoding). SPEED_ENCODE_THREADS=0 works inline."""

    def work():
        started = time.perf_counter()
        if path is None:
            written = encode_image(image, fmt, quality, settings)
        else:
            written = save_image(image, path, fmt, quality, settings)
        return written, time.perf_counter() - started

    pool = _encoder_pool(Settings().speed_encode_threads)
    if pool is None:
        future: Future = Future()
        future.set_result(work())
        return future
    return pool.submit(work)


@functools.lru_cache(maxsize=None)
def _encoder_pool(threads: int) -> ThreadPoolExecutor | None:
    return ThreadPoolExecutor(threads, thread_name_prefix="encode") if threads > 0 else None


def read_settings(path) -> dict:
    """The generation settings embedded by save_image."""
    with Image.open(path) as image:
        return json.loads(image.getexif()[EXIF_IMAGE_DESCRIPTION])
