"""Running the Cog Predictor in-process, as `cog predict` would: Input() defaults filled in and
command-line values (`-i key=value`, `-i image=@file.png`) converted to the declared types."""

from __future__ import annotations

import inspect
import math
import typing

from cog.input import FieldInfo

from .env import parse_bool
from .inputs import InputError


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
    if target is str:
        return text
    return target(text.removeprefix("@"))  # cog.Path


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
    """Drive runner.run(**kwargs) to the end, outside a Cog server."""
    import asyncio

    async def gather():
        return [output async for output in outputs(runner, **kwargs)]

    return asyncio.run(gather())
