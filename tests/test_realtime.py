"""The realtime server over its WebSocket, as its entry point starts it (scripts/realtime.py) on tiny weights:
frames for prompts and paintings, latest wins, two clients, bad messages answered while the server stays up,
the handshake's token, Origin and Host checks, the per-session figures in the log, and the safety checker.
The page itself, in a real browser: test_realtime_browser.py."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
import requests
import websockets
from PIL import Image

from lib import ROOT
from lib.engine.batcher import Batcher
from lib.engine.modes import MODES
from lib.settings import Settings
from lib.testkit.environment import environment
from lib.testkit.realtime import RealtimeClient, RealtimeServer, serve_in_thread
from tests.conftest import REALTIME_MAX_MESSAGE, REALTIME_MODES, REALTIME_RATE
from tests.test_safety import checker, flag_everything  # noqa: F401  (checker: a fixture)


def picture(colour="white", size=512, fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, fmt)
    return buffer.getvalue()


def run(coroutine):
    return asyncio.run(coroutine)


def frame_image(message: dict) -> Image.Image:
    assert message["type"] == "frame", message
    image = Image.open(io.BytesIO(message["image"]))
    assert image.format == "JPEG"  # REALTIME_FRAME_FORMAT's default, as binary, not base64 in JSON
    return image


def test_page_is_served_with_everything_it_loads_local(realtime_server):
    page = requests.get(realtime_server.url + "/", timeout=10)
    assert page.status_code == 200
    for element in ('id="prompt"', 'id="canvas"', 'id="output"', 'id="stats"', 'id="mode"', 'id="steps"'):
        assert element in page.text
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    loaded = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert loaded and all(u.startswith("/static/") or u.startswith("data:") for u in loaded), loaded
    for url in (u for u in loaded if u.startswith("/")):
        assert requests.get(realtime_server.url + url, timeout=10).status_code == 200, url


def test_hello_offers_the_enabled_modes_with_the_mode_tables_limits(realtime_server):
    async def go():
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            return c.hello

    hello = run(go())
    assert [m["name"] for m in hello["modes"]] == REALTIME_MODES.split(",")
    for m in hello["modes"]:
        mode = MODES[m["name"]]
        assert (m["steps"]["min"], m["steps"]["max"], m["steps"]["default"]) == (*mode.steps.range, mode.steps.default)
        assert m["size"] == mode.size and m["fast_decode"] is True
    assert hello["frame_type"] == "image/jpeg" and hello["safety_checker"] is True
    assert hello["limits"] == {"max_message_bytes": REALTIME_MAX_MESSAGE, "messages_per_second": REALTIME_RATE}


def test_a_prompt_gives_a_frame_at_the_modes_size(realtime_server):
    async def go():
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            number = await c.settings(prompt="a lighthouse", seed=3)
            return number, await c.answer(number)

    number, frame = run(go())
    assert frame["input"] == number == 1
    assert (frame["mode"], frame["prompt"], frame["seed"], frame["img2img"]) == ("sd-turbo", "a lighthouse", 3, False)
    image = frame_image(frame)
    assert image.size == (512, 512) and image.mode == "RGB"
    assert frame["ms"] > 0


def test_an_sdxl_lightning_frame_comes_at_its_size_and_step_count(realtime_server):
    async def go():
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            number = await c.settings(prompt="a lighthouse", seed=3, mode="sdxl-lightning-4step")
            return await c.answer(number)

    frame = run(go())
    assert (frame["mode"], frame["num_inference_steps"], frame["fast_decode"]) == ("sdxl-lightning-4step", 4, True)
    assert frame_image(frame).size == (1024, 1024)


def test_a_painting_drives_img2img_and_the_frame_follows_it(realtime_server):
    async def go():
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            await c.settings(prompt="a house", seed=1, img2img=True, strength=0.6)
            white = await c.answer(await c.send(picture("white")))
            black = await c.answer(await c.send(picture("black")))
            white_again = await c.answer(await c.send(picture("white")))
            return white, black, white_again

    white, black, white_again = run(go())
    assert white["img2img"] and white["strength"] == 0.6 and white["fast_decode"]
    assert frame_image(white).size == (512, 512)
    assert white["image"] != black["image"]  # the frame comes from the picture
    assert white["image"] == white_again["image"]  # and only from it (same settings, same seed)


def test_latest_wins_while_a_frame_is_made(realtime_server):
    """Twenty prompts as fast as the socket takes them: far fewer frames, and the last one is the last prompt."""

    async def go():
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            for i in range(20):
                last = await c.settings(prompt=f"prompt {i}", seed=5)
            frames = []
            while True:
                message = await c.receive()
                frames.append(message)
                if message["input"] == last:
                    return frames

    frames = run(go())
    assert all(f["type"] == "frame" for f in frames)
    assert len(frames) < 20 and frames[-1]["prompt"] == "prompt 19"
    answered = [f["input"] for f in frames]
    assert answered == sorted(answered)


def test_two_clients_each_get_their_own_frames(realtime_server):
    async def client(name: str) -> list[dict]:
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            frames = []
            for k in range(3):
                frames.append(await c.answer(await c.settings(prompt=f"{name} {k}", seed=k)))
            return frames

    async def go():
        return await asyncio.gather(client("first"), client("second"))

    for name, frames in zip(("first", "second"), run(go()), strict=True):
        assert [f["prompt"] for f in frames] == [f"{name} {k}" for k in range(3)]
        assert all(frame_image(f).size == (512, 512) for f in frames)


BAD_MESSAGES = [
    ("not json", "message: not JSON"),
    ("[1, 2]", "message: list is not a JSON object; send a JSON object of settings: prompt, mode"),
    ('{"colour": "red"}', "message: unknown setting(s) 'colour'; allowed: prompt, mode, num_inference_steps"),
    # Pictures come only as the bytes of a binary message: a path to a file on the server is no setting.
    ('{"image": "/etc/hostname"}', "message: unknown setting(s) 'image'; allowed: prompt, mode"),
    ('{"num_inference_steps": 9}', "num_inference_steps: 9 is not allowed for mode sd-turbo; allowed: 1 to 4"),
    ('{"strength": "lots"}', "strength: 'lots' is not a finite number"),
    ('{"mode": "sdxl-turbo"}', "mode: 'sdxl-turbo' is not enabled on this server (ENABLED_MODES); enabled: sd-turbo"),
    ('{"mode": "dalle"}', "mode: 'dalle' is not a mode"),
    ('{"mode": ["sd-turbo"]}', "mode: ['sd-turbo'] is not a mode; allowed: sdxl-turbo, sd-turbo, lcm"),
    ('{"seed": -1}', "seed: -1 is out of range; allowed: 0 to 4294967295"),
    ('{"img2img": "yes"}', "img2img: 'yes' is not true or false"),
    (b"GIF89a not a picture", "picture: 20 bytes that are not a JPEG, PNG or WebP image"),
    (picture(size=3000, fmt="PNG"), "picture: 3000x3000 is too large; allowed: up to 4,194,304 pixels"),
    (b"\xff" * (REALTIME_MAX_MESSAGE + 1), "picture: 524,289 bytes is too large; allowed: up to 524,288 bytes"),
    ("x" * 70_000, "message: 70000 bytes of text is too long; allowed: up to 65536"),
]


@pytest.mark.parametrize("message, error", BAD_MESSAGES, ids=[e.split(";")[0][:40] for _, e in BAD_MESSAGES])
def test_a_bad_message_is_answered_with_an_error_and_the_session_goes_on(realtime_server, message, error):
    async def go():
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            bad = await c.send(message)
            answer = await c.answer(bad)
            good = await c.settings(prompt="still here", seed=2)
            return bad, answer, await c.answer(good)

    bad, answer, after = run(go())
    assert answer["type"] == "error" and answer["input"] == bad
    assert error in answer["message"]
    assert after["type"] == "frame" and after["prompt"] == "still here"  # the settings before the bad one held


def test_a_message_beyond_four_times_the_limit_closes_only_its_socket(realtime_server):
    async def go():
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            await c.send(b"\0" * (4 * REALTIME_MAX_MESSAGE + 1))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await c.receive(timeout=10)
            return closed.value.rcvd.code

    assert run(go()) == 1009  # message too big
    test_a_prompt_gives_a_frame_at_the_modes_size(realtime_server)  # the server serves on


def test_more_messages_than_the_rate_limit_are_refused_with_one_notice(realtime_server):
    async def go():
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            for i in range(3 * REALTIME_RATE):
                await c.settings(prompt=f"burst {i}", seed=1)
            await asyncio.sleep(1.1)  # the bucket refills
            last = await c.settings(prompt="after the burst", seed=1)
            messages = []
            while not messages or messages[-1].get("input") != last:
                messages.append(await c.receive())
            return messages

    messages = run(go())
    notices = [m for m in messages if m["type"] == "error"]
    assert len(notices) == 1, notices
    assert f"more than {REALTIME_RATE} messages a second" in notices[0]["message"]
    assert messages[-1]["type"] == "frame" and messages[-1]["prompt"] == "after the burst"


def session_line(server: RealtimeServer, port: int, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(rf"realtime session \d+ \(127\.0\.0\.1:{port}\) closed after .*", server.log_text())
        if found:
            return found.group(0)
        time.sleep(0.1)
    raise AssertionError(f"no closing line for the session on port {port}:\n{server.log_tail()}")


def test_each_session_logs_its_figures_when_it_closes(realtime_server):
    async def go():
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            port = c.ws.local_address[1]
            for i in range(5):
                last = await c.settings(prompt=f"figure {i}", seed=1)
            while (await c.receive())["input"] != last:
                pass
            await c.send("not json")
            await c.receive()
            return port

    line = session_line(realtime_server, run(go()))
    figures = re.search(
        r"(\d+) frames \([\d.]+/s\), 6 inputs, (\d+) dropped \(latest wins\), 0 refused, 1 errors, 0 flagged; "
        r"latency p50 ([\d.]+) ms, p95 ([\d.]+) ms",
        line,
    )
    assert figures, line
    frames, dropped = int(figures[1]), int(figures[2])
    assert frames >= 1 and frames + dropped == 5
    assert float(figures[4]) >= float(figures[3]) > 0


def test_a_disconnect_mid_frame_leaves_the_server_serving(realtime_server):
    async def go():
        async with RealtimeClient.connect(realtime_server.ws_url) as c:
            port = c.ws.local_address[1]
            await c.settings(prompt="gone before it is drawn", seed=1)
        return port

    line = session_line(realtime_server, run(go()))
    assert "0 frames" in line
    test_a_prompt_gives_a_frame_at_the_modes_size(realtime_server)


# -- the handshake ---------------------------------------------------------------------------------------------------
TOKEN = "realtime-test-token-1234567890"


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    """Started with --tiny (its own tiny weights) and REALTIME_TOKEN."""
    env = {"ENABLED_MODES": "sd-turbo", "REALTIME_TOKEN": TOKEN, "WEIGHTS_DIR": None, "WEIGHTS_OFFLINE": None}
    with RealtimeServer(tmp_path_factory.mktemp("realtime-token"), env, args=("--tiny",)) as server:
        yield server


def refused_status(url: str, **options) -> int | None:
    async def go():
        try:
            async with RealtimeClient.connect(url, **options):
                return None
        except websockets.InvalidStatus as e:
            return e.response.status_code

    return run(go())


def test_with_a_token_the_handshake_needs_it(token_server):
    assert refused_status(token_server.ws_url) == 403
    assert refused_status(token_server.ws_url + "?token=wrong") == 403
    assert refused_status(f"{token_server.ws_url}?token={TOKEN}") is None
    origin = {"origin": token_server.url}
    assert refused_status(f"{token_server.ws_url}?token={TOKEN}", additional_headers=origin) is None
    log = token_server.log_text()
    assert "refused a connection from 127.0.0.1" in log and "the token is missing or wrong" in log


def test_the_origin_must_be_the_pages_own(realtime_server):
    url = realtime_server.ws_url
    assert refused_status(url, additional_headers={"origin": "http://evil.example"}) == 403
    assert refused_status(url, additional_headers={"origin": realtime_server.url}) is None
    assert "Origin 'http://evil.example' is not this page's" in realtime_server.log_text()


def test_without_a_token_only_loopback_host_names_are_served(realtime_server):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name, with a matching Origin: refused by its Host."""
    port = realtime_server.port
    rebound = f"ws://evil.example:{port}/ws"  # the Host header; the connection goes to 127.0.0.1

    origin = {"origin": f"http://evil.example:{port}"}
    assert refused_status(rebound, host="127.0.0.1", port=port, additional_headers=origin) == 403
    assert "is not a loopback name, and without REALTIME_TOKEN only loopback is served" in realtime_server.log_text()


