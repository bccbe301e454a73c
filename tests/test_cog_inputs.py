"""What `image` accepts (lib/cog_inputs.py): a file Cog downloaded (a URL) or decoded (a data URI) for the request,
never a path to a file on the server; every way it can be wrong is an error naming `image`, the value and what is
allowed. Checked against the real Cog server (lib/testkit/cog_server.py) and in-process."""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from lib import cog_inputs
from lib.engine.images import IMAGE_ALLOWED, MAX_INPUT_BYTES
from lib.engine.inputs import InputError, shown
from lib.local import collect, run_inputs
from lib.testkit.cog_server import CogServer, decode_output, shared_server

BASE = dict(prompt="a harbour", mode="sd-turbo", width=256, height=256, seed=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory, pytestconfig) -> CogServer:
    return shared_server(tmp_path_factory, pytestconfig)


def encoded(fmt: str = "PNG", size=(96, 64), colour="teal") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def noise() -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def server_tmp(server: CogServer) -> Path:
    return Path(server.env["TMPDIR"])


def failure(server: CogServer, **input) -> str:
    p = server.predict(**{**BASE, **input})
    assert p["status"] == "failed", p
    assert server.settled_status() == "READY"
    return p["error"]


def named_image(error: str) -> str:
    """The message after the server's prefix ("... InputError: ", from run()), which must start with the input's
    name (a value Cog could not fetch too: run() reports it, naming the input)."""
    assert "InputError: " in error, error
    return error.split("InputError: ", 1)[1]


# -- a file on the server is never an input ---------------------------------------------------------------------------
def test_a_readable_image_file_on_the_server_cannot_be_used(server):
    """Paths the server process can read, including ones shaped like Cog's own downloads and like another request's
    outputs, are refused before anything opens them."""
    tmp = server_tmp(server)
    planted = {
        "anywhere": tmp / "planted" / "photo.png",
        "like a Cog download": tmp / "tmpab12cd34file.png",
        "like an output": tmp / "fast-sd-outputs" / "999999" / "tmpab12cd34" / "out-0-7.png",
    }
    for path in planted.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded())
    try:
        for kind, path in planted.items():
            for value in (str(path), f"file://{path}"):
                message = named_image(failure(server, image=value))
                assert message.startswith(f"image: {shown(value)} is not a URL or a data URI"), (kind, message)
                assert "files on the server are not accepted" in message and f"allowed: {IMAGE_ALLOWED}" in message
    finally:
        shutil.rmtree(tmp / "planted")
        (tmp / "tmpab12cd34file.png").unlink()
        shutil.rmtree(tmp / "fast-sd-outputs" / "999999")


