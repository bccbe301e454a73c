"""Device memory (lib/engine/memory.py): the plan under DEVICE_MEMORY_BUDGET, modes moved in and out (least
recently used first) with the same images before and after, the metric and log line of a move, requests grouped
by mode, and a budget too small for a mode; plus the warm-up on the thread that serves predictions."""

from __future__ import annotations

import asyncio
import io
import math
import os
import threading

import pytest
import torch
from PIL import Image

from lib.engine import memory
from lib.engine.batcher import Batcher
from lib.engine.engine import Engine, plan_memory
from lib.engine.loading import ComponentLoader
from lib.engine.modes import DEFAULT_ENABLED, MODES
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
    # Room for the modes that need least only: the message names what fits (of the modes setup enables by default).
    smallest = min(DEFAULT_ENABLED, key=plan.needs.get)
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


# -- what the plan budgets -------------------------------------------------------------------------------------------
def test_the_plan_budgets_the_largest_request_of_each_mode(tiny_weights, monkeypatch):
    """Working memory for the largest request a mode accepts (2048x2048, 8 images, classifier-free guidance doubling
    the UNet's batch where the mode allows guidance above 1), the decode of one image, the safety checker; a budget
    with room for a mode's weights and a default request but not its largest request fails setup, saying so."""
    from lib.engine.inputs import NUM_OUTPUTS_RANGE, SIZE_RANGE

    plan = unlimited_plan(tiny_weights)
    biggest, images = SIZE_RANGE[1], NUM_OUTPUTS_RANGE[1]
    for name, estimate in plan.estimates.items():
        mode = MODES[name]
        cfg = name.startswith("lcm-lora")  # guidance up to 2, not embedded: the UNet runs twice the batch
        assert mode.uses_cfg(max(mode.guidance.values + (mode.guidance.range or ()))) == cfg
        assert plan.largest[name] == estimate.need(biggest, biggest, images, mode.steps.range[1], cfg)
        unet = images * (2 if cfg else 1) * memory.unet_bytes(estimate.unet, biggest, biggest, FP32)
        assert plan.largest[name] > unet > estimate.need(mode.size, mode.size, 1, mode.steps.default, False)
    # The same SD 1.5 UNet architecture: with guidance as an embedding (lcm) one pass, with CFG (the LoRA) two.
    lcm, lora = plan.estimates["lcm"], plan.estimates["lcm-lora-sd15"]
    assert memory.unet_bytes(lcm.unet, 512, 512, FP32) == memory.unet_bytes(lora.unet, 512, 512, FP32)
    assert plan.working == max(plan.largest.values())
    # Room for the weights and a default request, not for the largest one:
    name = "sd-turbo"
    default = plan.estimates[name].need(512, 512, 1, 1, False)
    budget = math.ceil((plan.weights([name]) + default) / (1 - memory.MARGIN)) + 2
    monkeypatch.setenv("ENABLED_MODES", name)
    monkeypatch.setenv("DEVICE_MEMORY_BUDGET", str(budget))
    from predict import Predictor

    monkeypatch.setenv("WEIGHTS_DIR", str(tiny_weights))
    monkeypatch.setenv("WEIGHTS_OFFLINE", "1")
    with pytest.raises(memory.MemoryBudgetError, match=r"working memory for its largest request: 2048x2048, 8 images"):
        Predictor().setup()


def test_the_estimates_are_at_or_above_the_measured_peaks(tiny_weights):
    """The UNet, decoder and safety checker estimates against the live activation memory measured on the CPU
    (lib/testkit/memtrace.py) for the tiny models, which keep the real architectures: at or above, within 3.5x (at
    sizes where the activations dwarf what the CPU's attention kernel keeps for itself)."""
    from lib.engine.loading import load_modes
    from lib.engine.safety import SafetyChecker
    from lib.testkit.memtrace import LiveBytes

    plan = unlimited_plan(tiny_weights)
    modes = load_modes(tiny_weights, ("sd-turbo", "sdxl-turbo", "lcm"), CPU, FP32)
    ratios = {}
    for name, loaded in modes.items():
        unet, config = loaded.txt2img.unet, dict(loaded.txt2img.unet.config)
        for size, batch in ((768, 1), (1024, 2)):
            latents = torch.randn(batch, 4, size // 8, size // 8)
            extra = {}
            if config.get("addition_embed_type") == "text_time":
                pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
                conditions = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}
                extra["added_cond_kwargs"] = conditions
            if config.get("time_cond_proj_dim"):
                extra["timestep_cond"] = torch.randn(batch, config["time_cond_proj_dim"])
            context = torch.randn(batch, 77, config["cross_attention_dim"])
            with torch.no_grad(), LiveBytes() as live:
                unet(latents, torch.tensor(500.0), context, **extra)
            ratios[(name, "unet", size)] = batch * memory.unet_bytes(config, size, size, FP32) / live.peak
            for decoder in (loaded.txt2img.vae, loaded.tiny_vae):
                with torch.no_grad(), LiveBytes() as live:
                    decoder.decode(latents[:1])
                estimate = memory.vae_bytes(size, size, memory.decoder_width(decoder.config), FP32)
                ratios[(name, type(decoder).__name__, size)] = estimate / live.peak
    checker = SafetyChecker.load(tiny_weights, CPU, FP32)
    pixels = torch.randint(0, 256, (3, 512, 384, 3), dtype=torch.uint8)
    with LiveBytes() as live:
        checker.check(pixels)
    tokens, width = plan.estimates["sd-turbo"].safety
    ratios[("safety checker", 3, 512)] = memory.safety_bytes(384, 512, 3, FP32, tokens, width) / live.peak
    assert all(1 <= r <= 3.5 for r in ratios.values()), ratios


