"""Async prediction jobs, the runner's side: read a batch of inputs (JSONL), submit each as an async prediction
to a Cog server or to Replicate with a webhook, record it in the ledger (lib/jobs/ledger.py), resubmit what failed,
wait for the batch. The webhooks go to the receiver (lib/jobs/receiver.py), which shares the ledger.

The webhook URL carries the job: `<webhook>?job=<key>&attempt=<n>`, so the receiver knows which job (and
which attempt of it) a message is about before the runner has even heard back from the server.
"""

from __future__ import annotations

import re
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Callable

import requests

from lib.cog_inputs import SCHEMES
from lib.engine.images import IMAGE_ALLOWED
from lib.engine.inputs import shown
from lib.jobs.ledger import RESUBMITTABLE, SETTLED, Ledger
from lib.jsontext import json_object
from lib.settings import Settings

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
EVENTS = ["start", "output", "logs", "completed"]


class JobsError(Exception):
    """A clear, user-facing error (bad JSONL line, server refused the request, ...)."""


# -- the batch file ---------------------------------------------------------------------------------------
def read_jobs(path: str | Path) -> list[tuple[str, dict]]:
    """(key, input) per non-blank line. A line is {"id": KEY, "input": {...}} or just the input object (its key
    is then line-<n>). Keys name files and URLs: letters, digits, '_', '.', '-'. An `image` is sent as it is, so
    it must be what the server accepts (lib/cog_inputs.py): a URL or a data URI."""
    jobs, keys = [], set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json_object(line)
        except ValueError as e:
            raise JobsError(f"{path}:{n}: {e}") from None
        key, data = (str(obj.get("id") or f"line-{n}"), obj["input"]) if "input" in obj else (f"line-{n}", obj)
        if not isinstance(data, dict) or not KEY_RE.match(key):
            raise JobsError(f"{path}:{n}: 'input' must be an object and 'id' match {KEY_RE.pattern}")
        if key in keys:
            raise JobsError(f"{path}:{n}: id {key!r} is used twice")
        image = data.get("image")
        if image is not None and not (isinstance(image, str) and image.startswith(SCHEMES)):
            raise JobsError(
                f"{path}:{n}: image: {shown(image)} is not a URL or a data URI (the server takes no paths to files); "
                f"allowed: {IMAGE_ALLOWED}"
            )
        keys.add(key)
        jobs.append((key, data))
    return jobs


# -- the runner -------------------------------------------------------------------------------------------
class Busy(Exception):
    """The server has no free slot (a Cog server answers 409) or asks us to slow down (429)."""


class CogBackend:
    """A Cog prediction server (`cog serve`, `python -m cog.server.http`, a Replicate-built image)."""

    name = "cog"
    chooses_id = True

    def __init__(self, url: str, timeout: float = 30):
        self.url, self.timeout = url.rstrip("/"), timeout

    def create(self, prediction_id: str, input: dict, webhook: str) -> str:
        body = {"id": prediction_id, "input": input, "webhook": webhook, "webhook_events_filter": EVENTS}
        try:
            r = requests.post(
                f"{self.url}/predictions", json=body, headers={"Prefer": "respond-async"}, timeout=self.timeout
            )
        except requests.RequestException as e:
            raise Busy(f"cannot reach {self.url}: {e}") from None
        if r.status_code in (409, 429, 503):
            raise Busy(f"{r.status_code} {r.text[:500]}")
        if r.status_code >= 400:
            raise JobsError(f"{self.url}/predictions answered {r.status_code}: {r.text[:500]}")
        return r.json().get("id") or prediction_id


