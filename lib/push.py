"""Push the model to Replicate: a preflight that catches what would fail after a multi-GB build, then
`cog push r8.im/<owner>/<model>` for the modes given, then an optional smoke prediction.

  python scripts/push.py --model OWNER/MODEL --modes sd-turbo [--dry-run] [--smoke] [--bake-weights]

The plan (printed first): the image, the modes it serves (ENABLED_MODES in the image's environment), the bytes its
setup() downloads, the estimated boot against Replicate's 600 s limit, and the commit each weights revision is pinned
to (lib/boot_plan.py). The preflight, every check run so that one pass lists everything to fix:
- the plan: its boot fits the limit with margin (or the weights are baked into the image: --bake-weights); every
  revision is pinned to a commit (or --allow-floating-revisions); predict.py reads to cog's static parser with
  nothing dropped (lib/cog_schema.py); .dockerignore keeps the weights cache and every build or cache folder out;
- the machine and the account: the cog CLI at the pinned version, `cog doctor`, Docker running, logged in to r8.im,
  the model existing on Replicate (API; REPLICATE_API_TOKEN), with hardware advice;
- the test suite (scripts/test.sh) green.
Then `cog push` with a generated config (cog.push.yaml: cog.yaml plus the image's environment). --dry-run prints the
plan and the offline checks, and runs nothing else. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lib import ROOT, boot_plan, cog_schema
from lib.engine.modes import LCM, MODES, SD, SDXL, all_repos, repo_files
from lib.settings import Settings
from lib.weights.manifest import repin_command

REGISTRY = "r8.im"
API = "https://api.replicate.com/v1"
COG_VERSION = cog_schema.COG_VERSION  # the cog CLI whose parser and CUDA table this package is checked against
PUSH_CONFIG = "cog.push.yaml"  # cog.yaml plus the image's environment: written by the push, read by `cog push -f`
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".gguf", ".msgpack", ".h5")
BIG_FILE = 50 * 2**20
# Folders that must never reach the image: build outputs, caches, tests, local runs (.cog/ cog leaves out itself).
KEEP_OUT = (".git", ".venv", ".whl", "gpu-check-out", "outputs", "jobs", "tests", ".pytest_cache", ".ruff_cache")
SMOKE_INPUT = {"prompt": "a lighthouse at dusk, oil painting", "seed": 1}
INSTALL_COG = (
    f'sudo curl -o /usr/local/bin/cog -L "https://github.com/replicate/cog/releases/download/v{COG_VERSION}/'
    'cog_$(uname -s)_$(uname -m)" && sudo chmod +x /usr/local/bin/cog'
)
# GPU memory of Replicate's GPU hardware (https://replicate.com/pricing), for the hardware advice.
HARDWARE = (
    ("gpu-t4", "T4", 16),
    ("gpu-l40s", "L40S", 48),
    ("gpu-a100-large", "A100 80GB", 80),
    ("gpu-h100", "H100", 80),
)
# About what one mode takes on the GPU (fp16 weights, activations at a large request, the safety checker).
MODE_MEMORY_GB = {SDXL: 12, SD: 7, LCM: 7}


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


def mode_names(value: str | None) -> tuple[str, ...]:
    names = tuple(m.strip() for m in (value or "").split(",") if m.strip())
    if not names:
        raise Failed(
            "no modes: give --modes MODE[,MODE...]; one model per mode keeps the boot short (docs/serving.md). "
            f"Modes: {', '.join(MODES)}"
        )
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise Failed(f"--modes: {', '.join(unknown)} is not a mode; allowed: {', '.join(MODES)}")
    return names


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


def dockerignore_rules(context: Path, text: str | None = None) -> list[tuple[re.Pattern, bool, str]]:
    """(pattern, negated, text) per rule of context/.dockerignore (or of `text`), in order (the last match wins)."""
    if text is None:
        path = context / ".dockerignore"
        text = path.read_text() if path.is_file() else ""
    rules = []
    for line in text.splitlines():
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


def weight_leaks(context: Path, rules=None, baked: frozenset[str] = frozenset()) -> list[str]:
    """Problems: the weights cache not ignored, a build or cache folder not ignored, or large or weight files that
    would go into the image. `baked`: paths under weights/ meant to go in (--bake-weights)."""
    rules = dockerignore_rules(context) if rules is None else rules
    problems = []
    if not ignored("weights/some-repo/unet/diffusion_pytorch_model.safetensors", rules):
        problems.append(
            ".dockerignore does not exclude the weights cache: add `weights/*` (setup() downloads the "
            "weights at start-up; --bake-weights puts the chosen modes' weights in on purpose)"
        )
    problems += [
        f"{folder}/ would be copied into the image: add `{folder}/` to .dockerignore"
        for folder in KEEP_OUT
        if not ignored(f"{folder}/x", rules)
    ]
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
            if ignored(rel, rules) or rel in baked:
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


def baked_paths(modes: tuple[str, ...]) -> list[str]:
    """The files under weights/ that --bake-weights puts in the image: the modes' (and the safety checker's)."""
    return [
        f"weights/{repo.repo_id}/{path}"
        for repo in all_repos(modes, Settings().safety_checker)
        for path in repo_files(repo)
    ]


def bake_dockerignore(modes: tuple[str, ...]) -> str:
    """The project's .dockerignore, with the modes' weights let in (for the push only)."""
    lines = [(ROOT / ".dockerignore").read_text().rstrip("\n"), "# --bake-weights: these modes' weights go in"]
    lines += [f"!{p}" for p in baked_paths(modes)]
    return "\n".join(lines) + "\n"


# -- preflight ----------------------------------------------------------------------------------------------
def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@dataclass
class Push:
    args: argparse.Namespace
    image: str
    modes: tuple[str, ...]
    plan: boot_plan.BootPlan

    # -- the plan's checks (offline: the dry run runs them too) --
    def check_boot(self) -> str:
        if self.plan.fits:
            return self.plan.estimate()
        raise Failed(
            f"the boot would not fit: {self.plan.estimate()}. Serve fewer modes per model (one model per mode: "
            "docs/serving.md), or bake the weights into the image (--bake-weights), or state a faster link "
            "(--bandwidth MB/s) if you have measured one"
        )

    def check_pins(self) -> str:
        floating = self.plan.floating
        if not floating:
            return "every weights revision is pinned to a commit"
        if self.args.allow_floating_revisions:
            return f"floating revisions allowed (--allow-floating-revisions): {', '.join(r.repo_id for r in floating)}"
        path = Path(Settings().weights_manifest)
        raise Failed(
            "weights revisions not pinned to a commit (an upstream commit would stop a later cold boot with a pin "
            "mismatch): "
            + "; ".join(f"{r.repo_id} at {r.revision!r}" for r in floating)
            + ". Pin them (needs the Hub), then commit weights/: "
            + " && ".join(repin_command(r.repo_id, path) for r in floating)
            + "; or push anyway with --allow-floating-revisions"
        )

    def check_schema(self) -> str:
        try:
            document = cog_schema.schema(ROOT)
        except cog_schema.SchemaError as e:
            raise Failed(f"cog build would not read predict.py as meant: {e}") from None
        n = len(document["components"]["schemas"]["Input"]["properties"])
        return f"predict.py reads to cog's static parser: {n} inputs, nothing dropped (python -m lib.cog_schema)"

    def check_baked(self) -> str:
        missing = [p for p in baked_paths(self.modes) if not (ROOT / p).is_file()]
        if missing:
            raise Failed(
                f"--bake-weights: {len(missing)} of the modes' weight files are not in weights/ (e.g. {missing[0]}): "
                f"fetch and verify them first: python scripts/weights.py fetch --modes {' '.join(self.modes)}"
            )
        return f"{len(baked_paths(self.modes))} weight files in weights/ go into the image"

    def check_dockerignore(self) -> str:
        if self.args.bake_weights:
            rules = dockerignore_rules(ROOT, bake_dockerignore(self.modes))
            problems = weight_leaks(ROOT, rules, frozenset(baked_paths(self.modes)))
            problems = [p for p in problems if "does not exclude the weights cache" not in p]
        else:
            problems = weight_leaks(ROOT)
        if problems:
            raise Failed("files would go into the image:\n  " + "\n  ".join(problems))
        kept = "the weights cache, " if not self.args.bake_weights else "other modes' weights, "
        return f".dockerignore keeps {kept}{', '.join(KEEP_OUT)} and every large file out of the image"

    # -- the machine and the account --
    def check_cog(self) -> str:
        if not shutil.which("cog"):
            raise Failed(f"the cog CLI is not installed (not on PATH). Install cog {COG_VERSION}: {INSTALL_COG}")
        r = run(["cog", "--version"], timeout=60)
        if r.returncode:
            raise Failed(f"`cog --version` failed: {(r.stderr or r.stdout).strip()}")
        found = re.search(r"\d+\.\d+\.\d+\S*", r.stdout)
        if not found or found[0] != COG_VERSION:
            raise Failed(
                f"cog CLI {found[0] if found else r.stdout.strip()!r}, but this package is checked against cog "
                f"{COG_VERSION} (its static schema parser and CUDA table change between versions). Install it: "
                f"{INSTALL_COG}"
            )
        return r.stdout.strip()

    def check_doctor(self) -> str:
        if not shutil.which("cog"):
            raise Failed("`cog doctor` needs the cog CLI (see above)")
        r = run(["cog", "doctor"], cwd=ROOT, timeout=120)
        if r.returncode:
            raise Failed(f"`cog doctor` found problems:\n{(r.stdout + r.stderr).strip()[-2000:]}")
        return "cog doctor: no problems"

    def check_docker(self) -> str:
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

    def check_login(self) -> str:
        config_path = Settings().docker_config / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            config = {}
        if any(REGISTRY in k for k in config.get("auths", {})) or any(
            REGISTRY in k for k in config.get("credHelpers", {})
        ):
            return f"logged in to {REGISTRY} ({config_path})"
        store = config.get("credsStore")
        if store and shutil.which(f"docker-credential-{store}"):
            r = run([f"docker-credential-{store}", "list"], timeout=30)
            if r.returncode == 0 and REGISTRY in r.stdout:
                return f"logged in to {REGISTRY} (credential store {store})"
        raise Failed(
            f"not logged in to {REGISTRY}: run `cog login` (it asks for a token from https://replicate.com/auth/token)"
        )

    def check_model(self) -> str:
        """The model exists on Replicate: cog would find out only after building and uploading the image."""
        import requests

        token = Settings().replicate_api_token
        model = self.image.removeprefix(REGISTRY + "/")
        if not token:
            raise Failed(f"checking that {model} exists needs REPLICATE_API_TOKEN (https://replicate.com/account)")
        base = Settings().replicate_base_url.rstrip("/")
        r = requests.get(f"{base}/v1/models/{model}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        if r.status_code == 404:
            raise Failed(
                f"{model} does not exist on Replicate: create it first (https://replicate.com/create, or "
                f"POST {API}/models with owner, name, visibility and hardware). {hardware_advice(self.modes)}"
            )
        if r.status_code in (401, 403):
            raise Failed(f"the Replicate API refused REPLICATE_API_TOKEN ({r.status_code}) for {model}")
        r.raise_for_status()
        return f"{model} exists ({r.json().get('visibility', '?')}). {hardware_advice(self.modes)}"

    # -- the steps --
    def steps(self) -> list[tuple[str, str, Callable[[], str], bool]]:
        """(title, what it runs, the check, offline) for every step, in order."""
        a = self.args
        plan = [
            ("boot fits", "lib/boot_plan.py on the weights manifest", self.check_boot, True),
            ("revisions pinned", "weights/manifest.json and its lock", self.check_pins, True),
            ("static schema", "cog's parser rules on predict.py (python -m lib.cog_schema)", self.check_schema, True),
            ("build context", ".dockerignore rules against the build context", self.check_dockerignore, True),
            *([("weights to bake", "the modes' files in weights/", self.check_baked, True)] if a.bake_weights else []),
            ("cog CLI", f"cog --version (must be {COG_VERSION})", self.check_cog, False),
            ("cog doctor", "cog doctor", self.check_doctor, False),
            ("Docker", "docker info", self.check_docker, False),
            ("registry login", f"{REGISTRY} credentials in the Docker config (cog login)", self.check_login, False),
            (
                "model on Replicate",
                f"GET {API}/models/{self.image.removeprefix(REGISTRY + '/')}",
                self.check_model,
                False,
            ),
        ]
        if not a.skip_tests:
            plan.append(("tests", a.test_command, lambda: run_tests(shlex.split(a.test_command)), False))
        flags = " --separate-weights" if a.bake_weights else ""
        plan.append(("push", f"cog push {self.image} -f {PUSH_CONFIG}{flags}", self.push, False))
        if a.smoke:
            plan.append(
                (
                    "smoke prediction",
                    f"Replicate API: latest version of {self.image.removeprefix(REGISTRY + '/')}, input "
                    f"{json.dumps(self.smoke_input)}",
                    self.smoke,
                    False,
                )
            )
        return plan

    @property
    def smoke_input(self) -> dict:
        return {**SMOKE_INPUT, "mode": self.modes[0]}

    def push(self) -> str:
        config = ROOT / PUSH_CONFIG
        config.write_text(push_config(self.modes))
        cmd = ["cog", "push", self.image, "-f", PUSH_CONFIG] + (
            ["--separate-weights"] if self.args.bake_weights else []
        )
        try:
            with baked_context(self.modes) if self.args.bake_weights else contextlib.nullcontext():
                r = subprocess.run(cmd, cwd=ROOT)
        finally:
            config.unlink(missing_ok=True)  # for this push only
        if r.returncode:
            raise Failed(f"`{shlex.join(cmd)}` failed (exit {r.returncode})")
        return f"pushed {self.image} serving {', '.join(self.modes)}"

    def smoke(self) -> str:
        import replicate

        model = self.image.removeprefix(REGISTRY + "/")
        if not Settings().replicate_api_token:
            raise Failed("the smoke prediction needs REPLICATE_API_TOKEN")
        client = replicate.Client()
        version = client.models.get(model).latest_version
        if version is None:
            raise Failed(f"{model} has no version after the push")
        started = time.monotonic()
        prediction = client.predictions.create(version=version.id, input=self.smoke_input)
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
            f"smoke prediction {prediction.id} succeeded on version {version.id[:12]}: {timing}"
            f"{seconds:.1f} s end to end"
        )


def hardware_advice(modes: tuple[str, ...]) -> str:
    need = sum(MODE_MEMORY_GB[MODES[m].family] for m in modes)
    fits = [f"{label} ({sku})" for sku, label, gb in HARDWARE if gb >= need]
    return (
        f"Hardware: these modes need about {need} GB of GPU memory: "
        + (", ".join(fits) if fits else "more than one GPU holds: serve fewer modes per model")
        + "; the image needs a host NVIDIA driver >= 580 (CUDA 13.0)."
    )


def push_config(modes: tuple[str, ...]) -> str:
    """cog.yaml plus the image's environment: the modes it serves."""
    return (
        f"# Written by scripts/push.py for one push: cog.yaml plus the image's environment.\n"
        f"{(ROOT / 'cog.yaml').read_text().rstrip()}\n"
        f"environment:\n  - ENABLED_MODES={','.join(modes)}\n"
    )


