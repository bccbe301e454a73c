"""Async jobs end to end on loopback: the real Cog server (lib/testkit/cog_server.py) runs the predictions, the runner
(scripts/jobs.py submit/resubmit) sends them with a webhook, the receiver (scripts/jobs.py receive) saves the
images and keeps the SQLite ledger. Also: Replicate's webhook signatures, and the Replicate API path through a
loopback stand-in for api.replicate.com that runs each prediction on the real Cog server."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from lib import ROOT
from lib.jobs.ledger import Ledger
from lib.jobs.receiver import Receiver
from lib.jobs.webhooks import Authenticator, sign, signed_headers, verify_signature
from lib.testkit import replicate
from lib.testkit.cog_server import WEBHOOK_TOKEN, shared_server
from lib.testkit.servers import free_port

SECRET = "whsec_" + base64.b64encode(b"test signing secret, 32 bytes!!").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"somebody else's secret, 32 byte").decode()
JOBS = [
    {"id": "fox", "input": {"prompt": "a fox", "mode": "sd-turbo", "width": 256, "height": 256, "seed": 1}},
    {
        "id": "owl",
        "input": {
            "prompt": "an owl",
            "mode": "lcm",
            "width": 256,
            "height": 320,
            "num_inference_steps": 2,
            "num_outputs": 2,
            "seed": 2,
            "output_format": "png",
        },
    },
    {
        "id": "elk",
        "input": {
            "prompt": "an elk",
            "mode": "lcm-lora-sd15",
            "width": 256,
            "height": 256,
            "seed": 3,
            "output_format": "jpg",
        },
    },
    {"prompt": "a yak", "mode": "sdxl-turbo", "width": 256, "height": 256, "seed": 4},  # no id: key line-4
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, pytestconfig):
    return shared_server(tmp_path_factory, pytestconfig)


def cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/jobs.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class ReceiverProcess:
    """`scripts/jobs.py receive` in its own process group, accepting both signed and bearer webhooks."""

    def __init__(self, tmp: Path):
        self.ledger, self.out, self.port = tmp / "ledger.sqlite", tmp / "images", free_port()
        self.url = f"http://127.0.0.1:{self.port}/webhook"
        self.log = tmp / "receiver.log"
        self.proc = None

    def start(self) -> "ReceiverProcess":
        env = {**os.environ, "REPLICATE_WEBHOOK_SECRET": SECRET, "WEBHOOK_AUTH_TOKEN": WEBHOOK_TOKEN}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "scripts/jobs.py",
                    "--ledger",
                    str(self.ledger),
                    "receive",
                    "--port",
                    str(self.port),
                    "--out",
                    str(self.out),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"receiver not up: {self.log.read_text()}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(10)


@pytest.fixture
def receiver(tmp_path):
    r = ReceiverProcess(tmp_path).start()
    yield r
    r.kill(signal.SIGTERM)


def write_jobs(path: Path, jobs=JOBS) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def assert_complete(ledger: Ledger, jobs=JOBS) -> None:
    """Every job succeeded, with each image on disk in the asked size and format, and its timings."""
    for n, spec in enumerate(jobs, 1):
        key, inp = (spec["id"], spec["input"]) if "input" in spec else (f"line-{n}", spec)
        job = ledger.get(key)
        assert job["state"] == "succeeded", job
        assert len(job["outputs"]) == inp.get("num_outputs", 1)
        fmt = {"webp": "WEBP", "png": "PNG", "jpg": "JPEG"}[inp.get("output_format", "webp")]
        for path in job["outputs"]:
            with Image.open(path) as image:
                assert (image.size, image.format) == ((inp["width"], inp["height"]), fmt), path
        assert job["metrics"]["seeds"][0] == inp["seed"]
        assert set(job["timings"]) >= {"denoising", "steps", "vae_decode", "predict_time", "queue_and_run_seconds"}
        assert "step 1/" in job["logs"] and job["error"] is None and job["input"] == inp


# -- the batch on the real server -----------------------------------------------------------------------------
def test_a_batch_runs_to_completion_with_every_image_on_disk(server, receiver, tmp_path):
    bad = [
        {"id": "bad", "input": {"prompt": "x", "width": 260}},  # fails in the model: not a multiple of 8
        {"id": "refused", "input": {"prompt": "x", "num_outputs": 9}},  # refused by the server's schema
    ]
    batch = write_jobs(tmp_path / "batch.jsonl", JOBS + bad)
    r = cli(
        "--ledger", receiver.ledger, "submit", batch, "--webhook", receiver.url, "--cog-url", server.url, "--wait", 180
    )
    assert r.returncode == 1, r.stdout + r.stderr  # two jobs failed, on purpose
    ledger = Ledger(receiver.ledger)
    assert_complete(ledger)
    failed, refused = ledger.get("bad"), ledger.get("refused")
    assert failed["state"] == "failed" and "width: 260" in failed["error"], failed
    assert refused["state"] == "submit_failed" and "num_outputs" in refused["error"], refused
    assert "9 is greater than the maximum of 8" in refused["error"], refused
    assert ledger.counts() == {"succeeded": 4, "failed": 1, "submit_failed": 1}

    status = cli("--ledger", receiver.ledger, "status")
    assert re.search(r"owl\s+succeeded\s+1\s+2", status.stdout), status.stdout
    assert "6 job(s): 1 failed, 1 submit_failed, 4 succeeded" in status.stdout, status.stdout
    again = cli("--ledger", receiver.ledger, "submit", batch, "--webhook", receiver.url, "--cog-url", server.url)
    assert "submitted 0, already in the ledger 6" in again.stdout, again.stdout  # nothing is sent twice


def test_refused_jobs_are_resubmitted(server, receiver, tmp_path):
    batch = write_jobs(tmp_path / "batch.jsonl", JOBS[:2])
    dead = f"http://127.0.0.1:{free_port()}"
    r = cli(
        "--ledger", receiver.ledger, "submit", batch, "--webhook", receiver.url, "--cog-url", dead, "--patience", 0.3
    )
    assert r.returncode == 1 and "refused 2" in r.stdout, r.stdout + r.stderr
    assert Ledger(receiver.ledger).counts() == {"submit_failed": 2}
    r = cli("--ledger", receiver.ledger, "resubmit", "--webhook", receiver.url, "--cog-url", server.url, "--wait", 120)
    assert r.returncode == 0, r.stdout + r.stderr
    ledger = Ledger(receiver.ledger)
    assert_complete(ledger, JOBS[:2])
    assert [j["attempt"] for j in ledger.jobs()] == [2, 2]


def test_receiver_killed_and_restarted_mid_batch_loses_nothing(server, receiver, tmp_path):
    jobs = [
        {
            "id": f"j{i}",
            "input": {
                "prompt": f"job {i}",
                "mode": "lcm",
                "width": 320,
                "height": 320,
                "num_inference_steps": 3,
                "seed": 100 + i,
            },
        }
        for i in range(6)
    ]
    batch = write_jobs(tmp_path / "batch.jsonl", jobs)
    runner = subprocess.Popen(
        [
            sys.executable,
            "scripts/jobs.py",
            "--ledger",
            str(receiver.ledger),
            "submit",
            str(batch),
            "--webhook",
            receiver.url,
            "--cog-url",
            server.url,
            "--wait",
            "180",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ledger = Ledger(receiver.ledger)
    deadline = time.monotonic() + 120
    while ledger.counts().get("succeeded", 0) < 1:
        assert time.monotonic() < deadline and runner.poll() is None, runner.communicate()[0]
        time.sleep(0.05)
    missed = server.log_tail(10**7).count("Terminal webhook request error")
    receiver.kill(signal.SIGKILL)  # mid-batch: later jobs run while nobody listens
    down = ledger.counts()
    while server.log_tail(10**7).count("Terminal webhook request error") == missed:  # a job ended unheard
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    receiver.start()  # same port, same ledger: the server's retries of terminal webhooks reach it
    out, _ = runner.communicate(timeout=180)
    assert runner.returncode == 0, out
    assert down.get("succeeded", 0) < len(jobs), "the batch finished before the receiver was killed"
    assert_complete(ledger, jobs)


# -- signatures and ordering (receiver in-process) ----------------------------------------------------------------
@pytest.fixture
def local_receiver(tmp_path):
    """A Receiver on a thread, with a job 'cat' in its ledger (attempt 1, prediction p-1)."""
    receiver = Receiver(
        tmp_path / "ledger.sqlite",
        tmp_path / "images",
        Authenticator(secret=SECRET, token=WEBHOOK_TOKEN),
        log=lambda m: None,
    )
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add("cat", {"prompt": "a cat"})
    ledger.submitted("cat", ledger.new_attempt("cat", "p-1"), "p-1")
    srv = receiver.server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/webhook?job=cat&attempt=1"

    def post(body: bytes, headers: dict, query: str | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(
            url if query is None else url.split("?")[0] + "?" + query,
            body,
            {"Content-Type": "application/json", **headers},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    yield post, ledger
    srv.shutdown()
    srv.server_close()


def png_uri(color: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def event(status: str, outputs=(), logs: str = "", **extra) -> bytes:
    body = {"id": "p-1", "status": status, "output": list(outputs) or None, "logs": logs, "metrics": {}, **extra}
    return json.dumps(body).encode()


def test_forged_and_expired_signatures_are_rejected_and_a_resend_is_acknowledged(local_receiver):
    post, ledger = local_receiver
    body = event("processing", logs="step 1/4: 10 ms\n")
    good = signed_headers(SECRET, body)
    rejected = {
        "forged": signed_headers(OTHER_SECRET, body),
        "tampered": {
            **good,
            "webhook-signature": sign(SECRET, good["webhook-id"], good["webhook-timestamp"], body + b" "),
        },
        "expired": signed_headers(SECRET, body, timestamp=int(time.time()) - 301),
        "from the future": signed_headers(SECRET, body, timestamp=int(time.time()) + 301),
        "garbled": {**good, "webhook-signature": "v1,@@@ v2," + good["webhook-signature"][3:]},
        "no signature": {k: v for k, v in good.items() if k != "webhook-signature"},
        "wrong bearer": {"Authorization": "Bearer nope"},
        "nothing": {},
    }
    for name, headers in rejected.items():
        code, answer = post(body, headers)
        assert code == 401, (name, code, answer)
    assert ledger.events() == [] and ledger.get("cat")["state"] == "submitted", "a rejected webhook was stored"

    assert post(body, good) == (200, {"outcome": "applied"})
    assert post(body, good) == (200, {"outcome": "duplicate"})  # resent: acknowledged, not applied again
    assert len(ledger.events()) == 1 and ledger.get("cat")["state"] == "processing"
    # A signature made here is one Replicate's own client accepts, and a multi-signature header (secret
    # rotation) passes when any v1 entry matches.
    from replicate.webhook import Webhooks, WebhookSigningSecret

    Webhooks.validate(headers=good, body=body.decode(), secret=WebhookSigningSecret(key=SECRET), tolerance=300)
    rotated = {
        **good,
        "webhook-signature": signed_headers(OTHER_SECRET, body, good["webhook-id"], int(good["webhook-timestamp"]))[
            "webhook-signature"
        ]
        + " "
        + good["webhook-signature"],
    }
    assert verify_signature(rotated, body, SECRET) == good["webhook-id"]


def test_resends_signed_by_the_standard_webhooks_library_are_acknowledged_and_applied_once(local_receiver):
    """A Standard Webhooks sender (Replicate is one) resends a message with the same webhook-id when it thinks the
    delivery failed: every copy gets a 2xx, the first is applied, the others change nothing."""
    from datetime import datetime, timezone

    from standardwebhooks import Webhook

    post, ledger = local_receiver
    sender = Webhook(SECRET)

    def signed(msg_id: str, body: bytes) -> dict:
        now = datetime.now(tz=timezone.utc)
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": sender.sign(msg_id, now, body.decode()),
        }

    processing = event("processing", [png_uri("red")], "step 1/2\n")
    final = event("succeeded", [png_uri("red"), png_uri("blue")], "step 1/2\nstep 2/2\n", metrics={"predict_time": 0.5})
    for msg_id, body, state in (("msg_processing", processing, "processing"), ("msg_final", final, "succeeded")):
        headers = signed(msg_id, body)
        sender.verify(body, headers)  # the reference library accepts what it signed
        assert post(body, headers) == (200, {"outcome": "applied"})
        before = (ledger.get("cat"), ledger.events())
        for _ in range(2):
            assert post(body, signed(msg_id, body)) == (200, {"outcome": "duplicate"})  # a resend, re-signed
        assert (ledger.get("cat"), ledger.events()) == before and ledger.get("cat")["state"] == state
    job = ledger.get("cat")
    assert [Image.open(p).getpixel((0, 0)) for p in job["outputs"]] == [(255, 0, 0), (0, 0, 255)]
    assert len(ledger.events()) == 2
    # Our own signer and the reference library agree, byte for byte.
    now = int(time.time())
    assert sign(SECRET, "msg_x", now, final) == sender.sign(
        "msg_x", datetime.fromtimestamp(now, timezone.utc), final.decode()
    )


def test_duplicates_are_stored_once_and_late_events_never_overwrite_terminal_ones(local_receiver):
    post, ledger = local_receiver
    bearer = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
    two = [png_uri("red"), png_uri("blue")]
    assert post(event("processing", two[:1], "step 1/2\nstep 2/2\n"), bearer)[1] == {"outcome": "applied"}
    final = event("succeeded", two, "step 1/2\nstep 2/2\n", metrics={"predict_time": 1.5, "seeds": [1, 2]})
    assert post(final, bearer)[1] == {"outcome": "applied"}
    assert post(final, bearer)[1] == {"outcome": "duplicate"}  # a retried terminal webhook
    # Non-terminal events may arrive late (Cog sends them concurrently): they never undo the terminal state.
    assert post(event("processing", two[:1], "step 1/2\n"), bearer)[1] == {"outcome": "late"}
    assert post(event("starting"), bearer)[1] == {"outcome": "late"}
    signed_late = event("processing", logs="late and signed")
    assert post(signed_late, signed_headers(SECRET, signed_late))[1] == {"outcome": "late"}
    # Events about another attempt or another prediction are not this job's.
    assert post(event("failed", error="old"), bearer, "job=cat&attempt=0")[1] == {"outcome": "stale"}
    other = json.dumps({"id": "p-other", "status": "failed", "error": "x"}).encode()
    assert post(other, bearer)[1] == {"outcome": "stale"}
    assert post(event("succeeded"), bearer, "job=dog&attempt=1")[0] == 404

    job = ledger.get("cat")
    assert job["state"] == "succeeded" and job["logs"] == "step 1/2\nstep 2/2\n" and job["error"] is None
    assert [Image.open(p).getpixel((0, 0)) for p in job["outputs"]] == [(255, 0, 0), (0, 0, 255)]
    assert job["timings"]["predict_time"] == 1.5
    assert sum(e["outcome"] == "applied" for e in ledger.events()) == 2
    assert len(ledger.events()) == 7  # the duplicate and the 404 are not stored


def test_the_receiver_never_runs_without_authentication(tmp_path):
    env = {k: "" for k in ("REPLICATE_WEBHOOK_SECRET", "WEBHOOK_AUTH_TOKEN")}
    r = cli("--ledger", tmp_path / "l.sqlite", "receive", "--port", free_port(), env=env, timeout=30)
    assert r.returncode == 2 and "never accepts unauthenticated webhooks" in r.stderr, r.stderr


def test_bad_batch_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    r = cli("--ledger", tmp_path / "l.sqlite", "submit", bad, "--webhook", "http://x", "--cog-url", "http://x")
    assert r.returncode == 2 and f"{bad}:2: not JSON" in r.stderr, r.stderr


@pytest.mark.parametrize("image", ["photo.png", "/etc/hostname", "file:///etc/hostname", 7])
def test_a_batch_file_image_must_be_a_url_or_a_data_uri(tmp_path, image):
    """A path would be sent as it is, and name a file on the server: refused before anything is sent."""
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    batch = tmp_path / "batch.jsonl"
    ok = {"prompt": "a", "image": "data:image/png;base64,iVBORw0KGgo=", "strength": 0.5}
    batch.write_text(json.dumps(ok) + "\n" + json.dumps({"prompt": "b", "image": image}) + "\n")
    r = cli("--ledger", tmp_path / "l.sqlite", "submit", batch, "--webhook", "http://x", "--cog-url", "http://x")
    assert r.returncode == 2, r.stderr
    assert f"{batch}:2: image: {image!r} is not a URL or a data URI" in r.stderr and "allowed: a URL" in r.stderr
    assert not (tmp_path / "l.sqlite").exists() or not Ledger(tmp_path / "l.sqlite").jobs()


# -- the Replicate API path --------------------------------------------------------------------------------------
class ReplicateStandIn:
    """A loopback stand-in for api.replicate.com, just enough for the `replicate` client: model lookup and
    prediction creation (by version or deployment). Each prediction runs on the real Cog server; its webhooks
    are relayed to the prediction's webhook as Replicate sends them: signed with SECRET, outputs as URLs."""

    VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"

    def __init__(self, cog_url: str):
        self.cog_url, self.requests, self.files, self.hooks = cog_url, [], {}, {}
        self.ids = itertools.count(1)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/files/"):
                    data = stand_in.files[self.path]
                    return self._send(200, data, "image/" + self.path.rsplit(".", 1)[1])
                m = re.fullmatch(r"/v1/models/([\w-]+)/([\w-]+)", self.path)
                if m:
                    return self._json(200, replicate.model(m[1], m[2], stand_in.VERSION))
                self._json(404, {"detail": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                if self.path.startswith("/cog-hook/"):
                    code = stand_in.relay(self.path.split("/")[-1], body)
                    return self._json(code, {})
                assert self.headers["Authorization"] == "Bearer r8_test"
                stand_in.requests.append((self.path, body))
                self._json(201, stand_in.create(body, self.path))

            def _json(self, code, obj):
                replicate.send_json(self, code, obj)

            def _send(self, code, data, ctype):
                replicate.send(self, code, data, ctype)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def create(self, body: dict, path: str) -> dict:
        pid = f"rep{next(self.ids)}"
        self.hooks[pid] = (body["webhook"], body)
        req = urllib.request.Request(
            f"{self.cog_url}/predictions",
            json.dumps({"id": pid, "input": body["input"], "webhook": f"{self.url}/cog-hook/{pid}"}).encode(),
            {"Content-Type": "application/json", "Prefer": "respond-async"},
            method="POST",
        )
        while True:  # the Cog server runs one at a time; Replicate queues
            try:
                urllib.request.urlopen(req, timeout=30).read()
                break
            except urllib.error.HTTPError as e:
                assert e.code == 409, e.code
                time.sleep(0.05)
        return self.prediction(pid, {"status": "starting"})

    def prediction(self, pid: str, cog: dict) -> dict:
        _, body = self.hooks[pid]
        return {
            "id": pid,
            "model": "owner/fast-sd",
            "version": body.get("version", self.VERSION),
            "input": body["input"],
            "output": cog.get("output"),
            "logs": cog.get("logs", ""),
            "error": cog.get("error"),
            "status": cog["status"],
            "metrics": cog.get("metrics"),
            "created_at": "2026-11-22T00:00:00Z",
            "started_at": None,
            "completed_at": None,
            "urls": {"get": f"{self.url}/v1/predictions/{pid}", "cancel": f"{self.url}/v1/predictions/{pid}/cancel"},
        }

    def relay(self, pid: str, cog: dict) -> int:
        webhook, body = self.hooks[pid]
        wanted = {"starting": "start", "processing": "output" if cog.get("output") else "logs"}.get(
            cog["status"], "completed"
        )
        if wanted not in body.get("webhook_events_filter", [wanted]):
            return 200
        urls = []
        for i, uri in enumerate(cog.get("output") or []):
            raw = base64.b64decode(uri.split(",", 1)[1])
            name = f"/files/{pid}/out-{i}.{uri[len('data:image/') : uri.index(';')].replace('jpeg', 'jpg')}"
            self.files[name] = raw
            urls.append(self.url + name)
        payload = json.dumps(self.prediction(pid, {**cog, "output": urls or None})).encode()
        req = urllib.request.Request(
            webhook, payload, {"Content-Type": "application/json", **signed_headers(SECRET, payload)}, method="POST"
        )
        try:
            return urllib.request.urlopen(req, timeout=30).status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 503


def test_a_batch_through_the_replicate_api(server, receiver, tmp_path):
    api = ReplicateStandIn(server.url)
    batch = write_jobs(tmp_path / "batch.jsonl", JOBS[:2])
    env = {"REPLICATE_API_TOKEN": "r8_test", "REPLICATE_BASE_URL": api.url}
    r = cli(
        "--ledger",
        receiver.ledger,
        "submit",
        batch,
        "--webhook",
        receiver.url,
        "--model",
        "owner/fast-sd",
        "--wait",
        120,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    ledger = Ledger(receiver.ledger)
    assert_complete(ledger, JOBS[:2])
    assert [j["prediction_id"] for j in ledger.jobs()] == ["rep1", "rep2"]
    path, body = api.requests[0]  # what the `replicate` client sent
    assert path == "/v1/predictions" and body["version"] == ReplicateStandIn.VERSION
    assert body["input"] == JOBS[0]["input"] and body["webhook"].startswith(receiver.url + "?job=fox&attempt=1")
    assert body["webhook_events_filter"] == ["start", "output", "logs", "completed"]
    r = cli(
        "--ledger",
        receiver.ledger,
        "submit",
        write_jobs(tmp_path / "d.jsonl", [JOBS[2]]),
        "--webhook",
        receiver.url,
        "--deployment",
        "owner/fast-sd-prod",
        "--wait",
        120,
        env=env,
    )
    assert r.returncode == 0 and api.requests[-1][0] == "/v1/deployments/owner/fast-sd-prod/predictions", r.stdout
