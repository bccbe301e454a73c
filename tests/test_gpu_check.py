"""scripts/gpu_check.sh --dry-run: the GPU check's every step on the CPU with the tiny models (what CI can run of
it; the figures themselves need a GPU), and its time caps."""

from __future__ import annotations

import json
import os
import subprocess
import time
from argparse import Namespace
from pathlib import Path

from lib.bench import gpu_check
from lib.bench.cases import GOALS

ROOT = Path(__file__).resolve().parent.parent
STEPS = [
    "env",
    "sd-turbo",
    "profile",
    "sdxl-turbo",
    "lcm",
    "lcm-lora-sdxl",
    "budget",
    "realtime",
    "controlnet",
    "compile",
]
PATHS = ("baseline", "default", "plain")


def test_the_dry_run_runs_every_step(tmp_path):
    doc = (ROOT / "docs" / "benchmarks.md").read_bytes()
    r = subprocess.run(
        ["scripts/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [line.split(" (cap")[0] for line in r.stdout.splitlines() if line.startswith("== ")] == [
        f"== {s}" for s in STEPS
    ]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["dry_run"] is True and list(data["steps"]) == STEPS
    steps = data["steps"]
    assert not [name for name, step in steps.items() if {"error", "skipped", "cut"} & set(step)]
    assert all(step["seconds"] <= step["cap_s"] for step in steps.values())
    for mode in gpu_check.COMPARED:
        step = steps[mode]
        assert step["weights"]["files"] > 0 and not step["weights"]["full_size"]
        assert set(step["cases"]) == {g["name"] for g in GOALS if g["mode"] == mode}
        for case in step["cases"].values():
            for path in PATHS:
                assert case[path]["n"] >= 1 and case[path]["p50_ms"] > 0, (mode, path)
                assert {"denoising", "vae_decode", "other"} <= set(case[path]["stages_ms"]), (mode, path)
            assert case["default"]["vs_baseline"] > 0 and case["plain"]["vs_baseline"] > 0
        # The default path warmed up and recorded the UNet's buckets; SPEED=0 is the plain path: nothing recorded.
        unet = next(v for k, v in step["default_setup"]["models"].items() if k.startswith(f"{mode} UNet"))
        assert unet["batches"] == [1, 2] and not step["plain_setup"]["models"]
        assert step["graphs_vs_as_loaded"]["max_abs_diff"] == 0
    assert steps["sd-turbo"]["cases"]["sd-turbo 512, TAESD, num_outputs 12"]["default"]["images_per_s"] > 0
    for path in PATHS:
        profile = steps["profile"][path]
        assert profile["calls"] == 1 and profile["wall_ms"] > 0 and "host_syncs_per_call" in profile
    budget = steps["budget"]
    assert budget["moves"] >= 1 and set(budget["resident"]) < {p["mode"] for p in budget["predictions"]}
    assert budget["resident_after_setup"] == budget["resident"] and budget["moves_in_setup"] == 0
    assert any(p["moved_s"] is not None for p in budget["predictions"])
    assert all(p["images"] == 1 for p in budget["predictions"])
    controlnet = steps["controlnet"]["cases"]
    assert set(controlnet) == {"sdxl-turbo", "lcm-lora-sd15"}
    assert all(
        c["none"]["ratio"] == 1 and c["two ControlNets (canny + depth)"]["step_ms"] > 0 for c in controlnet.values()
    )
    realtime = steps["realtime"]
    assert set(realtime["direct"]) == {"1", "4"} and set(realtime["server"]) == {"1", "4"}
    assert all(r["frames"] > 0 and r["latency_ms"]["p95"] > 0 for r in realtime["server"].values())
    assert realtime["goals"] == {"fps_1_client": 60, "fps_4_clients_total": 150, "p95_ms": 50}
    compiled = steps["compile"]
    assert compiled["cold_setup"]["compile"]["graphs_compiled"] > 0 and "warm_setup" in compiled
    assert len(compiled["cases"]) == 2
    # The section: OUT/benchmarks.md is docs/benchmarks.md with the run's section; the repository's copy is untouched.
    section = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- bench:gpu-check-dry-run -->" in section and "| sd-turbo 512, 1 step, full VAE | ≤ 20 ms |" in section
    assert "Profile, sd-turbo 512 full VAE" in section and "Memory budget" in section and "Compile (" in section
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == doc
    rendered = tmp_path / "doc.md"
    rendered.write_text("# Benchmarks\n")
    assert gpu_check.main(["--render", str(tmp_path / "gpu_check.json"), "--doc", str(rendered)]) == 0
    assert "#### GPU check: CPU" in rendered.read_text()


def test_a_step_stops_at_its_cap_and_later_steps_are_skipped_when_the_run_is_out_of_time(tmp_path, monkeypatch):
    """A step that runs past its cap is interrupted and keeps what it recorded; one that fails records its error
    and the run goes on; a step that cannot start in the time left is skipped with a line; each is saved."""
    monkeypatch.setattr(gpu_check, "DRY_RUN_SLOWER", 1)
    monkeypatch.setattr(gpu_check, "HARD_STOP_AFTER", 0.2)
    monkeypatch.setattr(gpu_check, "CAPS", {"env": 1, "budget": 1, "realtime": 1, "compile": 30})
    args = Namespace(dry_run=True, out=str(tmp_path), minutes=2.5 / 60, weights=str(tmp_path / "w"), doc="none.md")
    check = gpu_check.Check(args)

    def slow(result):
        result["first"] = 1
        time.sleep(5)
        result["second"] = 2

    def broken(result):
        raise ValueError("no such thing")

    check.step("env", slow)
    check.step("budget", broken)
    check.step("realtime", lambda result: result.update(done=True))
    check.step("compile", lambda result: result.update(done=True))
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert steps["env"]["first"] == 1 and "second" not in steps["env"] and "cap of 1 s" in steps["env"]["cut"]
    assert steps["budget"]["error"] == "ValueError: no such thing"
    assert steps["realtime"] == {"cap_s": 1, "done": True, "seconds": 0.0}
    assert steps["compile"]["skipped"].endswith("s left of the run's 0.0416667 min")
    assert "#### GPU check" in (tmp_path / "benchmarks.md").read_text()
