"""Static shapes (lib/engine/graphs.py) and the warm-up that makes them (lib/engine/speed.py), on the CPU: batch-size
buckets warmed at setup so that no request compiles or records, with the plain path's images; the warm-up's time
budget; the planned residents kept on the device; the weights moving; a style LoRA running as loaded; the compile
cache beside the weights. (The CUDA graphs themselves need a GPU: scripts/gpu_check.sh records and replays them.
On the CPU the same dispatcher runs the module on its static buffers, which is what is checked here of the
padding, the copies and the dispatch.)"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from lib.engine import graphs, speed
from lib.engine.engine import Engine
from lib.engine.loading import load_modes
from lib.settings import Settings

CPU, FP32 = torch.device("cpu"), torch.float32
PROMPT = "a lighthouse at dusk"


def engine_with(tiny_weights, env: dict, modes=("sd-turbo",)) -> Engine:
    engine = Engine(load_modes(tiny_weights, modes, CPU, FP32), CPU, FP32)
    return speed.optimize(engine, speed.Switches.from_env(CPU, env))


def pixels(engine: Engine, tmp_path, mode="sd-turbo", size=None, **inputs) -> list[np.ndarray]:
    size = size or engine.modes[mode].mode.size
    request = engine.request(prompt=PROMPT, mode=mode, width=size, height=size, seed=7, output_format="png", **inputs)
    folder = tmp_path / f"{mode}-{size}-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    return [np.asarray(Image.open(o.path).convert("RGB"), dtype=np.int16) for o in engine.run(request, folder)]


def largest_difference(a: list, b: list) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(autouse=True)
def default_stance():
    yield
    graphs.unseal()  # a sealed engine must not change what later tests compile


def test_warmed_buckets_serve_every_batch_without_compiling_or_recording(tiny_weights, tmp_path):
    """Buckets 1, 2, 4 warmed at setup (compiled with a cheap backend, and recorded): batches of 1 to 4 images
    run on them with no compile and no recording (3 is padded to 4) and give the plain path's images; a size
    setup did not warm and a batch past the last bucket run as loaded, also without compiling."""
    plain = engine_with(tiny_weights, {"SPEED": "0"})
    fast = engine_with(
        tiny_weights,
        {
            "SPEED_CUDA_GRAPHS": "unet",
            "SPEED_COMPILE": "unet",
            "SPEED_COMPILE_BACKEND": "eager",
            "SPEED_GRAPH_BATCHES": "1,2,4",
        },
    )
    unet = graphs.installed(fast.modes["sd-turbo"].txt2img.unet)
    assert unet.compiled and unet.graphs and fast.speed["static"] == ["sd-turbo UNet"]
    assert fast.modes["sd-turbo"].img2img.unet is fast.modes["sd-turbo"].txt2img.unet  # shared, graphed once
    fast.warm_up()
    report = fast.speed["warmup"]
    assert report["compile"]["graphs_compiled"] > 0
    assert [r["batch"] for r in report["models"]["sd-turbo UNet"]["recorded"]["([4, 64, 64])"]] == [1, 2, 4]
    compiled, replays = counters["stats"]["unique_graphs"], unet.replays
    taesd = {"fast_decode": True}  # the cheaper decoder on a CPU; the UNet is what is checked
    for n in (1, 2, 4):
        assert len(pixels(fast, tmp_path, num_outputs=n, **taesd)) == n
    padded = pixels(fast, tmp_path, num_outputs=3, **taesd)
    assert largest_difference(padded, pixels(plain, tmp_path, num_outputs=3, **taesd)) <= 2
    assert unet.replays == replays + 4 and unet.fallbacks == 0
    recorded = len(unet.entries)
    # Not warmed: another size, and 5 images (past the last bucket). They run as loaded.
    pixels(fast, tmp_path, size=320, **taesd)
    pixels(fast, tmp_path, num_outputs=5, **taesd)
    assert unet.fallbacks == 2 and len(unet.entries) == recorded
    assert counters["stats"]["unique_graphs"] == compiled  # nothing compiled on a request


def test_the_warm_up_budget_leaves_the_rest_without_graphs_and_never_fails(tiny_weights, tmp_path, monkeypatch, caplog):
    """A clock that moves 10 s per reading, a budget of 25 s: the first mode's first pass runs (nothing says it
    would not fit), its other buckets and the second mode are left out with a log line; setup succeeds and every
    request is served, as loaded where nothing was recorded."""
    ticks = iter(range(0, 10_000, 10))
    monkeypatch.setattr(speed, "monotonic", lambda: float(next(ticks)))
    env = {"SPEED_CUDA_GRAPHS": "unet", "SPEED_GRAPH_BATCHES": "1,2,4", "SPEED_WARMUP_SECONDS": "25"}
    engine = engine_with(tiny_weights, env, modes=("sd-turbo", "lcm"))
    with caplog.at_level(logging.INFO, logger="lib.engine.speed"):
        seconds = engine.warm_up()
    left_out = engine.speed["warmup"]["left_out"]
    assert set(seconds) == {"sd-turbo"}
    assert left_out["sd-turbo UNet"] == "batches 2,4: warm-up budget spent"
    assert left_out["lcm"] == "warm-up budget spent: runs without graphs or compiled code"
    assert "warm-up: lcm: warm-up budget spent" in caplog.text
    turbo, lcm = (graphs.installed(engine.modes[m].txt2img.unet) for m in ("sd-turbo", "lcm"))
    assert [key[2] for key in turbo.entries] == [1] and not lcm.entries
    monkeypatch.setattr(speed, "monotonic", __import__("time").monotonic)
    assert len(pixels(engine, tmp_path, num_outputs=2)) == 2 and len(pixels(engine, tmp_path, mode="lcm")) == 1
    assert turbo.fallbacks == 1 and lcm.fallbacks >= 1 and not lcm.entries  # nothing recorded on a request


def test_the_warm_up_keeps_exactly_the_planned_residents(tiny_weights, monkeypatch):
    """Under DEVICE_MEMORY_BUDGET (the bookkeeping runs on the CPU too): setup's warm-up warms and graphs only the
    modes the plan keeps on the device, moves nothing, and leaves exactly those modes (and their modules) there."""
    from lib.engine import memory
    from lib.engine.engine import plan_memory
    from lib.engine.loading import ComponentLoader
    from predict import Predictor

    settings = {
        "WEIGHTS_DIR": str(tiny_weights),
        "WEIGHTS_OFFLINE": "1",
        "SPEED_WARMUP": "1",
        "SPEED_CUDA_GRAPHS": "unet",
        "SPEED_GRAPH_BATCHES": "1,2",
    }
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ENABLED_MODES", raising=False)
    switches, names = speed.Switches.from_env(CPU), Settings().enabled_modes
    shapes = speed.graph_shapes(switches, names)
    plan = plan_memory(ComponentLoader(CPU, FP32), tiny_weights, names, True, shapes, switches.graph_memory)
    wanted = ["sdxl-turbo", "sd-turbo"]
    budget = math.ceil((plan.weights(wanted) + plan.working) / (1 - memory.MARGIN)) + 2
    monkeypatch.setenv("DEVICE_MEMORY_BUDGET", str(budget))
    monkeypatch.delenv("ENABLED_MODES", raising=False)
    p = Predictor()
    p.setup()
    residency = p.engine.residency
    assert residency.plan.resident == tuple(wanted) and residency.moves == 0
    assert list(residency.recent) == wanted
    assert p.engine.switches.graph_memory == residency.plan.graph_pool  # no graph larger than the pool counted
    planned = {id(m) for name in wanted for m in p.engine.modes[name].modules()} | {id(p.engine.safety.model)}
    assert residency.on_device == planned
    report = p.engine.speed["warmup"]
    assert set(report["modes_s"]) == set(wanted)
    for name in p.engine.modes:
        unet = graphs.installed(p.engine.modes[name].txt2img.unet)
        if name in wanted:
            assert unet is not None and unet.entries
        else:
            assert unet is None and report["left_out"][name].startswith("kept in host memory")


def test_moved_weights_are_recorded_again_and_give_the_same_images(tiny_weights, tmp_path, caplog):
    """A module moved out and back has its weights at new addresses (on the CPU: a copy makes new storage): its
    recordings are made again on first use, for the shapes warmed at setup, and the images stay the same."""
    engine = engine_with(tiny_weights, {"SPEED_CUDA_GRAPHS": "unet", "SPEED_GRAPH_BATCHES": "1,2"})
    engine.warm_up()
    before = pixels(engine, tmp_path, num_outputs=2)
    unet_module = engine.modes["sd-turbo"].txt2img.unet
    unet = graphs.installed(unet_module)
    old = unet._weights()
    with torch.no_grad():
        for p in unet_module.parameters():
            p.data = p.data.clone()
    with caplog.at_level(logging.INFO, logger="lib.engine.graphs"):
        after = pixels(engine, tmp_path, num_outputs=2)
    assert unet._weights() != old and "weights moved" in caplog.text
    assert [key[2] for key in unet.entries] == [2] and unet.fallbacks == 0
    assert largest_difference(before, after) == 0


def test_a_style_lora_runs_on_the_model_as_loaded(tiny_weights, tmp_path):
    """Inside style_lora the dispatcher steps aside (a replay would leave the adapters out) and compiled code is
    off; after it, the recorded shapes serve again, with the images from before."""
    from safetensors.torch import load_file

    from lib.loras.apply import style_lora

    mode = "lcm-lora-sd15"
    engine = engine_with(tiny_weights, {"SPEED_CUDA_GRAPHS": "unet"}, modes=(mode,))
    engine.warm_up()
    pipe = engine.modes[mode].txt2img
    unet = graphs.installed(pipe.unet)
    before = pixels(engine, tmp_path, mode=mode)
    replays = unet.replays
    state = load_file(tiny_weights / "latent-consistency/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors")
    with style_lora(pipe, state, 1.0, mode):
        styled = pixels(engine, tmp_path, mode=mode)
    assert unet.replays == replays and unet.fallbacks == 0  # stepped aside: not a replay, not a fallback either
    assert largest_difference(styled, before) > 10  # the adapters acted
    assert largest_difference(pixels(engine, tmp_path, mode=mode), before) == 0
    assert unet.replays > replays


def test_the_compile_cache_lives_beside_the_weights_and_a_second_compile_reuses_it(tmp_path, monkeypatch):
    """SPEED_COMPILE_CACHE (default WEIGHTS_DIR/.torch-compile) becomes inductor's cache folder; a compile after a
    reset (a new process, for the cache) finds its code there. An operator's own TORCHINDUCTOR_CACHE_DIR wins."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")
    weights = tmp_path / "weights"
    switches = speed.Switches.from_env(CPU, {"SPEED_COMPILE": "unet", "WEIGHTS_DIR": str(weights)})
    assert switches.compile_cache == weights / ".torch-compile"
    speed.configure_compile(switches)
    assert (weights / ".torch-compile").is_dir()

    def twice(x):
        return torch.nn.functional.silu(x) * 2

    hits, misses = (counters["inductor"].get(f"fxgraph_cache_{k}", 0) for k in ("hit", "miss"))
    for _ in range(2):
        torch._dynamo.reset()
        torch.compile(twice)(torch.randn(4, 8))
    assert counters["inductor"]["fxgraph_cache_miss"] == misses + 1
    assert counters["inductor"]["fxgraph_cache_hit"] == hits + 1
    assert any((weights / ".torch-compile" / "fxgraph").iterdir())
    mine = {"SPEED_COMPILE": "unet", "WEIGHTS_DIR": str(weights), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")}
    assert speed.Switches.from_env(CPU, mine).compile_cache == tmp_path / "mine"


def test_a_roomy_budget_keeps_the_graphs_limit(tiny_weights, monkeypatch):
    """Where the budget leaves the pool its full size, SPEED_GRAPH_MEMORY stands: the decoders' graphs, larger than
    the UNet's estimate, are recorded too."""
    from predict import Predictor

    settings = {
        "WEIGHTS_DIR": str(tiny_weights),
        "WEIGHTS_OFFLINE": "1",
        "ENABLED_MODES": "sd-turbo",
        "DEVICE_MEMORY_BUDGET": "100GB",
        "SPEED_WARMUP": "1",
        "SPEED_CUDA_GRAPHS": "unet,vae",
        "SPEED_GRAPH_BATCHES": "1",
    }
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    p = Predictor()
    p.setup()
    assert p.engine.residency.plan.graph_pool == p.engine.switches.graph_memory == Settings().speed_graph_memory
    decoder = graphs.installed(p.engine.modes["sd-turbo"].txt2img.vae.decoder)
    assert decoder is not None and decoder.entries  # recorded at setup
