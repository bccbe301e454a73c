"""The realtime server's entry point (scripts/realtime.py, scripts/realtime.sh): set up the engine as the
predictor does (the same environment: WEIGHTS_DIR, WEIGHTS_OFFLINE, ENABLED_MODES, SAFETY_CHECKER, ...), warm it
up at the realtime shapes, then serve the page and its WebSocket with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lib.realtime.server import is_loopback
from lib.settings import Settings

log = logging.getLogger("lib.realtime")

DEFAULT_MODES = "sd-turbo"  # without ENABLED_MODES: the fastest mode, and the smallest download
TOKEN_HINT = "export REALTIME_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"


def use_fast_path() -> None:
    """On CUDA, the realtime defaults (before the engine reads its settings; SPEED_CUDNN_BENCHMARK=0 turns it off): one
    fixed size per mode, so cuDNN's autotuning per shape pays off (CUDA graphs are on for every CUDA engine)."""
    from lib.engine import devices

    if devices.choose_from_env()[0].type == "cuda":
        os.environ.setdefault("SPEED_CUDNN_BENCHMARK", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/realtime.sh", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random weights built on the spot (the frames are noise): checks everything offline, in seconds",
    )
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not Settings().realtime_token:
        parser.error(
            f"--host {args.host} serves beyond this machine, which needs a token: set REALTIME_TOKEN, e.g.\n"
            f"  {TOKEN_HINT}\nand open the page as http://<this machine>:{args.port}/?token=<the token>"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    for name in ("uvicorn.access", "uvicorn.error"):  # not a line per connection: sessions log their own
        logging.getLogger(name).setLevel(logging.WARNING)

    os.environ.setdefault("ENABLED_MODES", DEFAULT_MODES)
    if args.tiny:
        from lib.testkit.models import use_tiny_weights

        use_tiny_weights()
    import uvicorn

    from lib.engine.engine import Engine
    from lib.realtime.server import create_app, new_batcher, uvicorn_options

    use_fast_path()
    settings = Settings()
    try:
        engine = Engine.from_env()
    except Exception as e:  # setup's own message says what is missing and where
        print(f"setup failed: {e}\n\nTo check the whole path offline on tiny random weights:\n"
              "  scripts/realtime.sh --tiny", file=sys.stderr)  # fmt: skip
        return 1
    batcher = new_batcher(engine, settings)
    if engine.switches.warmup:
        batcher.warm_up(img2img=True)
    app = create_app(engine, batcher, settings)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    token = "?token=<REALTIME_TOKEN>" if settings.realtime_token else ""
    log.info("realtime: serving %s; open http://%s:%d/%s", ", ".join(engine.enabled), shown, args.port, token)
    uvicorn.run(app, host=args.host, port=args.port, **uvicorn_options(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
