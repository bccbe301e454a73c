"""scripts/gpu_check.sh --dry-run: the GPU check's every step on the CPU with the tiny models (what CI can run of
it; the figures themselves need a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["env", "weights", "budget", "goals", "realtime", "plain", "compiled", "controlnet"]


def test_the_dry_run_runs_every_step(tmp_path):
    r = subprocess.run(
        ["scripts/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["dry_run"] is True and list(data["steps"]) == STEPS
    assert not [name for name, step in data["steps"].items() if "error" in step or "skipped" in step]
    steps = data["steps"]
    assert steps["weights"]["files"] > 70 and not steps["weights"]["full_size"]
    budget = steps["budget"]
    assert budget["moves"] >= 1 and set(budget["resident"]) < {p["mode"] for p in budget["predictions"]}
    assert any(p["moved_s"] is not None for p in budget["predictions"])
    assert all(p["images"] == 1 for p in budget["predictions"])
    goals = steps["goals"]["cases"]
    assert len(goals) == 6 and all(c["n"] >= 1 and c["p50_ms"] > 0 for c in goals.values())
    assert goals["sd-turbo 512, TAESD, num_outputs 12"]["images_per_s"] > 0
    assert set(steps["plain"]["cases"]) == {name for name in goals if name.startswith(("sd-turbo", "sdxl-turbo"))}
    assert set(steps["compiled"]["cases"]) == {name for name in goals if name.startswith("sd-turbo")}
    controlnet = steps["controlnet"]["cases"]
    assert set(controlnet) == {"sdxl-turbo", "lcm-lora-sd15"}
    assert all(
        c["none"]["ratio"] == 1 and c["two ControlNets (canny + depth)"]["step_ms"] > 0 for c in controlnet.values()
    )
    realtime = steps["realtime"]
    assert set(realtime["direct"]) == {"1", "4"} and set(realtime["server"]) == {"1", "4"}
    assert all(r["frames"] > 0 and r["latency_ms"]["p95"] > 0 for r in realtime["server"].values())
    assert realtime["goals"] == {"fps_1_client": 60, "fps_4_clients_total": 150, "p95_ms": 50}
