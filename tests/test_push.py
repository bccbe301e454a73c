"""scripts/push.py: it prints the plan (image, modes, bytes, estimated boot, pinned commits), refuses what would fail
after a multi-GB build (each refusal here, with its fix in the message), runs the steps in order with a stand-in
`cog` on PATH and a stand-in Replicate API, and pushes a config that sets the modes in the image's environment."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lib import ROOT, boot_plan, push
from lib.engine.modes import MODES
from lib.testkit import replicate
from lib.weights.manifest import load_manifest, write_manifest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def push_cli(*args, path: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/push.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": path, **(env or {})},
    )


@pytest.fixture
def pinned_manifest(tmp_path) -> Path:
    """The project's manifest with every revision pinned to a commit (as `scripts/weights.py pin` leaves it)."""
    manifest = load_manifest(ROOT / "weights/manifest.json")
    for spec in manifest["repos"].values():
        if not boot_plan.COMMIT.fullmatch(spec["revision"]):
            spec["revision"] = COMMIT
    path = tmp_path / "manifest" / "manifest.json"
    path.parent.mkdir()
    write_manifest(path, manifest)
    return path


class Api(BaseHTTPRequestHandler):
    """api.replicate.com as the push script meets it: owner/fast-sd exists (its latest version `VERSION`),
    nothing else does; a smoke prediction succeeds."""

    VERSION = "a" * 64
    PREDICTION = {
        "id": "smoke1",
        "model": "owner/fast-sd",
        "version": VERSION,
        "input": {},
        "logs": "",
        "error": None,
        "created_at": "2026-11-22T00:00:00Z",
        "started_at": None,
        "completed_at": None,
        "urls": {},
    }

    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer r8_test":
            return replicate.send_json(self, 401, {"detail": "Unauthenticated"})
        if self.path == "/v1/models/owner/fast-sd":
            return replicate.send_json(self, 200, replicate.model("owner", "fast-sd", self.VERSION))
        if self.path.startswith("/v1/models/"):
            return replicate.send_json(self, 404, {"detail": "Not found"})
        body = {**self.PREDICTION, "status": "succeeded", "metrics": {"predict_time": 0.42}}
        replicate.send_json(self, 200, {**body, "output": ["https://replicate.delivery/xezq/out-0-1.webp"]})

    def do_POST(self):
        sent = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert sent["version"] == self.VERSION and sent["input"]["mode"] == "sd-turbo", sent
        replicate.send_json(self, 200, {**self.PREDICTION, "status": "starting", "output": None, "metrics": None})

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def fake_tools(tmp_path, pinned_manifest, api):
    """cog and docker stand-ins that log their arguments (`cog push` also logs the config and .dockerignore it
    finds), a Docker config logged in to r8.im, a pinned manifest and the API stand-in: everything in place."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    cog = f"""echo "cog $*" >> "$CALLS"
case "$1" in
  --version) echo "cog version ${{FAKE_COG_VERSION:-{push.COG_VERSION}}} (built 2026-11-30)";;
  doctor) [ -n "$FAKE_DOCTOR_PROBLEM" ] && {{ echo "$FAKE_DOCTOR_PROBLEM"; exit 1; }};;
  push) cat cog.push.yaml >> "$CALLS"; grep -c '^!weights/.*/' .dockerignore >> "$CALLS";;
