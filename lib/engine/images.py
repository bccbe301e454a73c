"""Image files in and out: the img2img input (checked before it is decoded) and the output files, each
carrying its generation settings as JSON in the EXIF ImageDescription tag (one reader for every format)."""

from __future__ import annotations

import functools
import io
import json
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from lib.atomic import replacing
from lib.engine.inputs import InputError
from lib.settings import Settings

MAX_INPUT_BYTES = 50 * 1024 * 1024
MAX_INPUT_PIXELS = 4096 * 4096
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
EXIF_ORIENTATION = 0x0112
SOFTWARE = "fast-sd-cog"
PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def input_image_size(path, name: str = "image") -> tuple[int, int]:
    """An input image's upright (width, height), from its header alone: limits are checked before any
    pixel is decoded. `name`: the input it came as (image, control_image, ...), for messages."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise InputError(f"{name}: the file is {size / 2**20:.1f} MiB; allowed: up to {MAX_INPUT_BYTES // 2**20} MiB")
    try:
        with Image.open(path) as image:
            w, h = image.size
            rotated = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{name}: {path.name} is not a readable image file (PNG, JPEG, WebP, ...): {e}") from None
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(f"{name}: {w}x{h} is too large; allowed: up to {MAX_INPUT_PIXELS:,} pixels (e.g. 4096x4096)")
    return (h, w) if rotated else (w, h)


def open_input_image(path, name: str = "image") -> Image.Image:
    """An input image (the img2img input, a control image) as upright RGB."""
    input_image_size(path, name)
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt pixel data
        raise InputError(f"{name}: {Path(path).name} could not be decoded: {e}") from None


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


def new_output_dir(root: Path | None = None, keep_seconds: float = 3600) -> Path:
    """A fresh folder for one prediction's files. Folders of earlier predictions are removed once older than
    `keep_seconds` (the server has long finished sending them), so a long-running server does not fill its disk."""
    root = Path(root or Path(tempfile.gettempdir()) / "fast-sd-outputs")
    root.mkdir(parents=True, exist_ok=True)
    # The sweep stats every folder: at most once a minute per root, not on every prediction (at 100 a second an
    # hour's folders would cost far more than the images).
    if time.monotonic() - _last_sweep.get(root, -1e9) >= min(60.0, keep_seconds):
        _last_sweep[root] = time.monotonic()
        for old in root.iterdir():
            if old.is_dir() and time.time() - old.stat().st_mtime > keep_seconds:
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root))


_last_sweep: dict[Path, float] = {}