# -- out of memory: evict, retry after the except block, smaller chunks, tiles -----------------------------------------
@pytest.fixture
def two_modes(tiny_weights):
    """An engine of its own with two resident modes (so that a request can move the other out), no safety checker."""
    from lib.engine.loading import load_modes

    return Engine(load_modes(tiny_weights, ("sd-turbo", "lcm"), CPU, FP32), CPU, FP32)


def out_of_memory(weakrefs: list):
    """Raise the device's out-of-memory error from a frame that holds a tensor (as a failed attempt holds its
    activations), keeping a weak reference to the tensor."""
    import weakref

    held = torch.ones(1024)
    weakrefs.append(weakref.ref(held))
    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


def images_of(engine, tmp_path, name, **extra):
    inputs = dict(prompt="a fox", mode="sd-turbo", width=256, height=256, seed=5, output_format="png")
    request = engine.request(**inputs, **extra)
    (tmp_path / name).mkdir()
    return [o.path.read_bytes() for o in engine.run(request, tmp_path / name)]


def test_an_out_of_memory_denoise_is_retried_after_the_except_block(two_modes, tmp_path):
    """The retry starts once the failed attempt's tensors are gone (inside the `except` block its traceback would
    still hold them), with the other mode moved out; the images are those of an undisturbed run."""
    want = images_of(two_modes, tmp_path, "plain")
    unet = two_modes.modes["sd-turbo"].txt2img.unet
    refs, alive_at_retry = [], []

    def hook(module, args):
        if not refs:
            out_of_memory(refs)
        alive_at_retry.append(refs[0]() is not None)

    handle = unet.register_forward_pre_hook(hook)
    try:
        got = images_of(two_modes, tmp_path, "retried")
    finally:
        handle.remove()
    assert alive_at_retry == [False] and got == want
    assert not two_modes.residency.is_resident("lcm")


def test_an_out_of_memory_decode_is_retried_then_tiled(two_modes, tmp_path, monkeypatch, caplog):
    """Decode out of memory: retried after the except block with the other mode moved out; still out of memory,
    the image is decoded in overlapping tiles (a few of the decoder's calls per image) at its full size."""
    import logging

    from lib.engine import decoding

    vae = two_modes.modes["sd-turbo"].txt2img.vae
    want = images_of(two_modes, tmp_path, "plain", num_outputs=2)
    refs, alive_at_retry, tiles = [], [], []
    real = type(vae).decode

    def decode_once_failing(latents, *args, **kwargs):  # out of memory once, then fine
        if not refs:
            out_of_memory(refs)
        alive_at_retry.append(refs[0]() is not None)
        return real(vae, latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode_once_failing, raising=False)
    assert images_of(two_modes, tmp_path, "retried", num_outputs=2) == want
    assert alive_at_retry == [False, False] and not two_modes.residency.is_resident("lcm")

    def decode_only_in_tiles(latents, *args, **kwargs):  # whole images never fit
        if not vae.use_tiling:
            out_of_memory([])
        return real(vae, latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode_only_in_tiles, raising=False)
    monkeypatch.setattr(decoding, "TILE", 128)
    handle = vae.decoder.register_forward_pre_hook(lambda module, args: tiles.append(tuple(args[0].shape[-2:])))
    try:
        with caplog.at_level(logging.WARNING, logger="lib.engine"):
            tiled = images_of(two_modes, tmp_path, "tiled", num_outputs=2)
    finally:
        handle.remove()
    assert len(tiled) == 2 and tiled != want
    assert all(Image.open(io.BytesIO(b)).size == (256, 256) for b in tiled)
    assert len(tiles) == 2 * 9 and set(tiles) <= {(16, 16), (16, 8), (8, 16), (8, 8)}  # 128 px tiles, overlapping
    assert "out of device memory decoding a 256x256 image: decoding it in tiles" in caplog.text
    assert not vae.use_tiling  # only for that decode


