"""File inputs under Cog: `image` takes only a file that Cog downloaded (a URL) or decoded (a data URI) for this
request, never a path to a file already on the server.

How cog 0.23.1 (coglet) hands a `Path` input to run(): a value that starts with `http://`, `https://` or `data:`
goes through `cog.types.Path.validate` (a data URI is decoded there) and `URLPath.convert()`, which writes the bytes
to a new file in $TMPDIR (`tmp<random><name>`, name from the URL or `file.<ext>`); run() gets that path, and Cog
removes the file once the prediction has ended. Any other value (a path, a number, a list) reaches run() as it was
sent: a plain string would name a file on the server. tests/test_cog_inputs.py checks each of these facts against
the real server.

install() puts this module's versions of those two steps in their place, in the process that runs the predictor
(setup): the same work, plus
- errors that name the input, show the value and say what is allowed (cog's own say only "Incorrect padding" or
  "404 Client Error", and name no input): a value they cannot fetch becomes a `Refused` path that received(), in
  run(), turns into an InputError naming the input (cog tells these steps the value only, not the input);
- a download capped at MAX_INPUT_BYTES (cog's copies any size onto the disk);
- the file as a `Received` path, a type that no value of a request can have: received() accepts it and refuses
  anything else, so a string that merely names a Cog download, another request's file or an output is refused.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import mimetypes
import os
import tempfile
import threading
import typing
import uuid
from pathlib import Path

import cog.types

from lib.engine.images import IMAGE_ALLOWED, MAX_INPUT_BYTES
from lib.engine.inputs import InputError, shown

SCHEMES = ("http://", "https://", "data:")  # what coglet 0.23.1 sends to validate and convert (case-sensitive)
CHUNK = 1 << 20


class Received(cog.types.Path):
    """A file Cog fetched for this request (made only by the convert step installed here); `source` is the URL
    or data URI it came from, for error messages."""

    source: str = ""


class Refused(cog.types.Path):
    """What the installed steps hand run() for a URL or data URI they could not fetch: no file, the reason. cog tells
    those steps the value only, not which input it is for, so the error is raised by received(), which knows."""

    source: str = ""
    problem: str = ""

    @classmethod
    def of(cls, source: str, problem: str) -> Refused:
        # A path no file has (Cog removes an input's file after the prediction: never name a real one here).
        refused = cls(os.path.join(tempfile.gettempdir(), f"fast-sd-refused-{uuid.uuid4().hex}"))
        refused.source, refused.problem = source, problem
        return refused


def received(name: str, value) -> Received | None:
    """`value` if Cog fetched it for this request; None stays None; anything else is an InputError naming `name`."""
    if value is None or isinstance(value, Received):
        return value
    if isinstance(value, Refused):
        raise InputError(f"{name}: {shown(value.source)} {value.problem}; allowed: {IMAGE_ALLOWED}")
    if isinstance(value, str) and value.startswith(SCHEMES):  # a caller in-process that skipped the fetch
        raise InputError(f"{name}: {shown(value)} was not fetched (in-process, lib.local.collect fetches as Cog does)")
    if isinstance(value, (str, os.PathLike)):
        raise InputError(
            f"{name}: {shown(value)} is not a URL or a data URI (files on the server are not accepted); "
            f"allowed: {IMAGE_ALLOWED}"
        )
    raise InputError(f"{name}: {shown(_as_sent(value))} is not a URL or a data URI; allowed: {IMAGE_ALLOWED}")


def _as_sent(value):
    """`value` as the request had it (Cog fetches the URLs inside a list, too)."""
    if isinstance(value, Received):
        return value.source
    if isinstance(value, (list, tuple)):
        return [_as_sent(v) for v in value]
    return value


# -- the steps installed into cog ---------------------------------------------------------------------------------
_lock = threading.Lock()
_installed: dict[str, object] = {}  # the original validate and convert, once installed


def file_inputs(run) -> list[str]:
    """The names of run()'s `Path` inputs (cog's validate is told the value only, not which input it is for)."""
    hints = typing.get_type_hints(run)
    return [
        name
        for name in inspect.signature(run).parameters
        if hints.get(name) is cog.types.Path or cog.types.Path in typing.get_args(hints.get(name))
    ]


def install() -> None:
    """Replace cog's validate and convert steps for `Path` inputs in this process (idempotent)."""
    with _lock:
        if not _installed:
            _installed["validate"] = cog.types.Path.validate.__func__
            _installed["convert"] = cog.types.URLPath.convert
        cog.types.Path.validate = classmethod(_validate)
        cog.types.URLPath.convert = _convert


def _validate(cls, value):
    try:
        return _installed["validate"](cls, value)
    except Exception as e:
        if isinstance(value, str) and value.startswith("data:"):
            reason = f"base64: {e}" if isinstance(e, binascii.Error) else "expected data:<type>;base64,<data>"
            problem = f"is not a valid data URI ({reason})"
        else:
            problem = f"is not valid ({e})"
        return Refused.of(value, problem)


def _convert(self: cog.types.URLPath) -> Received | Refused:
    """cog's URLPath.convert (same file, same name, same cleanup by Cog after the prediction), capped in size."""
    if self._path is None:
        fd, name = tempfile.mkstemp(suffix=self.filename)
        try:
            with os.fdopen(fd, "wb") as dest:
                copied = 0
                while chunk := self.fileobj.read(CHUNK):
                    copied += len(chunk)
                    if copied > MAX_INPUT_BYTES:
                        os.unlink(name)
                        return Refused.of(self.source, f"is larger than {MAX_INPUT_BYTES // 2**20} MiB")
                    dest.write(chunk)
        except Exception as e:
            os.unlink(name)
            return Refused.of(self.source, f"could not be downloaded ({str(e)[:300]})")
        path = Received(name)
        path.source = self.source
        self._path = path
    return self._path


# -- the same outside a Cog server (scripts/predict.sh, tests) ----------------------------------------------------
def data_uri(path: str | os.PathLike) -> str:
    """A local file as the data URI a client sends (`cog predict -i image=@file` does the same)."""
    mime = mimetypes.guess_type(os.fspath(path))[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def fetch(value):
    """What coglet hands run() for `value` sent to a `Path` input: a URL or data URI fetched (remove the file
    when done), anything else as it is."""
    if isinstance(value, str) and value.startswith(SCHEMES):
        checked = cog.types.Path.validate(value)
        return checked.convert() if isinstance(checked, cog.types.URLPath) else checked
    return value
