"""How long output files stay on disk (lib/cog_outputs.py): under a Cog server each file goes as soon as the server
has read it, a failed or canceled prediction's folder at once, an unread file after OUTPUTS_KEEP_SECONDS; outside a
server the files are the caller's. Checked on the folders directly and through the real Cog server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lib.cog_outputs import Outputs
from lib.testkit.cog_server import CogServer, WebhookSink, decode_output, shared_server


def eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def written(folder: Path, *names: str) -> list[Path]:
    paths = [folder / name for name in names]
    for path in paths:
        path.write_bytes(b"image bytes")
    return paths


def read(path: Path) -> None:
    with open(path, "rb") as f:  # as the Cog server reads an output: open, read whole, close
        f.read()


@pytest.fixture
def served(tmp_path):
    outputs = Outputs(tmp_path, served=True, keep_seconds=60)
    yield outputs
    outputs.close()


def test_each_file_goes_once_read_and_the_folder_with_its_last(served):
    folder = served.new()
    first, second = written(folder, "out-0-1.png", "out-1-2.png")
    stream = served.deliver(folder, iter([first, second]))
    assert next(stream) == first
    read(first)
    assert eventually(lambda: not first.exists())
    assert second.exists()  # written, not yet yielded: not read, not removed
    assert next(stream) == second
    with pytest.raises(StopIteration):
        next(stream)
    assert folder.exists()  # the last file is not read yet
    read(second)
    assert eventually(lambda: not folder.exists())
    assert served.files() == []


def test_a_failed_or_canceled_prediction_leaves_nothing(served):
    def failing(paths):
        yield from paths
        raise RuntimeError("the batch failed")

    folder = served.new()
    stream = served.deliver(folder, failing(written(folder, "out-0-1.png")))
    next(stream)
    with pytest.raises(RuntimeError):
        next(stream)
    assert not folder.exists()

    canceled = []
    folder = served.new()
    files = iter(written(folder, "out-0-1.png", "out-1-2.png"))
    stream = served.deliver(folder, files, cancel=lambda: canceled.append(1))
    next(stream)
    stream.close()  # Cog stops reading the outputs of a canceled prediction
    assert canceled == [1] and not folder.exists()

    canceled.clear()
    folder = served.new()
    stream = served.deliver(folder, iter(written(folder, "out-0-1.png")), cancel=lambda: canceled.append(1))
    del stream  # dropped before it was ever read from
    assert canceled == [1] and not folder.exists()

    folder = served.new()  # failed before any output (a bad input, a cancel while waiting)
    served.discard(folder)
    assert not folder.exists() and served.files() == []


def test_a_file_no_one_reads_goes_after_keep_seconds(tmp_path):
    outputs = Outputs(tmp_path, served=True, keep_seconds=0.5)
    try:
        folder = outputs.new()
        list(outputs.deliver(folder, iter(written(folder, "out-0-1.png"))))
        time.sleep(0.3)
        assert folder.exists()
        assert eventually(lambda: not folder.exists(), timeout=3)
    finally:
        outputs.close()


def test_without_inotify_every_file_goes_after_keep_seconds(tmp_path, monkeypatch):
    import lib.cog_outputs

    def unavailable():
        raise OSError(24, "inotify_init1: Too many open files")

    monkeypatch.setattr(lib.cog_outputs, "_Inotify", unavailable)
    outputs = Outputs(tmp_path, served=True, keep_seconds=0.5)
    try:
        folder = outputs.new()
        (path,) = list(outputs.deliver(folder, iter(written(folder, "out-0-1.png"))))
        read(path)
        time.sleep(0.2)
        assert path.exists()  # no one can tell it was read
        assert eventually(lambda: not folder.exists(), timeout=3)
    finally:
        outputs.close()


def test_outside_a_server_the_files_are_the_callers(tmp_path):
    outputs = Outputs(tmp_path, served=False)
    folder = outputs.new()
    paths = list(outputs.deliver(folder, iter(written(folder, "out-0-1.png"))))
    read(paths[0])
    time.sleep(0.2)
    assert paths[0].exists()
    assert outputs.root == tmp_path / str(os.getpid())


def test_folders_of_processes_that_ended_are_removed_at_start(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (ended.stdout.strip(), str(running.pid)):
            (tmp_path / pid / "tmpabc").mkdir(parents=True)
            (tmp_path / pid / "tmpabc" / "out-0-1.png").write_bytes(b"x")
        Outputs(tmp_path, served=False)
        assert not (tmp_path / ended.stdout.strip()).exists()
        assert (tmp_path / str(running.pid) / "tmpabc" / "out-0-1.png").exists()
    finally:
        running.kill()
        running.wait()


# -- through the real Cog server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, pytestconfig) -> CogServer:
    return shared_server(tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def sink():
    s = WebhookSink()
    yield s
    s.close()


def output_files(server: CogServer) -> list[Path]:
    """Every file and folder in the server's output folders (TMPDIR/fast-sd-outputs/<process id>/). Folders the
    server removes while they are listed are passed over (os.walk ignores them; Path.glob would raise)."""
    root = Path(server.env["TMPDIR"]) / "fast-sd-outputs"
    found = []
    for folder, dirs, files in os.walk(root):
        if Path(folder) != root:  # inside a process's folder
            found += [Path(folder) / name for name in dirs + files]
    return found


def no_output_files(server: CogServer) -> bool:
    return eventually(lambda: not output_files(server))


SMALL = dict(prompt="a lighthouse", mode="sd-turbo", width=256, height=256)


def test_the_server_sends_every_output_and_no_file_stays(server, sink):
    p = server.predict(**SMALL, num_outputs=3, seed=4, output_format="png")
    assert p["status"] == "succeeded", p.get("error")
    assert [decode_output(uri)[0].size for uri in p["output"]] == [(256, 256)] * 3
    assert no_output_files(server), output_files(server)

    pid = f"outputs-{uuid.uuid4().hex[:8]}"
    server.start_async(pid, sink.url, **SMALL, num_outputs=2, seed=5, output_format="webp")
    final = sink.terminal(pid).body
    assert final["status"] == "succeeded", final.get("error")
    assert [decode_output(uri)[0].size for uri in final["output"]] == [(256, 256)] * 2
    outputs_events = [e.body for e in sink.of(pid) if e.body["status"] == "processing" and e.body.get("output")]
    assert all(decode_output(uri)[0].size == (256, 256) for e in outputs_events for uri in e["output"])
    assert no_output_files(server), output_files(server)


def test_a_canceled_or_failed_prediction_leaves_no_file(server, sink, files):
    from tests.test_server import as_http_value, cancel_mid_denoising

    slow = dict(prompt="a slow one", mode="lcm", width=512, height=512, num_inference_steps=8, num_outputs=2, seed=6)
    c = cancel_mid_denoising(server, sink, f"cancel-{uuid.uuid4().hex[:8]}", **slow)
    assert c["final"]["status"] == "canceled"
    assert no_output_files(server), output_files(server)

    p = server.predict(**SMALL, image=as_http_value("@truncated", files))
    assert p["status"] == "failed" and "image:" in p["error"], p
    assert no_output_files(server), output_files(server)
    assert server.settled_status() == "READY"