# -- moves -------------------------------------------------------------------------------------------------------------
def test_host_copies_are_made_once_and_a_move_copies_each_tensor_once():
    """A module's host copy is made the first time it leaves the device and kept: moving out again copies nothing
    (the tensors point back at their copies), moving in copies each tensor once; the weights stay exact."""
    from torch.overrides import TorchFunctionMode

    class Copies(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("clone", "copy_", "to", "pin_memory", "cpu", "contiguous"):
                self.count += 1
            return func(*args, **(kwargs or {}))

    a, b = torch.nn.Linear(40, 50), torch.nn.Linear(40, 50)
    original = {name: [t.detach().clone() for t in m.state_dict().values()] for name, m in {"a": a, "b": b}.items()}
    modules = {"a": [a], "b": [b]}
    sizes = {name: memory.module_bytes(ms[0]) for name, ms in modules.items()}
    plan = memory.make_plan(
        {n: frozenset([n]) for n in modules}, sizes, frozenset(), {"a": 0, "b": 0}, 12_000, "DEVICE_MEMORY_BUDGET"
    )
    assert plan.resident == ("a",)
    residency = memory.Residency(plan, modules, CPU, copies=True)
    residency.pin_host()  # b waits in host memory: its copy is made now
    host_b = [t.data_ptr() for t in residency.host[id(b)]]
    assert [t.data_ptr() for t in b.parameters()] == host_b
    counts, first = [], None
    for _ in range(3):
        with Copies() as copies:
            residency.ensure("b")  # a out (its copy made the first time only), b in: one copy per tensor
        counts.append(copies.count)
        assert residency.is_resident("b") and not residency.is_resident("a")
        host_a = [t.data_ptr() for t in residency.host[id(a)]]
        first = first or host_a
        assert [t.data_ptr() for t in a.parameters()] == host_a == first  # a points at its one copy
        assert not {t.data_ptr() for t in b.parameters()} & set(host_b)  # b in memory of its own
        with Copies() as copies:
            residency.ensure("a")  # b out without a copy, a in: one copy per tensor
        assert copies.count == 2
        assert [t.data_ptr() for t in b.parameters()] == host_b == [t.data_ptr() for t in residency.host[id(b)]]
    assert counts == [4, 2, 2]  # the first time a left: its two tensors copied to the host, then never again
    for name, m in {"a": a, "b": b}.items():
        assert all(torch.equal(x, y) for x, y in zip(m.state_dict().values(), original[name], strict=True))


def test_the_budget_caps_the_cuda_allocator_and_the_decode_room(monkeypatch):
    """DEVICE_MEMORY_BUDGET becomes the CUDA allocator's limit (an allocation beyond it fails, and is retried with
    less), lifted again by an engine loaded without it; the decode's chunks are sized within it. The CUDA calls are
    recorded here (this machine may have no GPU): the budget check on a GPU is scripts/gpu_check.sh's."""
    gib, calls = 2**30, []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80 * gib}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append(f))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 12 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 10 * gib)
    cuda = torch.device("cuda", 0)
    memory.cap_allocator(cuda, 24 * gib)
    assert calls == [24 / 80] and memory.device_room(cuda) == 14 * gib  # 24 GiB less the 10 allocated
    memory.cap_allocator(cuda, None)
    assert calls == [24 / 80, 1.0] and memory.device_room(cuda) == 72 * gib  # free + reserved but unused
    assert memory.device_room(CPU) is None


def test_the_cuda_graphs_pool_gets_what_the_budget_leaves_beside_the_largest_request():
    """The graphs' shared pool is counted with the weights; within a budget it never crowds out a mode's largest
    request: it shrinks to what is left (and the engine records no graph larger than that)."""
    gb = 10**9
    modes = {"small": frozenset({"a"}), "large": frozenset({"b"})}
    sizes, working = {"a": 1 * gb, "b": 3 * gb}, {"small": 2 * gb, "large": 18 * gb}
    roomy = memory.make_plan(modes, sizes, frozenset(), working, 40 * gb, "test", graph_pool=2 * gb)
    assert roomy.graph_pool == 2 * gb and roomy.weights(["small"]) == 3 * gb  # counted once, with the weights
    tight = memory.make_plan(modes, sizes, frozenset(), working, 24 * gb, "test", graph_pool=4 * gb)
    usable = int(24 * gb * (1 - memory.MARGIN))
    assert tight.graph_pool == usable - (3 * gb + 18 * gb)  # what the largest request leaves
    assert max(tight.needs.values()) <= usable  # every mode still serves its largest request
    assert memory.make_plan(modes, sizes, frozenset(), working, None, "test", graph_pool=4 * gb).graph_pool == 4 * gb
