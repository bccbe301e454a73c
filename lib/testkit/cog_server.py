"""The real Cog prediction server (cog 0.23.1, `python -m cog.server.http`) for tests, started from the project
root with the project's Predictor, whose setup() does a real cold start: it downloads the tiny models from a
mirror served by nginx on loopback into an empty WEIGHTS_DIR. Also a loopback webhook sink that records every
webhook with its arrival time. Facts about the server: docs/serving.md.

One server serves the whole test session (`shared_server`): setup costs seconds, and every module that needs
a server (test_server.py, test_jobs.py) gets the same one.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from lib import ROOT, cog_schema
from lib.jobs.ledger import TERMINAL  # a Cog prediction's final statuses
from lib.testkit.servers import ServerProcess, free_port

WEBHOOK_TOKEN = "test-webhook-token"  # the shared server sends it as Bearer on every webhook


class CogServer(ServerProcess):
    """One `python -m cog.server.http` process (its own process group), logging to `workdir/server.log`."""

    def __init__(self, workdir: Path, env: dict, stub: str = "predict.py:Predictor", args: tuple[str, ...] = ()):
        self.workdir, self.args = Path(workdir), args
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "server.log"
        venv_bin = str(Path(sys.executable).parent)  # the worker is spawned as `python`: the venv's must be first
        self.env = {
            **os.environ,
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            "PORT": str(self.port),
            "COG_PREDICT_TYPE_STUB": stub,
            "COG_MAX_CONCURRENCY": "1",
            "COG_THROTTLE_RESPONSE_INTERVAL": "0",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> "CogServer":
        # The schema `cog build` would bundle, where coglet looks for it: it checks every request against it.
        cog_schema.write(ROOT)
        self.spawn([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *self.args])
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the Cog server exited with {self.proc.returncode} during setup:\n{self.log_tail()}"
                )
            try:
                health = self.health()
            except OSError:
                time.sleep(0.1)
                continue
            if health["status"] == "READY":
                return
            if health["status"] in ("SETUP_FAILED", "DEFUNCT"):
                setup_logs = (health.get("setup") or {}).get("logs", "")
                raise RuntimeError(
                    f"the Cog server's setup failed ({health['status']}):\n{setup_logs}\nserver log:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        raise RuntimeError(f"the Cog server is not READY after {timeout} s:\n{self.log_tail()}")

    # -- HTTP ---------------------------------------------------------------------------------------------
    def request(
        self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 120
    ) -> tuple[int, dict | str]:
        data = None if body is None else json.dumps(body).encode()
        r = requests.request(
            method,
            self.url + path,
            data=data,
            timeout=timeout,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def health(self) -> dict:
        return requests.get(self.url + "/health-check", timeout=5).json()

    def predict(self, timeout: float = 120, busy_for: float = 5, **input) -> dict:
        """A sync prediction; returns the prediction object (status succeeded, failed or canceled)."""
        code, body = self.post(input, timeout, busy_for)
        assert code == 200, (code, body)
        return body

    def post(self, input: dict, timeout: float = 120, busy_for: float = 5) -> tuple[int, dict | str]:
        """POST a sync prediction: (status code, body), a 422 as the server answers it. The server has no queue:
        while its slot is busy it answers 409, which is retried for up to `busy_for` seconds (a slot frees a moment
        after its terminal webhook). `self.last_busy` is how long that took."""
        started, self.last_busy = time.monotonic(), 0.0
        while True:
            code, body = self.request("POST", "/predictions", {"input": input}, timeout=timeout)
            if code != 409 or time.monotonic() - started > busy_for:
                return code, body
            self.last_busy = time.monotonic() - started
            time.sleep(0.01)

    def start_async(self, prediction_id: str, webhook: str, events=None, **input) -> dict:
        payload = {"id": prediction_id, "input": input, "webhook": webhook}
        if events:
            payload["webhook_events_filter"] = events
        deadline = time.monotonic() + 5
        while True:  # 409: the slot frees a moment after the previous prediction's response
            code, body = self.request("POST", "/predictions", payload, {"Prefer": "respond-async"})
            if code != 409 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert code == 202, (code, body)
        return body

    def settled_status(self, timeout: float = 5) -> str:
        """The health status once the last prediction has let go of its slot (BUSY lingers a moment)."""
        deadline = time.monotonic() + timeout
        while (status := self.health()["status"]) == "BUSY" and time.monotonic() < deadline:
            time.sleep(0.01)
        return status

    def cancel(self, prediction_id: str) -> int:
        return self.request("POST", f"/predictions/{prediction_id}/cancel", {})[0]

    def worker_pid(self) -> int:
        """The worker process that runs the predictor (the server's child)."""
        children = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            children += (task / "children").read_text().split()
        (pid,) = children
        return int(pid)


def decode_output(uri: str):
    """(PIL image, mime type, raw bytes) of a data-URI output."""
    from PIL import Image

    m = re.match(r"data:([\w/+.-]+);base64,(.*)", uri, re.S)
    assert m, uri[:80]
    raw = base64.b64decode(m[2])
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image, m[1], raw


def input_error(prediction: dict) -> str:
    """The predictor's InputError message inside the server's error text ("Prediction failed: ... InputError: X")."""
    error = prediction.get("error") or ""
    return error.split("InputError: ", 1)[1] if "InputError: " in error else error


# -- the webhook sink -------------------------------------------------------------------------------------
@dataclass
class Event:
    t: float  # time.monotonic() at arrival
    headers: dict
    body: dict


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def ok(self, **headers) -> None:
        """200 with an empty body (and `headers`)."""
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


def serve(handler) -> http.server.ThreadingHTTPServer:
    """`handler` on a loopback port, in a thread of its own (stop it with shutdown() and server_close())."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class WebhookSink:
    """Records every webhook POSTed to it; tests wait on conditions over what arrived."""

    def __init__(self):
        self.events: list[Event] = []
        self.cond = threading.Condition()
        sink = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with sink.cond:
                    sink.events.append(Event(time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body))
                    sink.cond.notify_all()
                self.ok()

        self.server = serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of(self, prediction_id: str) -> list[Event]:
        with self.cond:
            return [e for e in self.events if e.body.get("id") == prediction_id]

    def wait_for(self, prediction_id: str, predicate, timeout: float = 60) -> Event:
        """The first event of the prediction that satisfies predicate(body), waiting for it to arrive."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.events:
                    if e.body.get("id") == prediction_id and predicate(e.body):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [
                        (e.body.get("status"), len(e.body.get("output") or []))
                        for e in self.events
                        if e.body.get("id") == prediction_id
                    ]
                    raise AssertionError(f"no matching webhook for {prediction_id} in {timeout} s; got {seen}")
                self.cond.wait(left)

    def terminal(self, prediction_id: str, timeout: float = 120) -> Event:
        return self.wait_for(prediction_id, lambda b: b.get("status") in TERMINAL, timeout)


class UploadSink:
    """What a Cog server started with `--upload-url <sink.url>` PUTs its output files to: kept by path, answered
    with the URL the server then reports as the output."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.lock = threading.Lock()
        sink = self

        class Handler(QuietHandler):
            def do_PUT(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with sink.lock:
                    sink.files[self.path] = body
                self.ok(Location=f"{sink.base}{self.path}")

        self.server = serve(Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{self.base}/upload/"

    def get(self, url: str) -> bytes:
        """The bytes uploaded to `url` (an output URL the server reported)."""
        assert url.startswith(self.base), url
        with self.lock:
            return self.files[url[len(self.base) :]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the shared server ------------------------------------------------------------------------------------
_shared: dict = {}


def shared_server(tmp_path_factory, config) -> CogServer:
    """The session's server: nginx serves the tiny mirror (scripts/make_tiny_weights.py --mirror), and setup()
    fetches every mode's weights from it into an empty WEIGHTS_DIR, then loads them. Stopped at session end."""
    if "server" in _shared:
        return _shared["server"]
    from lib.testkit.models import write_mirror
    from lib.testkit.servers import Nginx

    base = tmp_path_factory.mktemp("cog-server")
    mirror = base / "mirror"
    write_mirror(mirror)
    nginx = Nginx(mirror, base / "nginx").__enter__()
    config.add_cleanup(lambda: nginx.__exit__(None, None, None))
    weights = base / "weights"  # empty: setup() does a cold start
    env = {
        "WEIGHTS_DIR": str(weights),
        "WEIGHTS_BASE_URL": nginx.url,
        "WEIGHTS_MANIFEST": str(mirror / "manifest.json"),
        "WEIGHTS_OFFLINE": "0",
        "ENABLED_MODES": "",
        "WEBHOOK_AUTH_TOKEN": WEBHOOK_TOKEN,
        "LORA_ALLOW_HTTP": "1",  # style LoRAs (lora_url) from the loopback nginx: the only test switch
        "TMPDIR": str(base / "tmp"),
    }
    (base / "tmp").mkdir()
    server = CogServer(base, env)
    started = time.monotonic()
    server.start()
    server.setup_seconds = time.monotonic() - started
    server.weights_dir, server.mirror, server.files_url = weights, mirror, nginx.url
    config.add_cleanup(server.stop)  # runs before nginx's (cleanups run last-in, first-out)
    _shared["server"] = server
    return server


def write_style_lora(unet_file: Path, out: Path, seed: int) -> Path:
    """A kohya-layout style LoRA (rank 4) for every attention projection of the UNet in `unet_file`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g, tensors = torch.Generator().manual_seed(seed), {}
    with safe_open(unet_file, "pt") as f:
        for key in f.keys():
            if key.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
                rows, cols = f.get_slice(key).get_shape()
                name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
                tensors[f"{name}.lora_down.weight"] = (torch.randn(4, cols, generator=g) * 0.3).half()
                tensors[f"{name}.lora_up.weight"] = (torch.randn(rows, 4, generator=g) * 0.3).half()
                tensors[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out)
    return out


def style_lora_url(server: CogServer) -> str | None:
    """An http URL (nginx) of a style LoRA for the lcm mode's UNet, or None if this Predictor takes no lora_url."""
    import inspect

    from predict import Predictor

    if "lora_url" not in inspect.signature(Predictor.run).parameters:
        return None
    out = server.mirror / "loras" / "style-lcm.safetensors"
    if not out.exists():
        unet = next((server.weights_dir / "SimianLuo/LCM_Dreamshaper_v7/unet").glob("*.safetensors"))
        write_style_lora(unet, out, seed=5)
    return f"{server.files_url}/loras/style-lcm.safetensors"


def __getattr__(name: str):
    """`lib/testkit/cog_server.py:FaultyPredictor` for a server: built on first access, inside the server's worker."""
    if name == "FaultyPredictor":
        return faulty_predictor_class()
    raise AttributeError(name)


def faulty_predictor_class():
    """The project's Predictor plus one test hook: a prompt starting `raise-at-step-N:` makes the UNet raise a
    RuntimeError at its Nth call, inside the denoising loop (as a device fault would), once."""
    from predict import Predictor

    class Faulty(Predictor):
        def setup(self) -> None:
            super().setup()
            self.fault = None
            request = self.engine.request

            def arm(**inputs):
                r = request(**inputs)
                m = re.match(r"raise-at-step-(\d+):", r.prompt)
                self.fault = [int(m[1]), 0] if m else None
                return r

            self.engine.request = arm
            unets = {id(p.unet): p.unet for m in self.engine.modes.values() for p in (m.txt2img, m.img2img)}
            for unet in unets.values():
                unet.register_forward_pre_hook(self._unet_called)

        def _unet_called(self, module, args):
            if self.fault:
                self.fault[1] += 1
                if self.fault[1] == self.fault[0]:
                    self.fault = None
                    raise RuntimeError("injected fault inside the denoising loop")

    return Faulty