class ReplicateBackend:
    """The Replicate API through the `replicate` client: a model (its latest version), a version or a deployment."""

    name = "replicate"
    chooses_id = False

    def __init__(
        self,
        model: str | None = None,
        version: str | None = None,
        deployment: str | None = None,
        token: str | None = None,
        base_url: str | None = None,
    ):
        import replicate

        if sum(bool(x) for x in (model, version, deployment)) != 1:
            raise JobsError("give exactly one of --model, --version, --deployment")
        token = token or Settings().replicate_api_token
        if not token:
            raise JobsError("REPLICATE_API_TOKEN is not set")
        kw = {"base_url": base_url} if base_url else {}
        self.client = replicate.Client(api_token=token, **kw)
        self.replicate = replicate
        if model and ":" in model:
            model, version = None, model.split(":", 1)[1]
        elif model:  # a pushed model runs by version; official models (no versions exposed) by name
            latest = self.client.models.get(model).latest_version
            model, version = (None, latest.id) if latest else (model, None)
        self.model, self.version, self.deployment = model, version, deployment

    def create(self, prediction_id: str | None, input: dict, webhook: str) -> str:
        target = (
            {"deployment": self.deployment}
            if self.deployment
            else {"model": self.model}
            if self.model
            else {"version": self.version}
        )
        try:
            p = self.client.predictions.create(input=input, webhook=webhook, webhook_events_filter=EVENTS, **target)
        except self.replicate.exceptions.ReplicateError as e:
            if e.status in (429,) or (e.status or 0) >= 500:
                raise Busy(str(e)) from None
            raise JobsError(f"Replicate refused the prediction: {e}") from None
        return p.id


def webhook_url(base: str, key: str, attempt: int) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}{urllib.parse.urlencode({'job': key, 'attempt': attempt})}"


def submit_one(
    ledger: Ledger, backend, key: str, input: dict, webhook: str, patience: float = 600, log: Callable = print
) -> bool:
    """Send one attempt of a job; waits (up to `patience` s) while the server is busy. True if accepted."""
    pid = f"{key}-{secrets.token_hex(4)}" if backend.chooses_id else None
    attempt = ledger.new_attempt(key, pid)
    url = webhook_url(webhook, key, attempt)
    deadline, delay = time.monotonic() + patience, 0.05
    while True:
        try:
            pid = backend.create(pid, input, url)
        except Busy as e:
            if time.monotonic() > deadline:
                ledger.submit_failed(key, attempt, f"server busy for {patience:g} s: {e}")
                log(f"runner: {key}: not accepted: {e}")
                return False
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
            continue
        except JobsError as e:
            ledger.submit_failed(key, attempt, str(e))
            log(f"runner: {key}: {e}")
            return False
        ledger.submitted(key, attempt, pid)
        log(f"runner: {key}: submitted as {pid} (attempt {attempt})")
        return True


def submit_batch(
    ledger: Ledger, backend, jobs: list[tuple[str, dict]], webhook: str, log: Callable = print, patience: float = 600
) -> dict:
    """Add the jobs to the ledger and send those never sent; jobs already in the ledger are left alone."""
    sent = skipped = refused = 0
    for key, data in jobs:
        ledger.add(key, data)
        job = ledger.get(key)
        if job["attempt"] > 0 and job["state"] != "pending":  # pending: a runner died before the server said yes
            skipped += 1
            continue
        if submit_one(ledger, backend, key, job["input"], webhook, patience, log):
            sent += 1
        else:
            refused += 1
    return {"sent": sent, "skipped": skipped, "refused": refused}


def resubmit(
    ledger: Ledger, backend, webhook: str, states=RESUBMITTABLE, log: Callable = print, patience: float = 600
) -> dict:
    """Send a new attempt of every job in `states` (by default the ones that failed, were canceled or refused)."""
    sent = refused = 0
    for job in ledger.jobs(states):
        if submit_one(ledger, backend, job["key"], job["input"], webhook, patience, log):
            sent += 1
        else:
            refused += 1
    return {"sent": sent, "refused": refused}


def wait(
    ledger: Ledger, keys: list[str] | None = None, timeout: float = 3600, poll: float = 0.2, log: Callable = print
) -> dict[str, int]:
    """Until every job (or those in `keys`) is terminal or was refused; returns the state counts."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        jobs = [j for j in ledger.jobs() if keys is None or j["key"] in keys]
        counts: dict[str, int] = {}
        for j in jobs:
            counts[j["state"]] = counts.get(j["state"], 0) + 1
        if counts != last:
            log("jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
            last = counts
        if all(j["state"] in SETTLED for j in jobs) or time.monotonic() > deadline:
            return counts
        time.sleep(poll)
