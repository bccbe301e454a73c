"""Push the model to Replicate: preflight, `cog push r8.im/<owner>/<model>`, then an optional smoke prediction.

  python scripts/push.py --model OWNER/MODEL [--smoke] [--dry-run]

Preflight (all must pass, or nothing is pushed): the model name is given; the cog CLI is installed; Docker is
running; you are logged in to r8.im (`cog login`); .dockerignore keeps the weights (and any other large or
weight file) out of the image; the test suite is green (scripts/test.sh). Then `cog push`. With --smoke, one
prediction through the Replicate API (REPLICATE_API_TOKEN) on the version just pushed prints its output URLs
and timing. --dry-run prints every step and runs none. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lib import ROOT
from lib.settings import Settings

REGISTRY = "r8.im"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".gguf", ".msgpack", ".h5")
BIG_FILE = 50 * 2**20
SMOKE_INPUT = {"prompt": "a lighthouse at dusk, oil painting", "mode": "lcm", "seed": 1}
INSTALL_COG = (
    'sudo curl -o /usr/local/bin/cog -L "https://github.com/replicate/cog/releases/latest/download/'
    'cog_$(uname -s)_$(uname -m)" && sudo chmod +x /usr/local/bin/cog'
)


class Failed(Exception):
    pass


def say(msg: str = "") -> None:
    print(msg, flush=True)


def image_name(model: str | None) -> str:
    if not model:
        raise Failed("no model name: give --model OWNER/MODEL (the model must exist: https://replicate.com/create)")
    name = model.removeprefix(f"{REGISTRY}/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*/[a-z0-9][a-z0-9_.-]*", name):
        raise Failed(f"--model {model!r}: expected OWNER/MODEL (lowercase letters, digits, '-', '_', '.')")
    return f"{REGISTRY}/{name}"


# -- .dockerignore ------------------------------------------------------------------------------------------
def _pattern(p: str) -> re.Pattern:
    p = p.strip().removeprefix("./").lstrip("/").rstrip("/")
    out, i = "", 0
    while i < len(p):
        if p.startswith("**", i):
            out, i = out + ".*", i + 2
            if p.startswith("/", i):
                out, i = out[:-2] + "(?:.*/)?", i + 1
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out)


def dockerignore_rules(context: Path) -> list[tuple[re.Pattern, bool, str]]:
    """(pattern, negated, text) per rule of context/.dockerignore, in order (the last match wins)."""
    path = context / ".dockerignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    rules = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((_pattern(line.lstrip("!")), negated, line))
    return rules


def ignored(rel: str, rules) -> bool:
    """Whether Docker leaves `rel` (a path relative to the context) out of the build context."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern, negated, _ in rules:
        if any(pattern.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def weight_leaks(context: Path) -> list[str]:
    """Problems: the weights cache not ignored, or large or weight files that would go into the image."""
    rules = dockerignore_rules(context)
    problems = []
    if not ignored("weights/some-repo/unet/diffusion_pytorch_model.safetensors", rules):
        problems.append(
            ".dockerignore does not exclude the weights cache: add `weights/*` (setup() downloads the "
            "weights at start-up; they must not be baked into the image)"
        )
    negations = [text.lstrip("!").strip("/") for _, neg, text in rules if neg]
    for dirpath, dirnames, filenames in os.walk(context):
        rel_dir = os.path.relpath(dirpath, context)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # Prune ignored folders unless a `!rule` might bring something back from inside them.
        dirnames[:] = [
            d
            for d in dirnames
            if not ignored(rel_dir + d, rules) or any(n.startswith(rel_dir + d + "/") for n in negations)
        ]
        for f in filenames:
            rel = rel_dir + f
            if ignored(rel, rules):
                continue
            try:
                size = os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue
            if size >= BIG_FILE or (f.endswith(WEIGHT_SUFFIXES) and size >= 2**20):
                problems.append(
                    f"{rel} ({size / 2**20:.0f} MiB) would be copied into the image: add it to .dockerignore"
                )
    return problems


# -- preflight ----------------------------------------------------------------------------------------------
def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def check_cog() -> str:
    if not shutil.which("cog"):
        raise Failed(f"the cog CLI is not installed (not on PATH). Install it: {INSTALL_COG}")
    r = run(["cog", "--version"], timeout=60)
    if r.returncode:
        raise Failed(f"`cog --version` failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip()


def check_docker() -> str:
    if not shutil.which("docker"):
        raise Failed(
            "Docker is not installed (no `docker` on PATH): cog builds the image with Docker. "
            "Install Docker Engine: https://docs.docker.com/engine/install/"
        )
    r = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=60)
    if r.returncode:
        raise Failed(
            f"Docker is not running (`docker info` failed: {(r.stderr or r.stdout).strip()[:300]}); "
            "start it (e.g. `sudo systemctl start docker`)"
        )
    return f"Docker server {r.stdout.strip()}"


def check_login() -> str:
    config_path = Settings().docker_config / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        config = {}
    if any(REGISTRY in k for k in config.get("auths", {})) or any(REGISTRY in k for k in config.get("credHelpers", {})):
        return f"logged in to {REGISTRY} ({config_path})"
    store = config.get("credsStore")
    if store and shutil.which(f"docker-credential-{store}"):
        r = run([f"docker-credential-{store}", "list"], timeout=30)
        if r.returncode == 0 and REGISTRY in r.stdout:
            return f"logged in to {REGISTRY} (credential store {store})"
    raise Failed(
        f"not logged in to {REGISTRY}: run `cog login` (it asks for a token from https://replicate.com/auth/token)"
    )


def check_dockerignore() -> str:
    problems = weight_leaks(ROOT)
    if problems:
        raise Failed("weights would go into the image:\n  " + "\n  ".join(problems))
    return ".dockerignore keeps the weights cache and every large file out of the image"


def steps(args, image: str) -> list[tuple[str, str, object]]:
    """(title, what it runs, callable) for every step, in order."""
    test_cmd = shlex.split(args.test_command)
    plan = [
        ("model name", f"--model {args.model}", lambda: image),
        ("cog CLI", "cog --version", check_cog),
        ("Docker", "docker info", check_docker),
        ("registry login", f"{REGISTRY} credentials in the Docker config (cog login)", check_login),
        ("weights out of the image", ".dockerignore rules against the build context", check_dockerignore),
    ]
    if not args.skip_tests:
        plan.append(("tests", args.test_command, lambda: run_tests(test_cmd)))
    plan.append(("push", f"cog push {image}", lambda: push(image)))
    if args.smoke:
        plan.append(
            (
                "smoke prediction",
                f"Replicate API: latest version of {image.removeprefix(REGISTRY + '/')}, "
                f"input {json.dumps(SMOKE_INPUT)}",
                lambda: smoke(image.removeprefix(REGISTRY + "/")),
            )
        )
    return plan


def run_tests(cmd: list[str]) -> str:
    say(f"  running {shlex.join(cmd)} (this takes a few minutes)")
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode:
        raise Failed(f"the tests are not green ({shlex.join(cmd)} exited {r.returncode}): fix them before pushing")
    return "tests green"


def push(image: str) -> str:
    r = subprocess.run(["cog", "push", image], cwd=ROOT)
    if r.returncode:
        raise Failed(f"`cog push {image}` failed (exit {r.returncode})")
    return f"pushed {image}"


def smoke(model: str) -> str:
    import replicate

    if not Settings().replicate_api_token:
        raise Failed("the smoke prediction needs REPLICATE_API_TOKEN")
    client = replicate.Client()
    version = client.models.get(model).latest_version
    if version is None:
        raise Failed(f"{model} has no version after the push")
    started = time.monotonic()
    prediction = client.predictions.create(version=version.id, input=SMOKE_INPUT)
    prediction.wait()
    seconds = time.monotonic() - started
    if prediction.status != "succeeded":
        raise Failed(f"smoke prediction {prediction.id} {prediction.status}: {prediction.error}")
    outputs = prediction.output if isinstance(prediction.output, list) else [prediction.output]
    for url in outputs:
        say(f"  output: {url}")
    predict_time = (prediction.metrics or {}).get("predict_time")
    timing = f"predict_time {predict_time:.2f} s, " if predict_time is not None else ""
    return (
        f"smoke prediction {prediction.id} succeeded on version {version.id[:12]}: {timing}{seconds:.1f} s end to end"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="OWNER/MODEL on Replicate (or r8.im/OWNER/MODEL)")
    parser.add_argument("--smoke", action="store_true", help="after the push, run one prediction (REPLICATE_API_TOKEN)")
    parser.add_argument("--dry-run", action="store_true", help="print every step, run none")
    parser.add_argument("--skip-tests", action="store_true", help="skip the test suite (CI already ran it)")
    parser.add_argument("--test-command", default="scripts/test.sh", help="the test suite (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        image = image_name(args.model)
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = steps(args, image)
    if args.dry_run:
        for i, (title, what, _) in enumerate(plan, 1):
            say(f"{i}. {title}: {what}")
        say("(dry run: nothing was run)")
        return 0
    preflight = [s for s in plan if s[0] not in ("tests", "push", "smoke prediction")]
    failures = []
    for title, _, check in preflight:  # every cheap check, so one run lists everything to fix
        try:
            say(f"ok   {title}: {check()}")
        except (Failed, OSError, subprocess.TimeoutExpired) as e:
            failures.append(title)
            say(f"FAIL {title}: {e}")
    if failures:
        print(f"error: preflight failed ({', '.join(failures)}): nothing was pushed", file=sys.stderr)
        return 1
    for title, _, step in plan[len(preflight) :]:
        try:
            say(f"ok   {title}: {step()}")
        except (Failed, OSError) as e:
            print(f"error: {title}: {e}", file=sys.stderr)
            return 1
    return 0