def test_the_same_image_as_a_data_uri_and_as_a_url_is_accepted_and_its_download_removed(server):
    photo = encoded("JPEG", (120, 80), "orange")
    (server.mirror / "inputs").mkdir(exist_ok=True)
    (server.mirror / "inputs" / "photo.jpg").write_bytes(photo)
    outputs = []
    for value in (data_uri(photo, "image/jpeg"), f"{server.files_url}/inputs/photo.jpg"):
        p = server.predict(**BASE, image=value, strength=0.6)
        assert p["status"] == "succeeded", p.get("error")
        outputs.append(decode_output(p["output"][0])[2])
    assert outputs[0] == outputs[1]  # the same pixels, whichever way they came
    # Cog removes its download once the prediction has ended.
    deadline = time.monotonic() + 5
    while list(server_tmp(server).glob("tmp*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(server_tmp(server).glob("tmp*"))


# -- every way an image can be wrong names `image` ------------------------------------------------------------------
BAD_IMAGES = [
    pytest.param("no-such-file.png", "is not a URL or a data URI", id="a-missing-file"),
    pytest.param("", "is not a URL or a data URI", id="empty"),
    pytest.param(42, "is not a URL or a data URI", id="a-number"),
    pytest.param(["data:image/png;base64,"], "is not a URL or a data URI", id="a-list"),
    pytest.param("data:image/png;base64,abc", "is not a valid data URI (base64: Incorrect padding)", id="bad-base64"),
    pytest.param("data:image/png;base64", "is not a valid data URI (expected data:<type>;base64,<data>)", id="no-data"),
    pytest.param("data:image/png;base64," + "A" * 5001, "is not a valid data URI (base64: ", id="long-bad-base64"),
    pytest.param(data_uri(b"just some text", "text/plain"), "is not a PNG, JPEG or WebP image", id="text"),
    pytest.param(data_uri(encoded("GIF"), "image/gif"), "is not a PNG, JPEG or WebP image", id="a-gif"),
    pytest.param(data_uri(noise()[:2000]), "truncated", id="truncated"),
    pytest.param("@404", "could not be downloaded (404", id="url-404"),
    pytest.param("http://127.0.0.1:9/photo.png", "could not be downloaded (", id="url-refused"),
]


@pytest.mark.parametrize("value, problem", BAD_IMAGES)
def test_every_bad_image_is_an_error_naming_image_and_what_is_allowed(server, value, problem):
    if value == "@404":
        value = f"{server.files_url}/inputs/no-such-photo.png"
    if not isinstance(value, str):  # the bundled schema (a string, format uri) refuses it before the predictor runs
        code, body = server.post({**BASE, "image": value})
        assert code == 422 and {tuple(d["loc"]) for d in body["detail"]} == {("body", "input", "image")}, body
        assert server.settled_status() == "READY"
        return
    message = named_image(failure(server, image=value))
    assert message.startswith(f"image: {shown(value)}"), message
    assert problem in message and IMAGE_ALLOWED in message, message
    assert len(message) < 1000, message  # a long value is shortened


def test_a_control_image_that_cannot_be_fetched_is_named_as_such(server):
    """Cog's fetch is told the value only: the refusal reaches run(), which names the input it came as."""
    message = named_image(failure(server, mode="lcm", control_image="data:image/png;base64,abc"))
    assert message.startswith("control_image: 'data:image/png;base64,abc' is not a valid data URI"), message


@pytest.fixture
def own_tmp(tmp_path, monkeypatch) -> Path:
    """This process's temporary folder (where Cog's fetch writes), empty, for this test alone."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_data_uri_over_the_size_limit_is_refused_while_it_is_written(predictor, own_tmp):
    """The cap is on the bytes written to disk, for a data URI and a download alike (in-process, with the steps the
    Predictor's setup installed: a 50 MiB request body is not worth sending in a test)."""
    big = data_uri(b"\0" * (MAX_INPUT_BYTES + 1))
    with pytest.raises(InputError) as err:
        cog_inputs.received("control_image", cog_inputs.fetch(big))  # named by the input it came as
    message = str(err.value)
    assert message.startswith("control_image: 'data:image/png;base64,AAAA") and "larger than 50 MiB" in message
    assert not list(own_tmp.iterdir())  # its partial file removed


# -- in-process: the Predictor's own check, whoever calls it ----------------------------------------------------------
def test_the_predictor_refuses_a_path_whoever_calls_it(predictor, files, tmp_path):
    """run() itself refuses anything but a file Cog fetched: a str or a Path to a readable image on this machine."""
    photo = files["@photo"]
    for value in (str(photo), photo, cog_inputs.cog.types.Path(photo)):
        with pytest.raises(InputError) as err:
            collect_raw(predictor, image=value)
        assert str(err.value).startswith(f"image: {str(photo)!r} is not a URL or a data URI"), err.value


def collect_raw(predictor, **inputs):
    """run() with the values as given (collect() would send a local file as a client does)."""
    import asyncio

    async def go():
        return list(await predictor.run(**run_inputs(predictor, **{**BASE, **inputs})))

    return asyncio.run(go())


def test_a_local_file_is_sent_as_a_data_uri_by_the_in_process_runner(predictor, files, own_tmp):
    """scripts/predict.sh -i image=@photo.png: the file is sent as `cog predict` sends it, then fetched as the server
    fetches it, and that copy is removed after the run."""
    paths = collect(predictor, **run_inputs(predictor, **BASE, image=files["@photo"]))
    with Image.open(paths[0]) as image:
        assert image.size == (256, 256)
    assert not list(own_tmp.glob("tmp*"))


def test_the_engine_names_image_for_a_file_it_cannot_read(tmp_path):
    """Below the Cog check, too: a missing or unreadable file is an input error naming `image` (it was a bare
    FileNotFoundError)."""
    from lib.engine.images import input_image_size, open_input_image

    (tmp_path / "folder.png").mkdir()
    for path in (tmp_path / "no-such-file.png", tmp_path / "folder.png"):
        for read in (input_image_size, open_input_image):
            with pytest.raises(InputError) as err:
                read(path)
            assert str(err.value).startswith(f"image: {path.name!r} could not be read"), err.value
    with pytest.raises(InputError, match=r"^image: 42 is not a file; allowed: "):
        input_image_size(42)


def test_a_refused_input_names_no_file_that_exists(server, predictor):
    """Cog removes an input's file after the prediction: a value it could not fetch must not name a real file (one
    did: /dev/null, removed by the server's clean-up)."""
    before = set(Path(server.env["TMPDIR"]).iterdir())
    failure(server, image="data:image/png;base64,abc")
    assert Path(os.devnull).exists() and not Path(os.devnull).is_file()  # still the device, not removed or replaced
    assert set(Path(server.env["TMPDIR"]).iterdir()) <= before
    refused = cog_inputs.fetch("data:image/png;base64,abc")
    assert isinstance(refused, cog_inputs.Refused) and not Path(refused).exists()
