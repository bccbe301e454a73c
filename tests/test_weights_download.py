"""The weights cache against a real HTTP server: nginx on loopback serving a mirror in the Hub's `resolve`
layout, with faults injected by a proxy in front of it (lib/testkit/servers.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib.engine.modes import MODES, all_repos, repo_files
from lib.testkit.servers import FaultProxy, Nginx
from lib.weights import cache
from lib.weights import manifest as manifests
from lib.weights.cache import Cache, ensure_weights, verify_weights
from lib.weights.download import Tuning, WeightsError

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BIG = "unet/diffusion_pytorch_model.fp16.safetensors"  # sd-turbo's: 80 MiB, the parallel-range path
SHARED = "text_encoder/model.fp16.safetensors"  # same bytes in both repos: stored once
TOFU = "tokenizer/special_tokens_map.json"  # sd-turbo's has no hash in the manifest: trusted on first download
COMMIT = "c0ffee" * 6 + "c0ffee0f"  # what the mirror says sd-turbo's "main" resolves to
FAST = Tuning(connections=4, files=4, chunk_size=16 * MiB, timeout=1.0, retries=2, backoff=0.05, progress_seconds=0.3)
SUB_ENV = {"WEIGHTS_TIMEOUT": "1", "WEIGHTS_RETRIES": "2", "WEIGHTS_CONNECTIONS": "4"}


def _content(repo, path: str, rng: random.Random) -> bytes:
    if path == BIG and repo.repo_id == "stabilityai/sd-turbo":
        return rng.randbytes(80 * MiB)
    if path == SHARED:
        return random.Random("shared").randbytes(3 * MiB)
    if path.endswith(".safetensors"):
        return rng.randbytes(2 * MiB)
    return json.dumps({"repo": repo.repo_id, "path": path}).encode()


@pytest.fixture(scope="session")
def mirror(tmp_path_factory):
    """DIR/<repo_id>/resolve/main/<path> for sd-turbo and sdxl-turbo, and its manifest (all hashes known but
    TOFU's). sd-turbo's tree is also reachable as resolve/<COMMIT> (what the proxy will say main is)."""
    root = tmp_path_factory.mktemp("mirror")
    rng = random.Random(0)
    manifest = {"version": 1, "repos": {}}
    for repo in all_repos(["sd-turbo", "sdxl-turbo"]):
        files = {}
        for path in repo_files(repo):
            data = _content(repo, path, rng)
            out = root / repo.repo_id / "resolve" / "main" / path
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            known = not (repo.repo_id == "stabilityai/sd-turbo" and path == TOFU)
            files[path] = {
                "size": len(data) if known else None,
                "sha256": hashlib.sha256(data).hexdigest() if known else None,
            }
        manifest["repos"][repo.repo_id] = {"revision": "main", "files": files}
    (root / "stabilityai/sd-turbo/resolve" / COMMIT).symlink_to("main")
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="session")
def server(mirror, tmp_path_factory):
    with Nginx(mirror, tmp_path_factory.mktemp("nginx")) as nginx, FaultProxy(nginx.port) as proxy:
        yield proxy


@pytest.fixture
def proxy(server):
    server.reset()
    yield server
    server.reset()


class Env:
    """One test's cache dir, manifest copy (its lock is written beside it) and calls into the cache."""

    def __init__(self, tmp: Path, mirror: Path, proxy: FaultProxy):
        self.dir, self.proxy, self.lines = tmp / "weights", proxy, []
        self.manifest = tmp / "manifest.json"
        self.manifest.write_bytes((mirror / "manifest.json").read_bytes())
        self.expected = {
            f"{r}/{p}": f
            for r, spec in json.loads(self.manifest.read_text())["repos"].items()
            for p, f in spec["files"].items()
        }
        self.mirror = mirror

    def ensure(self, modes=("sd-turbo",), **kw):
        kw = {
            "manifest_path": self.manifest,
            "base_url": self.proxy.url,
            "log": self.lines.append,
            "tuning": FAST,
            **kw,
        }
        return ensure_weights(list(modes), self.dir, **kw)

    def source(self, repo_id: str, path: str) -> bytes:
        return (self.mirror / repo_id / "resolve/main" / path).read_bytes()

    def files(self) -> dict[str, Path]:
        """Every file in the cache outside its bookkeeping folder."""
        return {
            str(p.relative_to(self.dir)): p
            for p in self.dir.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(self.dir).parts
        }

    def assert_only_verified(self, complete_modes=()) -> None:
        """The cache holds only files that match their source; the modes given have all their files."""
        for key, p in self.files().items():
            owner, name, path = key.split("/", 2)
            assert p.read_bytes() == self.source(f"{owner}/{name}", path), f"{key} is not its source's bytes"
        for repo in all_repos(complete_modes):
            for path in repo_files(repo):
                assert f"{repo.repo_id}/{path}" in self.files()
        if complete_modes:
            assert not list((self.dir / ".cache" / "partial").rglob("*.part")), "partials left after success"

    def lock(self) -> dict:
        return json.loads((self.manifest.parent / "manifest.lock.json").read_text())


@pytest.fixture
def env(tmp_path, mirror, proxy):
    return Env(tmp_path, mirror, proxy)


def big_path(env) -> Path:
    return env.dir / "stabilityai/sd-turbo" / BIG


# -- cold, warm, dedup, only-enabled ------------------------------------------------------------------------
def test_cold_setup_fetches_verifies_and_links_then_warm_setup_touches_nothing(env):
    report = env.ensure(["sd-turbo"])
    assert report["downloaded"] == sum(len(repo_files(r)) for r in MODES["sd-turbo"].repos)  # + its TAESD
    assert report["bytes"] > 80 * MiB
    assert not env.proxy.requests(contains="sdxl-turbo"), "only the enabled modes' repos are fetched"
    big_gets = env.proxy.requests("GET", BIG)
    assert len(big_gets) == 5 and all(r.range for r in big_gets), "80 MiB in 16 MiB ranged chunks"
    env.assert_only_verified(["sd-turbo"])
    # The TOFU file's hash is learned into the lock beside the manifest; the commit too.
    learned = env.lock()["repos"]["stabilityai/sd-turbo"]
    assert learned["files"][TOFU]["sha256"] == hashlib.sha256(env.source("stabilityai/sd-turbo", TOFU)).hexdigest()

    # Adding sdxl-turbo: its text encoder has sd-turbo's bytes, so it is a hard link, not a download.
    env.proxy.reset()
    report = env.ensure(["sd-turbo", "sdxl-turbo"])
    assert not env.proxy.requests(contains="stabilityai/sd-turbo/")
    assert not env.proxy.requests(contains=f"sdxl-turbo/resolve/main/{SHARED}")
    assert report["linked"] >= 1
    a, b = env.dir / "stabilityai/sd-turbo" / SHARED, env.dir / "stabilityai/sdxl-turbo" / SHARED
    assert a.stat().st_ino == b.stat().st_ino
    env.assert_only_verified(["sd-turbo", "sdxl-turbo"])

    # Warm: no request, no file rewritten, only stat + markers.
    env.proxy.reset()
    before = {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in env.files().items()}
    report = env.ensure(["sd-turbo", "sdxl-turbo"], base_url="http://127.0.0.1:9")  # nothing listens there
    assert report["downloaded"] == report["linked"] == report["rehashed"] == 0
    assert env.proxy.log == []
    assert {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in env.files().items()} == before
    assert verify_weights(["sd-turbo", "sdxl-turbo"], env.dir, full=True, manifest_path=env.manifest)["problems"] == []


def test_progress_is_logged_every_few_seconds(env):
    env.proxy.add(BIG, method="GET", throttle=30 * MiB)  # ~1 s, progress every 0.3 s
    env.ensure()
    lines = [line for line in env.lines if " of 14 files" in line]  # sd-turbo's 12 + its TAESD's 2
    assert len(lines) >= 2 and all("MB/s" in line and "ETA" in line and "%" in line for line in lines[:-1]), env.lines


def test_same_hash_in_one_run_is_downloaded_once(env):
    env.ensure(["sd-turbo", "sdxl-turbo"])
    assert len(env.proxy.requests("GET", SHARED)) == 1
    a, b = env.dir / "stabilityai/sd-turbo" / SHARED, env.dir / "stabilityai/sdxl-turbo" / SHARED
    assert a.stat().st_ino == b.stat().st_ino
    env.assert_only_verified(["sd-turbo", "sdxl-turbo"])


def test_lost_marker_rehashes_instead_of_downloading_and_full_verify_finds_bit_rot(env):
    env.ensure()
    cache, e = Cache(env.dir), _entry(env, BIG)
    cache.marker(e).unlink()
    env.proxy.reset()
    assert env.ensure()["rehashed"] == 1 and env.proxy.log == []

    # Flip a byte in place, keeping size and mtime: the cheap check cannot see it, a full verify does.
    p, st = big_path(env), big_path(env).stat()
    with open(p, "r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_weights(["sd-turbo"], env.dir, manifest_path=env.manifest)["problems"] == []
    problems = verify_weights(["sd-turbo"], env.dir, full=True, manifest_path=env.manifest)["problems"]
    assert len(problems) == 1 and BIG in problems[0] and "sha256" in problems[0]
    # The full verify dropped its marker, so the next setup fetches it again.
    assert env.ensure()["downloaded"] == 1
    env.assert_only_verified(["sd-turbo"])


def _entry(env, path, repo_id="stabilityai/sd-turbo"):
    return next(
        e
        for e in manifests.plan(
            ["sd-turbo", "sdxl-turbo"],
            manifests.load_manifest(env.manifest),
            manifests.Lock(manifests.lock_path(env.manifest)),
            env.manifest,
        )
        if e.path == path and e.repo_id == repo_id
    )


# -- faults ----------------------------------------------------------------------------------------------------
def test_connection_cut_mid_file_resumes_and_ends_verified(env):
    env.proxy.add(BIG, method="GET", cut_after=5 * MiB + 123, times=2)
    env.ensure()
    starts = [int(r.range.split("=")[1].split("-")[0]) for r in env.proxy.requests("GET", BIG)]
    assert any(s % (16 * MiB) for s in starts), "a retry resumed mid-chunk instead of starting over"
    env.assert_only_verified(["sd-turbo"])


def test_server_errors_are_retried(env):
    env.proxy.add(BIG, method="GET", status=503, times=2)
    env.proxy.add("model_index.json", method="HEAD", status=500, times=1)
    env.ensure()
    assert any("HTTP 503" in line and "retry" in line for line in env.lines)
    env.assert_only_verified(["sd-turbo"])


def test_one_corrupted_byte_is_detected_and_refetched(env):
    env.proxy.add(BIG, method="GET", flip_at=40 * MiB + 7, range_from=32 * MiB, times=1)
    env.ensure()
    assert any("sha256 mismatch" in line for line in env.lines)
    env.assert_only_verified(["sd-turbo"])


def test_corruption_that_stays_is_a_clear_error_and_leaves_no_bad_file(env):
    env.proxy.add(BIG, method="GET", flip_at=1000)
    with pytest.raises(WeightsError) as err:
        env.ensure()
    msg = str(err.value)
    assert "stabilityai/sd-turbo" in msg and BIG in msg and f"{env.proxy.url}/stabilityai/sd-turbo/resolve/" in msg
    assert "sha256 mismatch" in msg
    assert not big_path(env).exists()
    assert not list((env.dir / ".cache/partial").rglob(f"*{Path(BIG).name}*"))
    env.assert_only_verified()


@pytest.mark.parametrize("status", [404, 401])
def test_404_and_401_name_repo_file_and_url(env, status):
    path = "vae/config.json"
    env.proxy.add(f"sd-turbo/resolve/main/{path}", status=status)
    with pytest.raises(WeightsError) as err:
        env.ensure(token="hf_secret" if status == 401 else None)
    msg = str(err.value)
    assert f"repo stabilityai/sd-turbo, file {path}" in msg
    assert f"{env.proxy.url}/stabilityai/sd-turbo/resolve/main/{path}" in msg and f"HTTP {status}" in msg
    if status == 401:
        assert "HF_TOKEN" in msg and "refused" in msg
        assert {r.authorization for r in env.proxy.log} == {"Bearer hf_secret"}
    assert not env.proxy.requests("GET"), "the HEAD pass fails before any download"
    env.assert_only_verified()


def test_a_stall_is_retried_and_a_dead_server_is_a_clear_error(env):
    env.proxy.add(BIG, method="GET", stall=5, stall_at=3 * MiB, times=1)
    env.ensure()
    assert any("stalled" in line for line in env.lines)
    env.assert_only_verified(["sd-turbo"])

    big_path(env).unlink()
    env.proxy.reset()
    env.proxy.add(BIG, method="GET", stall=10)
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as err:
        env.ensure()
    assert time.monotonic() - t0 < 8
    msg = str(err.value)
    assert "stalled" in msg and "3 failed attempts" in msg and BIG in msg and env.proxy.url in msg
    env.assert_only_verified()


def test_not_enough_disk_fails_before_any_download(env, monkeypatch):
    monkeypatch.setattr(cache, "free_bytes", lambda path: 50 * MiB)
    with pytest.raises(WeightsError) as err:
        env.ensure()
    msg = str(err.value)
    assert "not enough disk space" in msg and str(env.dir) in msg and "50.00 MB free" not in msg
    assert "52.43 MB free" in msg and "14 files need 91.23 MB" in msg  # sd-turbo's 12 + its TAESD's 2
    assert env.proxy.requests("HEAD") and not env.proxy.requests("GET")
    assert env.files() == {}


def test_commit_is_pinned_in_the_lock_and_later_fetches_use_it(env):
    env.proxy.add("sd-turbo/resolve/main/", method="HEAD", headers={"X-Repo-Commit": COMMIT})
    env.ensure()
    assert env.lock()["repos"]["stabilityai/sd-turbo"]["commit"] == COMMIT
    gets = [r for r in env.proxy.requests("GET") if r.path.startswith("/stabilityai/sd-turbo/")]
    assert gets and all(f"/resolve/{COMMIT}/" in r.path for r in gets)
    env.proxy.reset()
    (env.dir / "stabilityai/sd-turbo/vae/config.json").unlink()
    env.ensure()
    assert [r.path for r in env.proxy.log] == [f"/stabilityai/sd-turbo/resolve/{COMMIT}/vae/config.json"] * 2


def test_hash_learned_on_first_download_is_enforced_later(env):
    env.ensure()
    assert env.lock()["repos"]["stabilityai/sd-turbo"]["files"][TOFU]["sha256"]
    (env.dir / "stabilityai/sd-turbo" / TOFU).unlink()
    env.proxy.add(TOFU, method="GET", flip_at=3)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        env.ensure()


def test_offline_only_checks_presence(env, monkeypatch):
    monkeypatch.setenv("WEIGHTS_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        env.ensure()
    assert "WEIGHTS_OFFLINE" in str(err.value) and f"stabilityai/sd-turbo/{BIG}" in str(err.value)
    monkeypatch.delenv("WEIGHTS_OFFLINE")
    env.ensure()
    env.proxy.reset()
    monkeypatch.setenv("WEIGHTS_OFFLINE", "1")
    assert env.ensure()["downloaded"] == 0 and env.proxy.log == []


# -- several processes -------------------------------------------------------------------------------------
def _spawn(env, *extra_env) -> subprocess.Popen:
    code = (
        "import sys; from lib.weights.cache import ensure_weights; "
        "ensure_weights(['sd-turbo'], sys.argv[1], manifest_path=sys.argv[2], base_url=sys.argv[3])"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(env.dir), str(env.manifest), env.proxy.url],
        cwd=ROOT,
        env={**os.environ, **SUB_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_processes_at_once_download_once_and_both_succeed(env):
    env.proxy.add(BIG, method="GET", throttle=20 * MiB)  # keeps the first one busy while the second starts
    procs = [_spawn(env), _spawn(env)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert any("another process" in out for out in outs)
    assert sum(r.sent for r in env.proxy.requests("GET", BIG)) == 80 * MiB, "each byte fetched once"
    env.assert_only_verified(["sd-turbo"])


def test_process_killed_mid_download_resumes_on_restart(env):
    env.proxy.add(BIG, method="GET", throttle=8 * MiB)  # 3 chunks of 32/32/16 MiB: the last lands first
    proc = _spawn(env)
    sidecar = env.dir / ".cache/partial/stabilityai/sd-turbo" / f"{BIG}.part.json"
    deadline = time.monotonic() + 30
    while not (sidecar.exists() and json.loads(sidecar.read_text())["done"]):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not big_path(env).exists()
    env.assert_only_verified()

    env.proxy.reset()
    proc = _spawn(env)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "resuming" in out
    assert sum(r.sent for r in env.proxy.requests("GET", BIG)) <= 64 * MiB, "the finished chunk was kept"
    env.assert_only_verified(["sd-turbo"])


# -- operator script ---------------------------------------------------------------------------------------
def _script(env, *args, **extra) -> subprocess.CompletedProcess:
    e = {
        **os.environ,
        **SUB_ENV,
        "WEIGHTS_DIR": str(env.dir),
        "WEIGHTS_MANIFEST": str(env.manifest),
        "WEIGHTS_BASE_URL": env.proxy.url,
        "SAFETY_CHECKER": "0",
        **extra,
    }  # the test mirror has no SD 1.5
    return subprocess.run(
        [sys.executable, "scripts/weights.py", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60
    )


def test_operator_script_fetch_status_verify_and_mirror(env, tmp_path):
    r = _script(env, "verify", "--modes", "sd-turbo")
    assert r.returncode == 1 and "missing" in r.stdout
    r = _script(env, "fetch", "--modes", "sd-turbo")
    assert r.returncode == 0, r.stderr
    r = _script(env, "status", "--modes", "sd-turbo")
    assert "stabilityai/sd-turbo @ main: 12 verified, 0 unverified, 0 missing of 12" in r.stdout, r.stdout
    r = _script(env, "verify", "--full", "--modes", "sd-turbo")
    assert r.returncode == 0 and "0 problem(s) (full rehash)" in r.stdout, r.stdout

    # mirror: the loopback server stands in for the Hub; it says sd-turbo's main is COMMIT.
    env.proxy.add("sd-turbo/resolve/main/", method="HEAD", headers={"X-Repo-Commit": COMMIT})
    out = tmp_path / "bucket"
    r = _script(env, "mirror", str(out), "--modes", "sd-turbo", "sdxl-turbo")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed == json.loads((out / "manifest.json").read_text())
    assert printed["repos"]["stabilityai/sd-turbo"]["revision"] == COMMIT
    for repo_id, spec in printed["repos"].items():
        for path, f in spec["files"].items():
            data = (out / repo_id / "resolve" / spec["revision"] / path).read_bytes()
            assert f == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            assert data == env.source(repo_id, path)


@pytest.mark.parametrize("command", ["fetch", "verify", "status", "pin"])
def test_an_unknown_mode_is_refused_naming_the_modes(env, command):
    r = _script(env, command, "--modes", "bogus")
    assert r.returncode == 2 and "argument --modes: invalid choice: 'bogus' (choose from 'sdxl-turbo'" in r.stderr
    assert "Traceback" not in r.stderr


def test_script_reports_errors_without_a_traceback(env):
    env.proxy.add("model_index.json", status=404)
    r = _script(env, "fetch", "--modes", "sd-turbo")
    assert r.returncode == 1 and r.stderr.startswith("error: repo stabilityai/sd-turbo, file model_index.json")


# -- the tracked manifest -------------------------------------------------------------------------------------
def test_tracked_manifest_lists_every_file_the_modes_load():
    manifest = manifests.load_manifest(manifests.DEFAULT_MANIFEST)
    for repo in all_repos(MODES, safety_checker=True):
        assert sorted(manifest["repos"][repo.repo_id]["files"]) == sorted(repo_files(repo)), repo.repo_id
    # The SDXL text encoders of sdxl-turbo and sdxl-base are one file: the cache stores it once.
    turbo, base = (
        manifest["repos"][r]["files"]["text_encoder_2/model.fp16.safetensors"]["sha256"]
        for r in ("stabilityai/sdxl-turbo", "stabilityai/stable-diffusion-xl-base-1.0")
    )
    assert turbo == base is not None


def test_tracked_manifest_is_what_the_generator_makes():
    from lib.weights.cli import build_manifest

    tracked = manifests.load_manifest(manifests.DEFAULT_MANIFEST)
    assert build_manifest(tracked) == tracked


CONFIGS = ROOT / "lib" / "configs"


def test_no_shipped_config_has_crlf_line_endings():
    """The Hub serves these files with LF: a copy with CRLF has other bytes, other sizes and other hashes."""
    shipped = [p for p in CONFIGS.rglob("*") if p.is_file()]
    assert len(shipped) > 40
    crlf = [str(p.relative_to(CONFIGS)) for p in shipped if b"\r" in p.read_bytes()]
    assert crlf == []


def test_every_pinned_small_file_hash_is_the_shipped_files():
    """A pinned config must be the file shipped in lib/configs, byte for byte (the tiny models are built from
    those files, so a pin that only agrees with itself would go unnoticed)."""
    checked, unshipped = 0, set()
    for repo_id, spec in manifests.load_manifest(manifests.DEFAULT_MANIFEST)["repos"].items():
        for path, pin in spec["files"].items():
            shipped = CONFIGS / repo_id / path
            if path.endswith(".safetensors") or pin["sha256"] is None:
                continue
            if not shipped.is_file():
                unshipped.add(Path(path).name)
                continue
            data = shipped.read_bytes()
            assert (hashlib.sha256(data).hexdigest(), len(data)) == (pin["sha256"], pin["size"]), (repo_id, path)
            checked += 1
    assert checked >= 36
    assert unshipped == {"vocab.json", "merges.txt"}  # the tokenizers' BPE tables: not configs, not shipped


# -- the tiny models as a mirror: what setup() does on a fresh machine ----------------------------------------
@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory):
    from lib.testkit.models import write_mirror

    root = tmp_path_factory.mktemp("tiny-mirror")
    write_mirror(root)
    return root


def test_cold_setup_from_the_tiny_mirror_fetches_every_mode_and_diffusers_loads_it(tiny_mirror, tmp_path, monkeypatch):
    import torch
    from diffusers import StableDiffusionPipeline

    cache = tmp_path / "weights"
    with Nginx(tiny_mirror, tmp_path / "nginx") as nginx:
        monkeypatch.setenv("WEIGHTS_BASE_URL", nginx.url)
        monkeypatch.setenv("WEIGHTS_MANIFEST", str(tiny_mirror / "manifest.json"))
        report = ensure_weights(list(MODES), cache, log=lambda line: None, tuning=FAST)
    needed = [(r.repo_id, p) for r in all_repos(MODES) for p in repo_files(r)]
    assert report["files"] == len(needed) == report["downloaded"] + report["linked"]
    assert report["linked"] > 0  # the SDXL text encoders (and tokenizer files) are stored once
    turbo, base = (
        cache / r / "text_encoder_2/model.fp16.safetensors"
        for r in ("stabilityai/sdxl-turbo", "stabilityai/stable-diffusion-xl-base-1.0")
    )
    assert turbo.stat().st_ino == base.stat().st_ino
    assert verify_weights(list(MODES), cache, full=True)["problems"] == []
    assert not (tiny_mirror / "manifest.lock.json").exists(), "every hash was known: nothing to learn"

    pipe = StableDiffusionPipeline.from_pretrained(
        cache / "stabilityai/sd-turbo", variant="fp16", dtype=torch.float32, local_files_only=True
    )
    images = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_one_weights_dir_default_for_setup_the_operator_script_and_the_lora_cache(tmp_path, monkeypatch):
    """Unset WEIGHTS_DIR means the project's weights/ folder, whatever the working directory."""
    from lib.settings import Settings

    monkeypatch.delenv("WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("LORA_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert Settings().weights_dir == ROOT / "weights" == manifests.DEFAULT_MANIFEST.parent
    assert Settings().lora_cache_dir == ROOT / "weights" / ".loras"
    env = {k: v for k, v in os.environ.items() if k not in ("WEIGHTS_DIR", "WEIGHTS_MANIFEST")}
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/weights.py"), "status", "--modes", "sd-turbo"],
        cwd=tmp_path,
        env={**env, "SAFETY_CHECKER": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.startswith(f"cache {ROOT / 'weights'}, manifest {manifests.DEFAULT_MANIFEST}")
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "w"))
    assert Settings().weights_dir == tmp_path / "w" and Settings().lora_cache_dir == tmp_path / "w" / ".loras"
