"""scripts/push.py: the preflight refuses to push unless everything is in place (here: no cog CLI, no Docker
daemon), the steps run in order with stand-ins for cog and docker, --dry-run runs nothing, the .dockerignore
check catches weights headed for the image, and the smoke prediction prints its output URL and timing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lib import ROOT, push
from lib.testkit import replicate


def push_cli(*args, path: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/push.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": path, **(env or {})},
    )


def test_preflight_fails_clearly_without_cog_and_docker(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()  # a PATH with neither cog nor docker, as on this machine
    r = push_cli("--model", "owner/fast-sd", path=str(empty), env={"DOCKER_CONFIG": str(tmp_path)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL cog CLI: the cog CLI is not installed" in r.stdout and "curl -o /usr/local/bin/cog" in r.stdout
    assert "FAIL Docker: Docker is not installed" in r.stdout
    assert "FAIL registry login: not logged in to r8.im: run `cog login`" in r.stdout
    assert "ok   weights out of the image" in r.stdout
    assert "nothing was pushed" in r.stderr


def test_preflight_fails_on_this_machine_as_it_is():
    """With the real PATH: whatever this machine has, cog is missing or Docker is not running here."""
    if push.shutil.which("cog") and push.run(["docker", "info"]).returncode == 0:
        pytest.skip("this machine has the cog CLI and a running Docker")
    r = push_cli("--model", "owner/fast-sd", path=os.environ["PATH"])
    assert r.returncode == 1 and "nothing was pushed" in r.stderr, r.stdout + r.stderr
    assert "FAIL cog CLI" in r.stdout or "FAIL Docker" in r.stdout


def test_a_model_name_is_required():
    r = push_cli(path=os.environ["PATH"])
    assert r.returncode == 2 and "no model name: give --model OWNER/MODEL" in r.stderr
    r = push_cli("--model", "Not A Name", path=os.environ["PATH"])
    assert r.returncode == 2 and "expected OWNER/MODEL" in r.stderr


@pytest.fixture
def fake_tools(tmp_path):
    """cog and docker stand-ins that log their arguments, and a Docker config logged in to r8.im."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool, script in {
        "cog": 'echo "cog $*" >> "$CALLS"; [ "$1" = --version ] && echo "cog version 0.16.9"; exit 0',
        "docker": 'echo "docker $*" >> "$CALLS"; echo 28.0.1',
    }.items():
        p = bin_dir / tool
        p.write_text(f"#!/bin/sh\n{script}\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"r8.im": {"auth": "eA=="}}}))
    env = {"CALLS": str(log), "DOCKER_CONFIG": str(tmp_path)}
    return f"{bin_dir}:/usr/bin:/bin", env, log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_steps_run_in_order_and_red_tests_stop_the_push(fake_tools):
    path, env, log = fake_tools
    r = push_cli("--model", "r8.im/owner/fast-sd", "--test-command", "false", path=path, env=env)
    assert r.returncode == 1 and "the tests are not green" in r.stderr, r.stdout + r.stderr
    assert "cog push r8.im/owner/fast-sd" not in calls(log)
    log.unlink()
    r = push_cli("--model", "owner/fast-sd", "--test-command", "true", path=path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert calls(log) == ["cog --version", "docker info --format {{.ServerVersion}}", "cog push r8.im/owner/fast-sd"]
    assert "ok   push: pushed r8.im/owner/fast-sd" in r.stdout


def test_dry_run_prints_every_step_and_runs_none(fake_tools):
    path, env, log = fake_tools
    r = push_cli("--model", "owner/fast-sd", "--smoke", "--dry-run", path=path, env=env)
    assert r.returncode == 0, r.stderr
    for step in (
        "cog --version",
        "docker info",
        "cog login",
        ".dockerignore",
        "scripts/test.sh",
        "cog push r8.im/owner/fast-sd",
        "smoke prediction",
    ):
        assert step in r.stdout, step
    assert calls(log) == []


def test_dockerignore_check_catches_weights_headed_for_the_image(tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "weights" / "stabilityai").mkdir(parents=True)
    (ctx / "weights" / "stabilityai" / "unet.safetensors").write_bytes(b"\0" * 2**20)
    (ctx / "big.bin").touch()
    os.truncate(ctx / "big.bin", 60 * 2**20)  # sparse: no real disk used
    (ctx / ".dockerignore").write_text(".git/\n")
    problems = push.weight_leaks(ctx)
    assert any("does not exclude the weights cache" in p for p in problems)
    assert any(p.startswith("weights/stabilityai/unet.safetensors") for p in problems)
    assert any(p.startswith("big.bin (60 MiB)") for p in problems)
    # The project's own rules: the cache is out, its manifest stays in, and so does nothing big.
    (ctx / ".dockerignore").write_text((ROOT / ".dockerignore").read_text() + "big.bin\n")
    assert push.weight_leaks(ctx) == []
    rules = push.dockerignore_rules(ROOT)
    assert push.ignored("weights/stabilityai/sd-turbo/unet/x.safetensors", rules)
    assert not push.ignored("weights/manifest.json", rules) and not push.ignored("predict.py", rules)
    assert push.weight_leaks(ROOT) == []


def test_smoke_prediction_prints_output_url_and_timing(fake_tools):
    path, env, _ = fake_tools
    version = "a" * 64
    prediction = {
        "id": "smoke1",
        "model": "owner/fast-sd",
        "version": version,
        "input": push.SMOKE_INPUT,
        "logs": "",
        "error": None,
        "created_at": "2026-11-22T00:00:00Z",
        "started_at": None,
        "completed_at": None,
        "urls": {},
    }

    class Api(BaseHTTPRequestHandler):  # the two calls the smoke step makes, as api.replicate.com answers them
        def do_GET(self):
            if self.path == "/v1/models/owner/fast-sd":
                body = replicate.model("owner", "fast-sd", version)
            else:
                body = {
                    **prediction,
                    "status": "succeeded",
                    "metrics": {"predict_time": 0.42},
                    "output": ["https://replicate.delivery/xezq/out-0-1.webp"],
                }
            self._json(body)

        def do_POST(self):
            assert json.loads(self.rfile.read(int(self.headers["Content-Length"])))["version"] == version
            self._json({**prediction, "status": "starting", "output": None, "metrics": None})

        def _json(self, obj):
            replicate.send_json(self, 200, obj)

        def log_message(self, *args):
            pass

    api = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        r = push_cli(
            "--model",
            "owner/fast-sd",
            "--skip-tests",
            "--smoke",
            path=path,
            env={
                **env,
                "REPLICATE_API_TOKEN": "r8_test",
                "REPLICATE_BASE_URL": f"http://127.0.0.1:{api.server_port}",
                "REPLICATE_POLL_INTERVAL": "0.05",
            },
        )
    finally:
        api.shutdown()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "output: https://replicate.delivery/xezq/out-0-1.webp" in r.stdout
    assert "smoke prediction smoke1 succeeded on version aaaaaaaaaaaa: predict_time 0.42 s" in r.stdout