@contextlib.contextmanager
def baked_context(modes: tuple[str, ...]):
    """.dockerignore with the modes' weights let in, for the duration of the push; the original is put back."""
    path = ROOT / ".dockerignore"
    original = path.read_text()
    path.write_text(bake_dockerignore(modes))
    try:
        yield
    finally:
        path.write_text(original)


def run_tests(cmd: list[str]) -> str:
    say(f"  running {shlex.join(cmd)} (this takes a few minutes)")
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode:
        raise Failed(f"the tests are not green ({shlex.join(cmd)} exited {r.returncode}): fix them before pushing")
    return "tests green"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="OWNER/MODEL on Replicate (or r8.im/OWNER/MODEL)")
    parser.add_argument("--modes", help=f"the modes this model serves, comma-separated ({', '.join(MODES)})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the offline checks, run nothing")
    parser.add_argument("--smoke", action="store_true", help="after the push, run one prediction (REPLICATE_API_TOKEN)")
    parser.add_argument(
        "--bake-weights", action="store_true", help="put the modes' weights in the image (cog push --separate-weights)"
    )
    parser.add_argument(
        "--bandwidth", type=float, default=boot_plan.DEFAULT_BANDWIDTH / 1e6, help="MB/s from the Hub (%(default)g)"
    )
    parser.add_argument("--allow-floating-revisions", action="store_true", help="push with unpinned revisions")
    parser.add_argument("--skip-tests", action="store_true", help="skip the test suite (CI already ran it)")
    parser.add_argument("--test-command", default="scripts/test.sh", help="the test suite (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        image, modes = image_name(args.model), mode_names(args.modes)
        plan = boot_plan.make(modes, args.bandwidth * 1e6, Settings().safety_checker, baked=args.bake_weights)
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = Push(args, image, modes, plan)
    say(f"image: {image}")
    for line in plan.lines():
        say(line)
    steps = p.steps()
    checks = [s for s in steps if s[3] or s[0] not in ("tests", "push", "smoke prediction")]
    failures = []
    for title, _, check, offline in checks:  # every check, so one run lists everything to fix
        if args.dry_run and not offline:
            continue
        try:
            say(f"ok   {title}: {check()}")
        except (Failed, OSError, subprocess.TimeoutExpired) as e:
            failures.append(title)
            say(f"FAIL {title}: {e}")
    if args.dry_run:
        say("would run:")
        for title, what, _, offline in steps:
            if not offline:
                say(f"  {title}: {what}")
        say("(dry run: nothing was run but the plan's checks)")
        return 1 if failures else 0
    if failures:
        print(f"error: preflight failed ({', '.join(failures)}): nothing was pushed", file=sys.stderr)
        return 1
    for title, _, step, _ in steps[len(checks) :]:
        try:
            say(f"ok   {title}: {step()}")
        except (Failed, OSError) as e:
            print(f"error: {title}: {e}", file=sys.stderr)
            return 1
    return 0
