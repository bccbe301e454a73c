"""Writing a file so that a reader (or a crash) sees the old file or the new one, never a torn one: the bytes go to
a temporary file beside it, which is then renamed over it. With `durable`, the file and the rename are fsynced,
so that the new file also survives a power cut (what a marker that says "verified" needs)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path, durable: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed over `path` when the block ends, removed if it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{suffix}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes | str, durable: bool = False) -> None:
    with replacing(path, durable) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def write_json(path: Path, data) -> None:
    write_atomically(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
