"""Device memory (lib/engine/memory.py): the plan under DEVICE_MEMORY_BUDGET, modes moved in and out (least
recently used first) with the same images before and after, the metric and log line of a move, requests grouped
by mode, and a budget too small for a mode; plus the warm-up on the thread that serves predictions."""

from __future__ import annotations

import asyncio
import math
import os
import threading

import pytest
import torch

from lib.engine import memory
from lib.engine.batcher import Batcher
from lib.engine.engine import Engine, plan_memory
from lib.engine.loading import ComponentLoader
from lib.engine.modes import MODES
from lib.local import Metrics, collect, outputs, recording, run_inputs
from lib.settings import parse_bytes

CPU, FP32 = torch.device("cpu"), torch.float32
SMALL = dict(width=256, height=256, seed=3, output_format="png")


@pytest.mark.parametrize(
    "text, value",
    [
        ("123456", 123456),
        ("500MB", 500 * 10**6),
        ("20GB", 20 * 10**9),
        ("20GiB", 20 * 2**30),
        ("20 gib", 20 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("64kb", 64_000),
        ("2TiB", 2 * 2**40),
    ],
)
def test_budget_sizes(text, value):
    assert parse_bytes("DEVICE_MEMORY_BUDGET", text) == value


@pytest.mark.parametrize("text", ["lots", "-5GB", "20XB", "GB", ""])
def test_bad_budget_names_the_variable(text):
    with pytest.raises(ValueError, match=r"DEVICE_MEMORY_BUDGET: .* is not a size; allowed: .*20GiB"):
        parse_bytes("DEVICE_MEMORY_BUDGET", text)


def unlimited_plan(tiny_weights) -> memory.Plan:
    return plan_memory(ComponentLoader(CPU, FP32), tiny_weights, tuple(MODES), safety_checker=True)


def budget_for(plan: memory.Plan, modes) -> int:
    """A budget that holds exactly `modes` beside the working memory (and the safety checker)."""
    return math.ceil((plan.weights(modes) + plan.working) / (1 - memory.MARGIN)) + 2


def setup_predictor(monkeypatch, tiny_weights, budget):
    from predict import Predictor

    monkeypatch.setenv("WEIGHTS_DIR", str(tiny_weights))
    monkeypatch.setenv("WEIGHTS_OFFLINE", "1")
    monkeypatch.delenv("ENABLED_MODES", raising=False)
    monkeypatch.setenv("DEVICE_MEMORY_BUDGET", str(budget))
    p = Predictor()
    p.setup()
    return p


def run(predictor, **inputs):
    with recording(predictor) as metrics:
        paths = collect(predictor, **run_inputs(predictor, **inputs))
    return [p.read_bytes() for p in paths], metrics


def test_the_plan_counts_shared_modules_once_and_what_each_mode_runs(tiny_weights):
    plan = unlimited_plan(tiny_weights)
    assert plan.budget is None and plan.resident == tuple(MODES)
    turbo, base = plan.mode_modules["sdxl-turbo"], plan.mode_modules["lcm-lora-sdxl"]
    assert len(turbo & base) == 3  # the two SDXL text encoders and TAESDXL: one module each, in both modes
    assert plan.weights(["sdxl-turbo", "lcm-lora-sdxl"]) < plan.weights(["sdxl-turbo"]) + plan.weights(
        ["lcm-lora-sdxl"]
    )
    assert "safety_checker" in plan.always and plan.working > 0
    # The plan's bytes are what the loaded modules hold.
    engine = Engine.load(tiny_weights, tuple(MODES), CPU, FP32)
    loaded = {id(m): memory.module_bytes(m) for lm in engine.modes.values() for m in lm.modules()}
    loaded[id(engine.safety.model)] = memory.module_bytes(engine.safety.model)
    # (the modules also hold a few small non-persistent buffers that their files do not: CLIP's position ids)
    assert 0 <= sum(loaded.values()) - plan.weights(MODES) < 0.001 * plan.weights(MODES)


def test_modes_that_do_not_fit_wait_in_host_memory_and_move_in_when_asked(monkeypatch, tiny_weights, predictor, capsys):
    plan = unlimited_plan(tiny_weights)
    budget = budget_for(plan, ["sdxl-turbo", "sd-turbo"])
    limited = setup_predictor(monkeypatch, tiny_weights, budget)
    residency = limited.engine.residency
    assert residency.plan.resident[:2] == ("sdxl-turbo", "sd-turbo") and "lcm" not in residency.plan.resident
    assert residency.plan.budget == budget and residency.plan.source == "DEVICE_MEMORY_BUDGET"

    before, m = run(limited, prompt="a fox", mode="sdxl-turbo", **SMALL)
    assert not any("load" in k for k in m), m  # resident: nothing moved
    run(limited, prompt="a fox", mode="sd-turbo", **SMALL)
    capsys.readouterr()
    lcm, m = run(limited, prompt="a fox", mode="lcm", **SMALL)
    assert m["timings.mode_load"] >= 0 and residency.is_resident("lcm")
    logged = capsys.readouterr().out  # setup() logs to stdout, as under Cog
    assert "memory: moved mode lcm to cpu" in logged and "moved out to host memory: sdxl-turbo" in logged
    assert not residency.is_resident("sdxl-turbo")  # the least recently used went out
    after, m = run(limited, prompt="a fox", mode="sdxl-turbo", **SMALL)
    assert "timings.mode_load" in m
    assert after == before  # out and back: the same images
    # ...and the same as a server with room for every mode.
    assert before == run(predictor, prompt="a fox", mode="sdxl-turbo", **SMALL)[0]
    assert lcm == run(predictor, prompt="a fox", mode="lcm", **SMALL)[0]
    on_device = {
        id(mod): mod for lm in limited.engine.modes.values() for mod in lm.modules() if id(mod) in residency.on_device
    }
    resident_bytes = sum(map(memory.module_bytes, on_device.values())) + memory.module_bytes(
        limited.engine.safety.model
    )
    assert resident_bytes <= residency.plan.weights_budget


def test_a_mode_with_large_weights_and_small_activations_moves_in_and_leaves_room_for_the_others():
    """Each mode fits the budget on its own (weights + its own working memory), but the weights budget keeps room
    for the largest working memory: the heavy mode goes beyond it, so it runs with every other mode moved out."""
    heavy, light = torch.nn.Linear(35, 50, bias=False), torch.nn.Linear(10, 10, bias=False)  # 7,000 and 400 bytes
    modules = {"heavy": [heavy], "light": [light]}
    plan = memory.make_plan(
        {name: frozenset([name]) for name in modules},
        {name: memory.module_bytes(ms[0]) for name, ms in modules.items()},
        frozenset(),
        working={"heavy": 1_000, "light": 5_000},
        budget=10_000,
        source="DEVICE_MEMORY_BUDGET",
    )
    assert plan.resident == ("light",) and plan.weights_budget < 7_000
    residency = memory.Residency(plan, modules, CPU)
    seconds, evicted = residency.ensure("heavy")
    assert seconds >= 0 and evicted == ["light"] and residency.is_resident("heavy")
    assert not residency.is_resident("light")
    seconds, evicted = residency.ensure("light")
    assert evicted == ["heavy"] and residency.is_resident("light") and not residency.is_resident("heavy")
    assert residency.ensure("light") == (0.0, [])


def test_requests_are_grouped_by_mode_so_that_moves_stay_rare(monkeypatch, tiny_weights):
    plan = unlimited_plan(tiny_weights)
    limited = setup_predictor(monkeypatch, tiny_weights, budget_for(plan, ["sdxl-turbo", "sd-turbo"]))
    batcher = Batcher(limited.engine, window=0.05)
    limited.batcher = batcher
    moves = limited.engine.residency.moves

    async def one(mode, seed):
        metrics = limited.record_metric = Metrics()
        inputs = run_inputs(limited, prompt="x", mode=mode, width=256, height=256, seed=seed)
        paths = [p async for p in outputs(limited, **inputs)]
        return mode, len(paths), metrics

    async def burst():
        # lcm (in host memory) first, then a resident mode, then lcm again: the resident one goes first, and the
        # two lcm requests share one batch and one move.
        tasks = [asyncio.create_task(one(mode, i)) for i, mode in enumerate(["lcm", "sd-turbo", "lcm"])]
        return await asyncio.gather(*tasks)

    results = asyncio.run(burst())
    waits = {(mode, i): m["queue_wait"] for i, (mode, _, m) in enumerate(results)}
    assert waits[("sd-turbo", 1)] < waits[("lcm", 0)]
    assert [m["batch.requests"] for mode, _, m in results if mode == "lcm"] == [2, 2]
    assert limited.engine.residency.moves == moves + 1


def test_a_budget_too_small_for_a_mode_fails_setup_saying_what_is_needed(monkeypatch, tiny_weights):
    plan = unlimited_plan(tiny_weights)
    with pytest.raises(memory.MemoryBudgetError) as err:
        setup_predictor(monkeypatch, tiny_weights, "100kB")
    msg = str(err.value)
    assert msg.startswith("DEVICE_MEMORY_BUDGET: mode ") and "the budget is 0.1 MB" in msg and "(no mode fits)" in msg
    assert " needs " in msg and " of weights, " in msg and "working memory" in msg and "ENABLED_MODES" in msg
    # Room for the modes that need least only: the message names what fits.
    smallest = min(plan.needs, key=plan.needs.get)
    assert plan.needs[smallest] < max(plan.needs.values())
    with pytest.raises(memory.MemoryBudgetError, match=rf"these fit: [^)]*{smallest}"):
        setup_predictor(monkeypatch, tiny_weights, math.ceil(plan.needs[smallest] / (1 - memory.MARGIN)) + 2)


def test_warm_up_runs_on_the_serving_thread_and_never_judges_its_own_images(monkeypatch, tiny_weights):
    """CUDA graph trees are per thread: the warm-up must run where predictions run. A warm-up image the checker
    would flag must not fail setup."""
    from diffusers import UNet2DConditionModel

    from predict import Predictor

    threads, verdicts = [], []
    real_forward = UNet2DConditionModel.forward

    def forward(self, *args, **kwargs):
        threads.append(threading.get_ident())
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    from lib.engine.safety import SafetyChecker

    real_flagged = SafetyChecker.flagged

    def flagged(self, images):
        with torch.no_grad():
            self.model.concept_embeds_weights.fill_(-2.0)  # flags every image it is asked about
        verdicts.append(len(images))
        return real_flagged(self, images)

    monkeypatch.setattr(SafetyChecker, "flagged", flagged)
    for k, v in {
        "WEIGHTS_DIR": str(tiny_weights),
        "WEIGHTS_OFFLINE": "1",
        "ENABLED_MODES": "sd-turbo,lcm",
        "SPEED_WARMUP": "1",
    }.items():
        monkeypatch.setenv(k, v)
    p = Predictor()
    p.setup()  # would fail if the checker judged a warm-up image
    warmed = set(threads)
    assert len(warmed) == 1 and warmed != {threading.get_ident()}
    assert set(p.engine.speed["warmup_s"]) == {"sd-turbo", "lcm"} and verdicts == [1]  # one blank, its kernels
    threads.clear()
    run(p, prompt="x", mode="sd-turbo", width=256, height=256, disable_safety_checker=True)
    assert set(threads) == warmed  # predictions run on the thread that warmed up
    assert os.environ["SPEED_WARMUP"] == "1"