esac
exit 0"""
    for tool, script in {"cog": cog, "docker": 'echo "docker $*" >> "$CALLS"; echo 28.0.1'}.items():
        p = bin_dir / tool
        p.write_text(f"#!/bin/sh\n{script}\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"r8.im": {"auth": "eA=="}}}))
    env = {
        "CALLS": str(log),
        "DOCKER_CONFIG": str(tmp_path),
        "WEIGHTS_MANIFEST": str(pinned_manifest),
        "REPLICATE_API_TOKEN": "r8_test",
        "REPLICATE_BASE_URL": api,
        "REPLICATE_POLL_INTERVAL": "0.05",
    }
    return f"{bin_dir}:/usr/bin:/bin", env, log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


# -- the plan ---------------------------------------------------------------------------------------------------
def test_dry_run_prints_the_plan_and_runs_nothing(fake_tools, pinned_manifest):
    path, env, log = fake_tools
    r = push_cli("--model", "owner/fast-sd", "--modes", "sd-turbo", "--smoke", "--dry-run", path=path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    plan = boot_plan.make(["sd-turbo"], manifest_path=pinned_manifest)
    out = r.stdout
    assert "image: r8.im/owner/fast-sd" in out
    assert "modes: sd-turbo (ENABLED_MODES in the image)" in out
    assert f"weights: {plan.files} files, {boot_plan.gb(plan.download_bytes)}" in out
    assert f"about {plan.boot_s:.0f} s of Replicate's 600 s boot limit" in out
    for repo in ("stabilityai/sd-turbo", "madebyollin/taesd", "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        pinned = load_manifest(pinned_manifest)["repos"][repo]["revision"]
        assert f"  {repo}: {pinned}" in out
    for step in ("ok   boot fits", "ok   revisions pinned", "ok   static schema", "ok   build context"):
        assert step in out, step
    for step in ("cog --version (must be 0.23.1)", "cog doctor", "docker info", "cog login", "scripts/test.sh"):
        assert step in out, step
    assert "cog push r8.im/owner/fast-sd -f cog.push.yaml" in out and "smoke prediction" in out
    assert calls(log) == []


def test_the_plan_counts_each_file_once_and_the_estimate_follows_the_bandwidth(pinned_manifest):
    one = boot_plan.make(["sdxl-turbo"], manifest_path=pinned_manifest)
    both = boot_plan.make(["sdxl-turbo", "lcm-lora-sdxl"], manifest_path=pinned_manifest)
    base = boot_plan.make(["lcm-lora-sdxl"], manifest_path=pinned_manifest)
    # The same files in both: SDXL Turbo's and SDXL base's text encoders, the safety checker, TAESDXL: fetched once.
    shared = 246144152 + 1389382176 + 608018440 + 9793292
    assert shared <= one.download_bytes + base.download_bytes - both.download_bytes < shared + 10**7
    slow = boot_plan.make(["sdxl-turbo"], bandwidth=10e6, manifest_path=pinned_manifest)
    assert slow.download_s == pytest.approx(10 * one.download_s)
    assert boot_plan.make(["sdxl-turbo"], baked=True, manifest_path=pinned_manifest).download_s == 0


def test_docs_list_each_modes_bytes_and_boot():
    assert boot_plan.families_table() in (ROOT / "docs/serving.md").read_text()


# -- refusals -----------------------------------------------------------------------------------------------------
def test_a_model_name_and_known_modes_are_required(fake_tools):
    path, env, _ = fake_tools
    r = push_cli("--modes", "sd-turbo", path=path, env=env)
    assert r.returncode == 2 and "no model name: give --model OWNER/MODEL" in r.stderr
    r = push_cli("--model", "Not A Name", "--modes", "sd-turbo", path=path, env=env)
    assert r.returncode == 2 and "expected OWNER/MODEL" in r.stderr
    r = push_cli("--model", "owner/fast-sd", path=path, env=env)
    assert r.returncode == 2 and "no modes: give --modes" in r.stderr
    r = push_cli("--model", "owner/fast-sd", "--modes", "sd-turbo,sd3", path=path, env=env)
    assert r.returncode == 2 and "--modes: sd3 is not a mode; allowed: sdxl-turbo, sd-turbo" in r.stderr


def test_a_boot_that_would_not_fit_is_refused_with_the_numbers(fake_tools, pinned_manifest):
    path, env, log = fake_tools
    every = ",".join(MODES)
    r = push_cli("--model", "owner/fast-sd", "--modes", every, "--skip-tests", path=path, env=env)
    plan = boot_plan.make(list(MODES), manifest_path=pinned_manifest)
    assert r.returncode == 1 and "nothing was pushed" in r.stderr, r.stdout
    assert (
        f"FAIL boot fits: the boot would not fit: download {boot_plan.gb(plan.download_bytes)} at 100 MB/s" in r.stdout
    )
    assert f"about {plan.boot_s:.0f} s of Replicate's 600 s boot limit (a plan must stay under 450 s" in r.stdout
    assert "one model per mode" in r.stdout and "--bake-weights" in r.stdout
    assert not any(c.startswith("cog push") for c in calls(log))
    # The stated bandwidth decides: one mode over a slow link does not fit, at the default it does.
    r = push_cli("--model", "owner/fast-sd", "--modes", "sd-turbo", "--bandwidth", "5", "--dry-run", path=path, env=env)
    assert r.returncode == 1 and "FAIL boot fits" in r.stdout and "at 5 MB/s" in r.stdout, r.stdout
    r = push_cli("--model", "owner/fast-sd", "--modes", "sd-turbo", "--dry-run", path=path, env=env)
    assert r.returncode == 0 and "ok   boot fits" in r.stdout, r.stdout


def test_floating_revisions_are_refused_naming_the_pin_command(fake_tools):
    path, env, log = fake_tools
    env = {**env, "WEIGHTS_MANIFEST": str(ROOT / "weights/manifest.json")}  # SD 1.5's revision is `main`
    r = push_cli("--model", "owner/fast-sd", "--modes", "sd-turbo", "--skip-tests", path=path, env=env)
    assert r.returncode == 1, r.stdout
    assert "FAIL revisions pinned: weights revisions not pinned to a commit" in r.stdout
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5 at 'main'" in r.stdout
    assert "python scripts/weights.py pin stable-diffusion-v1-5/stable-diffusion-v1-5" in r.stdout
    assert not any(c.startswith("cog push") for c in calls(log))
    r = push_cli(
        "--model", "owner/fast-sd", "--modes", "sd-turbo", "--allow-floating-revisions", "--dry-run", path=path, env=env
    )
    assert r.returncode == 0 and "ok   revisions pinned: floating revisions allowed" in r.stdout, r.stdout


def test_a_revision_pinned_by_the_lock_counts_as_pinned(tmp_path):
    manifest = tmp_path / "manifest.json"
    shutil.copy(ROOT / "weights/manifest.json", manifest)
    lock = {"version": 1, "repos": {}}
    for repo_id, spec in load_manifest(manifest)["repos"].items():
        lock["repos"][repo_id] = {"revision": spec["revision"], "commit": COMMIT, "files": {}}
    (tmp_path / "manifest.lock.json").write_text(json.dumps(lock))
    plan = boot_plan.make(["sdxl-turbo"], manifest_path=manifest)
    assert plan.floating == []
    assert {r.repo_id: r.commit for r in plan.repos}["stabilityai/sdxl-turbo"] == COMMIT  # `main` in the manifest


def test_a_predict_py_cogs_parser_would_misread_is_refused(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "predict.py").write_text((ROOT / "predict.py").read_text().replace("ge=256", "ge=MIN", 1))
    monkeypatch.setattr(push, "ROOT", project)
    with pytest.raises(push.Failed, match="width: ge=MIN is not a number literal: cog would drop the bound"):
        push.Push(None, "r8.im/owner/fast-sd", ("sd-turbo",), None).check_schema()


def test_dockerignore_check_catches_weights_and_build_folders_headed_for_the_image(tmp_path):
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
    for folder in (".whl", "gpu-check-out", "tests", ".venv", ".pytest_cache"):
        assert f"{folder}/ would be copied into the image: add `{folder}/` to .dockerignore" in problems
    # The project's own rules: the cache is out, its manifest stays in, and so does nothing big.
    (ctx / ".dockerignore").write_text((ROOT / ".dockerignore").read_text() + "big.bin\n")
    assert push.weight_leaks(ctx) == []
    rules = push.dockerignore_rules(ROOT)
    assert push.ignored("weights/stabilityai/sd-turbo/unet/x.safetensors", rules)
    assert not push.ignored("weights/manifest.json", rules) and not push.ignored("predict.py", rules)
    assert not push.ignored(push.PUSH_CONFIG, rules)  # cog copies the config it was given into the image
    assert push.weight_leaks(ROOT) == []


def test_preflight_fails_clearly_without_cog_and_docker(tmp_path, pinned_manifest):
    empty = tmp_path / "bin"
    empty.mkdir()  # a PATH with neither cog nor docker, as on this machine
    env = {"DOCKER_CONFIG": str(tmp_path), "WEIGHTS_MANIFEST": str(pinned_manifest), "REPLICATE_API_TOKEN": ""}
    r = push_cli("--model", "owner/fast-sd", "--modes", "sd-turbo", path=str(empty), env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL cog CLI: the cog CLI is not installed" in r.stdout
    assert f"releases/download/v{push.COG_VERSION}/cog_" in r.stdout  # the pinned version, never `latest`
    assert "FAIL cog doctor" in r.stdout
    assert "FAIL Docker: Docker is not installed" in r.stdout
    assert "FAIL registry login: not logged in to r8.im: run `cog login`" in r.stdout
    assert "FAIL model on Replicate: checking that owner/fast-sd exists needs REPLICATE_API_TOKEN" in r.stdout
    assert "ok   build context" in r.stdout and "nothing was pushed" in r.stderr


@pytest.mark.parametrize(
    "env, failure",
    [
        (
            {"FAKE_COG_VERSION": "0.16.9"},
            "FAIL cog CLI: cog CLI '0.16.9', but this package is checked against cog 0.23.1",
        ),
        (
            {"FAKE_DOCTOR_PROBLEM": "docker: buildx missing"},
            "FAIL cog doctor: `cog doctor` found problems:\ndocker: buildx missing",
        ),
        (
            {"REPLICATE_API_TOKEN": "r8_wrong"},
            "FAIL model on Replicate: the Replicate API refused REPLICATE_API_TOKEN (401)",
        ),
    ],
    ids=["cog-version", "cog-doctor", "api-token"],
)
def test_each_machine_refusal_stops_the_push(fake_tools, env, failure):
    path, base_env, log = fake_tools
    r = push_cli("--model", "owner/fast-sd", "--modes", "sd-turbo", "--skip-tests", path=path, env={**base_env, **env})
    assert r.returncode == 1 and failure in r.stdout, r.stdout
    assert not any(c.startswith("cog push") for c in calls(log))


def test_a_model_missing_on_replicate_is_refused_with_hardware_advice(fake_tools):
    path, env, log = fake_tools
    r = push_cli("--model", "owner/missing", "--modes", "sdxl-turbo", "--skip-tests", path=path, env=env)
    assert r.returncode == 1, r.stdout
    assert "FAIL model on Replicate: owner/missing does not exist on Replicate: create it first" in r.stdout
    assert "Hardware: these modes need about 12 GB of GPU memory: T4 (gpu-t4), L40S (gpu-l40s)" in r.stdout
    assert "driver >= 580 (CUDA 13.0)" in r.stdout
    assert not any(c.startswith("cog push") for c in calls(log))


# -- the push ------------------------------------------------------------------------------------------------
def test_steps_run_in_order_and_red_tests_stop_the_push(fake_tools):
    path, env, log = fake_tools
    r = push_cli("--model", "r8.im/owner/fast-sd", "--modes", "sd-turbo", "--test-command", "false", path=path, env=env)
    assert r.returncode == 1 and "the tests are not green" in r.stderr, r.stdout + r.stderr
    assert not any(c.startswith("cog push") for c in calls(log))
    log.unlink()
    r = push_cli("--model", "owner/fast-sd", "--modes", "sd-turbo", "--test-command", "true", path=path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    made = calls(log)
    assert made[:4] == [
        "cog --version",
        "cog doctor",
        "docker info --format {{.ServerVersion}}",
        "cog push r8.im/owner/fast-sd -f cog.push.yaml",
    ]
    # The config cog was given: cog.yaml plus the modes in the image's environment.
    assert 'run: "predict.py:Predictor"' in made and "  - ENABLED_MODES=sd-turbo" in made
    assert made[-1] == "0"  # .dockerignore as the project has it: no weights let in
    assert "ok   push: pushed r8.im/owner/fast-sd serving sd-turbo" in r.stdout
    assert "ok   model on Replicate: owner/fast-sd exists (private)" in r.stdout


def test_bake_weights_lets_only_the_modes_weights_in_for_the_push(fake_tools, tmp_path, monkeypatch):
    path, env, log = fake_tools
    r = push_cli("--model", "owner/fast-sd", "--modes", "sd-turbo", "--bake-weights", "--dry-run", path=path, env=env)
    assert (
        r.returncode == 1
        and "FAIL weights to bake" in r.stdout
        and "python scripts/weights.py fetch --modes sd-turbo" in r.stdout
    )
    # With the files in place (a copy of the project: the repo's weights/ stays untouched), the push runs with
    # exactly the modes' files let in, then .dockerignore is put back.
    project = tmp_path / "project"
    project.mkdir()
    for f in ("cog.yaml", ".dockerignore", "predict.py"):
        shutil.copy(ROOT / f, project / f)
    for rel in push.baked_paths(("sd-turbo",)):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_bytes(b"x")
    (project / "weights/stabilityai/sdxl-turbo").mkdir(parents=True)
    (project / "weights/stabilityai/sdxl-turbo/unet.safetensors").write_bytes(b"\0" * 2**20)
    monkeypatch.setattr(push, "ROOT", project)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", path)
    monkeypatch.chdir(project)
    before = (project / ".dockerignore").read_text()
    assert push.main(["--model", "owner/fast-sd", "--modes", "sd-turbo", "--bake-weights", "--skip-tests"]) == 0
    made = calls(log)
    assert "cog push r8.im/owner/fast-sd -f cog.push.yaml --separate-weights" in made
    assert made[-1] == str(len(push.baked_paths(("sd-turbo",))))
    rules = push.dockerignore_rules(project, push.bake_dockerignore(("sd-turbo",)))
    assert not push.ignored("weights/stabilityai/sd-turbo/unet/diffusion_pytorch_model.fp16.safetensors", rules)
    assert push.ignored("weights/stabilityai/sdxl-turbo/unet.safetensors", rules)
    assert (project / ".dockerignore").read_text() == before


def test_smoke_prediction_runs_the_pushed_mode_and_prints_output_and_timing(fake_tools):
    path, env, _ = fake_tools
    r = push_cli("--model", "owner/fast-sd", "--modes", "sd-turbo", "--skip-tests", "--smoke", path=path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "output: https://replicate.delivery/xezq/out-0-1.webp" in r.stdout
    assert "smoke prediction smoke1 succeeded on version aaaaaaaaaaaa: predict_time 0.42 s" in r.stdout
