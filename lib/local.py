"""Running the Cog Predictor in-process, as `cog predict` would: Input() defaults filled in and
command-line values (`-i key=value`, `-i image=@file.png`) converted to the declared types."""

from __future__ import annotations

import inspect
import typing

from cog.input import FieldInfo


def _target_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def run_inputs(runner, raw: dict[str, str] | None = None, **values) -> dict:
    """Keyword arguments for runner.run(): `values` as given, `raw` strings converted, defaults filled."""
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
            text = raw[name]
            target = _target_type(param.annotation)
            if text.startswith("@"):
                text = text[1:]
            kwargs[name] = text if target is str else target(text)
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
