"""The weights cache against a loopback stand-in for the Hugging Face Hub (lib/testkit/hub.py): files verified
against what the Hub says of them (ETag, X-Linked-Etag), pins that disagree with the Hub, re-pinning, revisions
pinned to commits, the token kept from the CDN, signed URLs that expire, gated repos, missing files and
revisions, and a Hub that cannot be reached."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lib.engine.modes import all_repos, repo_files
from lib.testkit.hub import FakeHub
from lib.weights.cache import ensure_weights
from lib.weights.download import PinMismatch, Tuning, WeightsError
from lib.weights.manifest import manifest_for_tree, write_manifest

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
FAST = Tuning(connections=4, files=4, chunk_size=1 * MiB, timeout=2.0, retries=2, backoff=0.05, progress_seconds=30)
MODE = "sd-turbo"
REPOS = [r.repo_id for r in all_repos([MODE], safety_checker=True)]  # sd-turbo, its TAESD, the safety checker's
TURBO, TAESD = "stabilityai/sd-turbo", "madebyollin/taesd"
SCHEDULER = "scheduler/scheduler_config.json"
UNET = "unet/diffusion_pytorch_model.fp16.safetensors"
TAESD_WEIGHTS = "diffusion_pytorch_model.safetensors"
TOKEN = "hf_the_right_token"


def entries() -> list[tuple[str, str]]:
    return [(r.repo_id, p) for r in all_repos([MODE], safety_checker=True) for p in repo_files(r)]


class Setup:
    """One test's Hub, manifest (pinning what the Hub serves, unless a test changes it) and cache."""

    def __init__(self, tmp: Path, tiny: Path, **hub):
        self.hub = FakeHub(tiny, REPOS, **hub)
        self.dir, self.manifest, self.lines = tmp / "weights", tmp / "manifest.json", []
        full = manifest_for_tree(tiny)
        write_manifest(self.manifest, {"version": 1, "repos": {r: full["repos"][r] for r in REPOS}})

    def pins(self) -> dict:
        return json.loads(self.manifest.read_text())["repos"]

    def set_pin(self, repo_id: str, path: str, sha256=None, size=None) -> None:
        data = json.loads(self.manifest.read_text())
        data["repos"][repo_id]["files"][path] = {"sha256": sha256, "size": size}
        write_manifest(self.manifest, data)

    def ensure(self, **kw):
        kw = {
            "manifest_path": self.manifest,
            "base_url": self.hub.url,
            "log": self.lines.append,
            "tuning": FAST,
            "safety_checker": True,
            "token": TOKEN,
            **kw,
        }
        return ensure_weights([MODE], self.dir, **kw)

    def lock(self) -> dict:
        return json.loads(self.manifest.with_name("manifest.lock.json").read_text())

    def cached(self, repo_id: str, path: str) -> Path:
        return self.dir / repo_id / path

    def script(self, *args, **env) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "WEIGHTS_MANIFEST": str(self.manifest),
            "WEIGHTS_BASE_URL": self.hub.url,
            "WEIGHTS_DIR": str(self.dir),
            "ENABLED_MODES": MODE,
            "HF_TOKEN": TOKEN,
            **env,
        }
        return subprocess.run(
            [sys.executable, "scripts/weights.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture
def hub(tmp_path, tiny_weights):
    s = Setup(tmp_path, tiny_weights)
    yield s
    s.hub.close()


def test_cold_setup_verifies_every_file_against_the_hub_and_keeps_the_token_from_the_cdn(hub):
    report = hub.ensure()
    assert report["downloaded"] + report["linked"] == len(entries())
    for repo_id, path in entries():
        assert hub.cached(repo_id, path).read_bytes() == hub.hub.file(repo_id, path).data, (repo_id, path)
    # The lock records the commit each repo resolved to, and every download asked for that commit.
    assert {r: hub.lock()["repos"][r]["commit"] for r in REPOS} == {r: hub.hub.head(r) for r in REPOS}
    gets = hub.hub.seen("origin", "GET")
    assert gets and all(f"/resolve/{hub.hub.head(r)}/" in s.path for s in gets for r in REPOS if f"/{r}/" in s.path)
    # LFS files came from the CDN, by GET only and never with the token (it would refuse either).
    cdn = hub.hub.seen("cdn")
    assert {s.method for s in cdn} == {"GET"} and all(s.status in (200, 206) for s in cdn)
    assert all(s.authorization is None for s in cdn)
    assert all(s.authorization == f"Bearer {TOKEN}" for s in hub.hub.seen("origin"))
    assert len({s.path.split("?")[0] for s in cdn}) == len(
        {hub.hub.file(r, p).sha256 for r, p in entries() if p.endswith(".safetensors")}
    )
    # Warm: nothing is asked again.
    hub.hub.log.clear()
    assert hub.ensure()["downloaded"] == 0 and hub.hub.log == []


def test_pins_that_disagree_with_the_hub_name_file_hashes_commit_and_the_command_that_re_pins(hub):
    served = hub.hub.file(TURBO, SCHEDULER)
    crlf = served.data.replace(b"\n", b"\r\n")  # what a CRLF-converted copy of the config would pin
    hub.set_pin(TURBO, SCHEDULER, hashlib.sha256(crlf).hexdigest(), len(crlf))
    hub.set_pin(TAESD, TAESD_WEIGHTS, "c3dbf7eb" * 8, 393854624)  # an LFS file replaced upstream
    with pytest.raises(PinMismatch) as err:
        hub.ensure()
    msg = str(err.value)
    taesd = hub.hub.file(TAESD, TAESD_WEIGHTS)
    for needle in (
        f"repo {TURBO}, file {SCHEDULER}",
        hashlib.sha256(crlf).hexdigest(),
        served.sha256,
        f"{len(crlf)} bytes",
        f"{len(served.data)} bytes",
        f"git blob SHA-1 {served.git_sha1}",
        f"commit {hub.hub.head(TURBO)}",
        f"repo {TAESD}, file {TAESD_WEIGHTS}",
        "c3dbf7eb" * 8,
        taesd.sha256,
        "X-Linked-Etag",
        f"commit {hub.hub.head(TAESD)}",
        f"WEIGHTS_MANIFEST={hub.manifest} python scripts/weights.py pin {TURBO}",
        f"WEIGHTS_MANIFEST={hub.manifest} python scripts/weights.py pin {TAESD}",
    ):
        assert needle in msg, (needle, msg)
    # The LFS pin was contradicted by the Hub's HEAD: that file was never downloaded.
    assert not hub.hub.seen(method="GET", contains=TAESD_WEIGHTS) and not hub.hub.seen("cdn", contains=taesd.sha256)
    assert not hub.cached(TURBO, SCHEDULER).exists() and not hub.cached(TAESD, TAESD_WEIGHTS).exists()
    assert hub.cached(TURBO, UNET).read_bytes() == hub.hub.file(TURBO, UNET).data  # the others are in place

    r = hub.script("pin", TURBO, TAESD)
    assert r.returncode == 0, r.stderr
    pins = hub.pins()
    assert pins[TURBO]["revision"] == hub.hub.head(TURBO) and pins[TAESD]["revision"] == hub.hub.head(TAESD)
    assert pins[TURBO]["files"][SCHEDULER] == {"sha256": served.sha256, "size": len(served.data)}
    assert pins[TAESD]["files"][TAESD_WEIGHTS] == {"sha256": taesd.sha256, "size": len(taesd.data)}
    assert json.loads(r.stdout)[TURBO]["changed"] == [SCHEDULER]
    hub.hub.log.clear()
    report = hub.ensure()
    assert report["downloaded"] == 2, report
    assert hub.cached(TURBO, SCHEDULER).read_bytes() == served.data


@pytest.mark.parametrize("path", ["model_index.json", UNET], ids=["regular", "lfs"])
def test_files_trusted_on_first_download_must_match_what_the_hub_says_of_them(hub, path):
    hub.set_pin(TURBO, path)  # null: nothing pinned
    blob = hub.hub.file(TURBO, path)
    hub.hub.corrupt.add(blob.sha256 if path.endswith(".safetensors") else f"{TURBO}/{path}")
    with pytest.raises(WeightsError) as err:
        hub.ensure()
    msg = str(err.value)
    assert f"repo {TURBO}, file {path}" in msg and "do not match what the server says" in msg
    assert ("X-Linked-Etag" if path.endswith(".safetensors") else f"ETag says {blob.git_sha1}") in msg
    assert not hub.cached(TURBO, path).exists()
    hub.hub.corrupt.clear()
    hub.ensure()
    assert hub.cached(TURBO, path).read_bytes() == blob.data
    assert hub.lock()["repos"][TURBO]["files"][path] == {"sha256": blob.sha256, "size": len(blob.data)}


def test_expired_signed_urls_are_renewed_at_the_origin(tmp_path, tiny_weights):
    s = Setup(tmp_path, tiny_weights, url_ttl=0.25, cdn_rate=4 * MiB)
    try:
        s.ensure(
            tuning=Tuning(
                connections=2, files=1, chunk_size=256 << 10, timeout=5, retries=2, backoff=0.05, progress_seconds=30
            )
        )
        expired = [x for x in s.hub.seen("cdn") if x.status == 403]
        assert expired, "no signed URL outlived its expiry: the test proves nothing"
        assert not [line for line in s.lines if "retry" in line], s.lines  # renewing is not a failure
        for repo_id, path in entries():
            assert s.cached(repo_id, path).read_bytes() == s.hub.file(repo_id, path).data
    finally:
        s.hub.close()


def test_gated_repo_needs_the_token_and_the_cdn_never_sees_it(tmp_path, tiny_weights):
    s = Setup(tmp_path, tiny_weights, gated={TURBO: TOKEN})
    try:
        for token, says in ((None, "HF_TOKEN is not set"), ("hf_wrong", "the token in HF_TOKEN was refused")):
            with pytest.raises(WeightsError) as err:
                s.ensure(token=token)
            msg = str(err.value)
            assert f"repo {TURBO}" in msg and "HTTP 401" in msg and "GatedRepo" in msg and "gated" in msg, msg
            assert says in msg and "Accept its licence" in msg, msg
            assert not s.hub.seen(method="GET"), "the HEAD pass fails before any download"
        s.ensure(token=TOKEN)
        assert all(x.authorization is None for x in s.hub.seen("cdn"))
    finally:
        s.hub.close()


def test_a_file_or_revision_the_hub_does_not_have_is_named(hub):
    hub.hub.push(TURBO, {}, drop=["vae/config.json"])
    with pytest.raises(WeightsError) as err:
        hub.ensure()
    msg = str(err.value)
    assert f"repo {TURBO}, file vae/config.json" in msg and "HTTP 404" in msg and "EntryNotFound" in msg
    assert "not in the repo at this revision" in msg and f"{hub.hub.url}/{TURBO}/resolve/main/vae/config.json" in msg

    data = json.loads(hub.manifest.read_text())
    data["repos"][TURBO]["revision"] = "v9"
    write_manifest(hub.manifest, data)
    with pytest.raises(WeightsError, match="RevisionNotFound.*the revision does not exist"):
        hub.ensure()


def test_pin_pins_revisions_to_commits_and_setup_keeps_to_them(hub):
    first = hub.hub.head(TURBO)
    r = hub.script("pin", TURBO)
    assert r.returncode == 0, r.stderr
    assert hub.pins()[TURBO]["revision"] == first and json.loads(r.stdout)[TURBO]["changed"] == []

    old = hub.hub.file(TURBO, SCHEDULER).data
    second = hub.hub.push(TURBO, {SCHEDULER: old.replace(b"trailing", b"leading")})
    assert second != first
    hub.hub.log.clear()
    hub.ensure()  # pinned to the first commit: the new one changes nothing here
    assert hub.cached(TURBO, SCHEDULER).read_bytes() == old
    assert all(f"/resolve/{first}/" in s.path for s in hub.hub.seen("origin", contains=f"/{TURBO}/"))

    r = hub.script("pin", TURBO, "--revision", "main")  # moving on is one command too
    assert r.returncode == 0, r.stderr
    assert hub.pins()[TURBO]["revision"] == second and json.loads(r.stdout)[TURBO]["changed"] == [SCHEDULER]
    hub.ensure()
    assert hub.cached(TURBO, SCHEDULER).read_bytes() == hub.hub.file(TURBO, SCHEDULER, second).data


def test_pin_refuses_a_server_that_does_not_vouch_for_its_files(hub, tmp_path, tiny_weights):
    # A plain file server (no X-Repo-Commit, no ETags with a meaning) serving the repo cannot re-pin: say so.
    tree = tmp_path / "plain" / TURBO / "resolve"
    tree.mkdir(parents=True)
    (tree / "main").symlink_to(tiny_weights / TURBO)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "plain"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = hub.script("pin", TURBO, WEIGHTS_BASE_URL=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 1 and "pin needs the Hub" in r.stderr, r.stderr


@pytest.mark.parametrize("base", ["https://huggingface.invalid", "http://127.0.0.1:9"], ids=["no-dns", "refused"])
def test_an_unreachable_hub_fails_setup_within_a_minute_with_one_message(tmp_path, base):
    # The real entry point and the real manifest, with the project's default retry settings.
    env = {**os.environ, "WEIGHTS_BASE_URL": base, "WEIGHTS_DIR": str(tmp_path / "weights"), "PYTHONUNBUFFERED": "1"}
    env.pop("WEIGHTS_MANIFEST", None)
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "lib.local", "-i", "prompt=a test", "-i", f"mode={MODE}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert r.returncode == 1 and elapsed < 60, (elapsed, r.stderr[-2000:])
    out = r.stdout + r.stderr
    retries = [line for line in out.splitlines() if "retry" in line]
    assert len(retries) == Tuning().retries, retries  # one line per round, for all waiting files
    reason = "does not resolve" if "invalid" in base else "connection refused"
    assert all(reason in line and "file(s) not reachable" in line for line in retries), retries
    errors = [line for line in out.splitlines() if line.startswith("setup failed:")]
    assert len(errors) == 1 and reason in errors[0] and "WEIGHTS_BASE_URL" in errors[0], out[-2000:]
    assert f"{len(entries())} of {len(entries())} file(s)" in errors[0]  # every file of the mode was waiting


def test_only_the_enabled_modes_and_checker_are_asked_for(hub):
    hub.ensure()
    asked = {s.path.split("/resolve/")[0].lstrip("/") for s in hub.hub.seen("origin")}
    assert asked == set(REPOS), asked
