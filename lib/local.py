"""Running the Cog Predictor in-process, as `cog predict` would: Input() defaults filled in,
command-line values (`-i key=value`, `-i image=@file.png`) converted to the declared types, and a file input
sent as a client sends it (a local file as a data URI), then fetched as the Cog server does (lib/cog_inputs.py).

  python -m lib.local -i prompt="a lighthouse at dusk" -i mode=sd-turbo [-o outputs]   (scripts/predict.sh)
  python -m lib.local --tiny -i prompt=test     # offline smoke test on tiny random weights
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import shutil
import sys
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cog.input import FieldInfo

from lib import cog_inputs
from lib.engine.inputs import InputError
from lib.settings import parse_bool


class Metrics(dict):
    """What a prediction records through Cog's record_metric, as a dict: set it as `runner.record_metric`."""

    def __call__(self, key, value, mode="replace"):
        self[key] = value


@contextmanager
def recording(runner) -> Iterator[Metrics]:
    """The metrics runner's predictions record inside the block (outside a Cog server)."""
    metrics = runner.record_metric = Metrics()
    try:
        yield metrics
    finally:
        del runner.record_metric


def _target_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def parse_input(name: str, text: str, annotation):
    """A command-line value as the input's declared type: booleans take true/false, 1/0, yes/no (any case);
    numbers must be numbers; files are `@path` (or a path). Anything else is an InputError naming the input."""
    target = _target_type(annotation)
    if target is bool:
        try:
            return parse_bool(name, text)
        except ValueError as e:
            raise InputError(str(e)) from None
    if target in (int, float):
        try:
            value = target(text.strip())
        except ValueError:
            kind = "a whole number" if target is int else "a number"
            raise InputError(f"{name}: {text!r} is not {kind}") from None
        if target is float and not math.isfinite(value):
            raise InputError(f"{name}: {text!r} is not a finite number")
        return value
    if target is str or text.startswith(cog_inputs.SCHEMES):
        return text
    return Path(text.removeprefix("@"))  # a local file: collect() sends it as a data URI


def run_inputs(runner, raw: dict[str, str] | None = None, **values) -> dict:
    """Keyword arguments for runner.run(): `values` as given, `raw` strings parsed by each input's declared type,
    defaults filled."""
    params = inspect.signature(runner.run).parameters
    unknown = set(raw or {}) | set(values)
    unknown -= set(params)
    if unknown:
        raise ValueError(f"unknown input(s): {', '.join(sorted(unknown))}; allowed: {', '.join(params)}")
    kwargs = {}
    for name, param in params.items():
        if name in values:
            kwargs[name] = values[name]
        elif raw and name in raw:
            kwargs[name] = parse_input(name, raw[name], param.annotation)
        else:
            default = param.default
            kwargs[name] = default.default if isinstance(default, FieldInfo) else default
    return kwargs


async def outputs(runner, **kwargs):
    """runner.run(**kwargs)'s outputs as an async iterator, driven as Cog drives it: run() is a coroutine that
    returns a sync iterator (see Batcher.stream), drained here off the event loop."""
    import asyncio

    iterator = iter(await runner.run(**kwargs))
    loop, done = asyncio.get_running_loop(), object()
    try:
        while (item := await loop.run_in_executor(None, next, iterator, done)) is not done:
            yield item
    finally:
        try:  # canceled while a drain thread waits inside next(): the iterator closes when that returns
            getattr(iterator, "close", lambda: None)()
        except ValueError:
            pass


def collect(runner, **kwargs) -> list:
    """Drive runner.run(**kwargs) to the end, outside a Cog server. A file input given as a local file is sent as a
    data URI; a URL or data URI is fetched as the Cog server fetches it (and removed after the run, as it does)."""
    import asyncio

    async def gather():
        return [output async for output in outputs(runner, **kwargs)]

    fetched = []
    try:
        for name in cog_inputs.file_inputs(runner.run):
            value = kwargs.get(name)
            if isinstance(value, os.PathLike) and not isinstance(value, cog_inputs.Received):
                value = cog_inputs.data_uri(value)
            kwargs[name] = cog_inputs.fetch(value)
            if isinstance(kwargs[name], cog_inputs.Received):
                fetched.append(kwargs[name])
        return asyncio.run(gather())
    finally:
        for path in fetched:
            path.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/predict.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input of Predictor.run (files: image=@path)",
    )
    parser.add_argument("-o", "--output", default="outputs", help="folder for the image files (default: outputs)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="use tiny random weights built on the spot: checks the whole path offline, in seconds; "
        "the images are noise",
    )
    args = parser.parse_args()
    raw = dict(item.split("=", 1) for item in args.input if "=" in item)
    bad = [item for item in args.input if "=" not in item]
    if bad:
        parser.error(f"-i takes NAME=VALUE, got: {', '.join(bad)}")

    # One prediction needs one mode: fetch and load only that one unless ENABLED_MODES says otherwise.
    from lib.engine.modes import DEFAULT_MODE

    os.environ.setdefault("ENABLED_MODES", raw.get("mode", DEFAULT_MODE))
    if args.tiny:
        from lib.testkit.models import use_tiny_weights

        use_tiny_weights()

    from predict import Predictor

    predictor = Predictor()
    try:  # checked before setup: a typo should not wait for the weights
        inputs = run_inputs(predictor, raw)
    except ValueError as e:
        print(f"invalid input: {e}", file=sys.stderr)
        return 2
    try:
        predictor.setup()
    except Exception as e:  # setup's own message says what is missing and where
        print(
            f"setup failed: {e}\n\nThe weights come from the Hugging Face Hub (HF_TOKEN for gated repos) or from "
            "a mirror in WEIGHTS_BASE_URL (docs/weights.md); files already in WEIGHTS_DIR are used as they are "
            "with WEIGHTS_OFFLINE=1. To check the whole path offline on tiny random weights:\n"
            '  scripts/predict.sh --tiny -i prompt="a test"',
            file=sys.stderr,
        )
        return 1
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with recording(predictor) as metrics:
        try:
            for path in collect(predictor, **inputs):
                target = out / Path(path).name
                shutil.move(path, target)
                print(target)
        except ValueError as e:
            print(f"prediction failed: {e}", file=sys.stderr)
            return 2
    print("metrics:", metrics, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
