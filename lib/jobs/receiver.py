"""The webhook receiver of async jobs: authenticates each webhook (lib/jobs/webhooks.py), saves the output images
(out_dir/<job>/<index>.<ext>, atomically and durably) and applies the event to the ledger (lib/jobs/ledger.py).
The webhook URL carries the job: `<webhook>?job=<key>&attempt=<n>` (lib/jobs/runner.py builds it).
"""

from __future__ import annotations

import base64
import binascii
import http.server
import json
import mimetypes
import re
import threading
import urllib.parse
from pathlib import Path
from typing import Callable

import requests

from lib.atomic import write_atomically
from lib.jobs.ledger import TERMINAL, Ledger
from lib.jobs.webhooks import Authenticator, AuthError

MAX_BODY = 512 * 2**20  # 8 lossless 2048x2048 images as data URIs fit easily
EXTENSIONS = {"image/webp": "webp", "image/jpeg": "jpg", "image/png": "png"}


# -- saving outputs ---------------------------------------------------------------------------------------
def fetch_output(value: str, timeout: float = 120) -> tuple[bytes, str]:
    """An output's bytes and file extension: a data URI (a Cog server without --upload-url) or a URL (Replicate)."""
    if value.startswith("data:"):
        header, _, data = value.partition(",")
        mime = header[5:].split(";")[0]
        try:
            body = base64.b64decode(data, validate=True) if ";base64" in header else urllib.parse.unquote_to_bytes(data)
        except binascii.Error as e:
            raise ValueError(f"output data URI is not valid base64: {e}") from None
        return body, EXTENSIONS.get(mime) or (mimetypes.guess_extension(mime) or ".bin").lstrip(".")
    if value.startswith(("https://", "http://")):
        r = requests.get(value, timeout=timeout)
        r.raise_for_status()
        body, mime = r.content, r.headers.get("Content-Type", "").split(";")[0].strip()
        ext = Path(urllib.parse.urlparse(value).path).suffix.lstrip(".").lower()
        return body, ext if re.fullmatch(r"[a-z0-9]{1,5}", ext) else EXTENSIONS.get(mime, "bin")
    raise ValueError(f"output {value[:60]!r} is neither a data URI nor a URL")


# -- the receiver -----------------------------------------------------------------------------------------
class Receiver:
    """Applies authenticated webhook messages to the ledger; output images go to out_dir/<job>/<index>.<ext>."""

    def __init__(self, ledger_path: str | Path, out_dir: str | Path, auth: Authenticator, log: Callable = print):
        self.ledger_path, self.out_dir, self.auth, self.log = Path(ledger_path), Path(out_dir), auth, log
        self.local = threading.local()
        Ledger(self.ledger_path).close()  # create the schema once, up front

    @property
    def ledger(self) -> Ledger:
        if not hasattr(self.local, "ledger"):
            self.local.ledger = Ledger(self.ledger_path)
        return self.local.ledger

    def handle(self, query: dict, headers, body: bytes) -> tuple[int, dict]:
        """(HTTP status, JSON answer) for one POST. Nothing is stored unless it is authenticated."""
        try:
            dedup = self.auth.check(headers, body)
        except AuthError as e:
            return 401, {"error": str(e)}
        try:
            payload = json.loads(body)
            key, attempt = query["job"][0], int(query["attempt"][0])
            status = payload["status"]
        except (ValueError, KeyError, IndexError, TypeError):
            return 400, {"error": "expected ?job=KEY&attempt=N and a JSON prediction with a status"}
        ledger = self.ledger
        if ledger.seen(dedup):
            # Already applied: a sender resends (same webhook-id) when it thinks a delivery failed. Standard
            # Webhooks asks for a 2xx, else it retries until it gives up and marks the delivery failed.
            return 200, {"outcome": "duplicate"}
        job = ledger.get(key)
        if job is None:
            return 404, {"error": f"no job {key!r} in the ledger"}
        files = {}
        if attempt == job["attempt"] and job["state"] not in TERMINAL:
            try:
                files = self._save_outputs(key, payload.get("output"), job["outputs"])
            except (OSError, ValueError, requests.RequestException) as e:
                # 5xx: the sender retries (a Cog server retries terminal webhooks; Replicate retries all).
                self.log(f"receiver: job {key}: could not save an output ({e}); asking for a retry")
                return 503, {"error": f"could not save an output: {e}"}
        outcome = ledger.apply(key, attempt, dedup, payload, files)
        if outcome == "applied" and status in TERMINAL:
            self.log(f"receiver: job {key} {status}" + (f": {payload.get('error')}" if payload.get("error") else ""))
        return 200, {"outcome": outcome}

    def _save_outputs(self, key: str, output, have: list) -> dict[int, str]:
        values = output if isinstance(output, list) else [] if output is None else [output]
        files = {}
        for i, value in enumerate(values):
            if not isinstance(value, str) or (i < len(have) and have[i] and Path(have[i]).is_file()):
                continue
            data, ext = fetch_output(value)
            path = self.out_dir / key / f"{i}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, data, durable=True)  # a crash leaves the old file or the new one
            files[i] = str(path)
        return files

    def server(self, host: str = "127.0.0.1", port: int = 0) -> http.server.ThreadingHTTPServer:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                url = urllib.parse.urlparse(self.path)
                length = int(self.headers.get("content-length") or 0)
                if length > MAX_BODY:
                    self.close_connection = True  # the body stays unread
                    return self._answer(413, {"error": "body too large"})
                body = self.rfile.read(length)
                if url.path.rstrip("/") not in ("", "/webhook", "/hook"):
                    return self._answer(404, {"error": "POST webhooks to /webhook"})
                self._answer(*receiver.handle(urllib.parse.parse_qs(url.query), self.headers, body))

            def do_GET(self):
                if urllib.parse.urlparse(self.path).path == "/health":
                    return self._answer(200, {"status": "ok", "jobs": receiver.ledger.counts()})
                self._answer(404, {"error": "not found"})

            def _answer(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt, *args):
                pass

        srv = http.server.ThreadingHTTPServer((host, port), Handler)
        srv.daemon_threads = True
        return srv
