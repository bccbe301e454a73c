"""The safetensors header of a style LoRA, checked from the file's first bytes, before anything is loaded: dtypes,
shapes, contiguous offsets that end exactly at the file's end. Anything else (a pickle or zip .pt/.ckpt/.bin, an
HTML page) is refused, and nothing but safetensors is ever deserialized."""

from __future__ import annotations

import json
import os
import struct
from typing import BinaryIO

from lib.engine.inputs import InputError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def not_safetensors(prefix: bytes) -> str:
    if prefix.startswith(b"PK\x03\x04"):
        kind = "a zip archive (the PyTorch .pt/.ckpt/.bin format, which holds pickled code)"
    elif prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = "a Python pickle (.pt/.ckpt/.bin)"
    elif prefix.lstrip()[:1] in (b"<",):
        kind = "an HTML/XML page (is the URL a direct download link?)"
    else:
        kind = "not in the safetensors format"
    return (
        f"lora_url: the file is {kind}; only .safetensors LoRA files are accepted (pickle-based files are never loaded)"
    )


def check_header(prefix: bytes) -> tuple[dict, int] | None:
    """(header, total file size) from the file's first bytes, or None if more bytes are needed. Raises InputError
    for anything that is not a well-formed safetensors header."""
    if len(prefix) < 8:
        return None
    (n,) = struct.unpack("<Q", prefix[:8])
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise InputError(not_safetensors(prefix))
    if len(prefix) < 8 + n:
        if prefix[8:9] not in (b"{", b""):
            raise InputError(not_safetensors(prefix))
        return None
    try:
        header = json.loads(prefix[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(not_safetensors(prefix)) from None
    if not isinstance(header, dict):
        raise InputError(not_safetensors(prefix))
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise InputError("lora_url: the safetensors header's __metadata__ is not a map of strings")
            continue
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in DTYPE_BYTES
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) and o >= 0 for o in info["data_offsets"])
        )
        if not ok:
            raise InputError(f"lora_url: the safetensors header's entry {name[:100]!r} is malformed")
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if end - begin != numel * DTYPE_BYTES[info["dtype"]]:
            raise InputError(
                f"lora_url: the safetensors header's tensor {name[:100]!r} has offsets that do not match its shape"
            )
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise InputError("lora_url: the safetensors header's tensors overlap or leave gaps")
        position = end
    return header, 8 + n + position


def read_header(handle: BinaryIO) -> tuple[dict, int]:
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) == 8:
        (n,) = struct.unpack("<Q", prefix)
        if n <= MAX_HEADER_BYTES:
            prefix += handle.read(n)
    result = check_header(prefix)
    if result is None:
        raise InputError("lora_url: the file is shorter than its safetensors header")
    return result


def check_file(handle: BinaryIO) -> None:
    """An open file's safetensors header, and that the file is exactly as long as the header says."""
    _, total = read_header(handle)
    if total != os.fstat(handle.fileno()).st_size:
        raise InputError("lora_url: the cached file does not match its safetensors header")