def test_serving_beyond_loopback_without_a_token_is_refused_at_start():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "realtime.py"), "--host", "0.0.0.0"],
        env={**os.environ, "REALTIME_TOKEN": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--host 0.0.0.0 serves beyond this machine, which needs a token: set REALTIME_TOKEN" in result.stderr


# -- the safety checker --------------------------------------------------------------------------------------------
def test_the_safety_checker_applies_to_frames(predictor, checker):  # noqa: F811
    """In this process, on the predictor's engine, with every image flagged: no frame, a `flagged` message."""
    flag_everything(checker)
    engine = predictor.engine
    with environment(REALTIME_TOKEN=None):
        url, server = serve_in_thread(engine, Batcher(engine, window=0), Settings())
    try:

        async def go():
            async with RealtimeClient.connect(url) as c:
                return await c.answer(await c.settings(prompt="anything", mode="sd-turbo", seed=1))

        answer = run(go())
    finally:
        server.should_exit = True
    assert answer["type"] == "flagged" and "image" not in answer
    assert "flagged by the safety checker" in answer["message"]
    assert checker.calls == [1]


def test_frames_are_valid_json_then_binary(realtime_server):
    """What a non-browser client sees: every text message is JSON; a frame's image is the next, binary, message."""

    async def go():
        async with websockets.connect(realtime_server.ws_url) as ws:
            kinds = [type(await ws.recv())]
            await ws.send(json.dumps({"prompt": "raw", "seed": 1}))
            kinds += [type(await ws.recv()), type(await ws.recv())]
            return kinds

    assert run(go()) == [str, str, bytes]
