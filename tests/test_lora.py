"""Style LoRAs (lib/loras/): fetched from a loopback nginx, checked, cached, applied, and always removed.

Tiny LoRAs are built here for the tiny models, in the kohya layout (like the real LCM-LoRA files) and in the
diffusers/peft layout. The server tests allow http and loopback with LORA_ALLOW_HTTP=1 (the only test switch);
the refusal tests run without it and reach no network.
"""

from __future__ import annotations

import http.server
import io
import pickle
import socket
import threading

import pytest
import torch
import urllib3.util.connection
from safetensors.torch import save, save_file

from lib.engine.engine import Cancelled
from lib.engine.inputs import InputError
from lib.loras import apply, cache, check, fetch
from lib.testkit.servers import FaultProxy, Nginx
from tests.test_prompt_cache import cache as prompt_cache

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj")
BASE = dict(prompt="a lighthouse at dusk", width=256, height=256, seed=11, output_format="png")


# -- tiny LoRA files -----------------------------------------------------------------------------------------------
def _layers(module, targets):
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(
            name == t or name.endswith("." + t) for t in targets
        ):
            yield name, m


def _pair(m, generator, rank=4):
    if isinstance(m, torch.nn.Linear):
        down, up = (rank, m.in_features), (m.out_features, rank)
    else:
        down, up = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
    return (torch.randn(down, generator=generator) * 0.3).half(), (torch.randn(up, generator=generator) * 0.3).half()


def _text_name(name: str) -> str:
    return name if name.startswith("text_model.") else "text_model." + name  # the name files use


def kohya_lora(pipe, seed: int, text: bool = True) -> dict:
    """lora_unet_<path>.lora_down/.lora_up/.alpha, lora_te_ (SD) or lora_te1_/lora_te2_ (SDXL)."""
    g = torch.Generator().manual_seed(seed)
    parts = [("lora_unet_", pipe.unet, ATTENTION, False)]
    if text:
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        parts.append(("lora_te1_" if sdxl else "lora_te_", pipe.text_encoder, TEXT, True))
        if sdxl:
            parts.append(("lora_te2_", pipe.text_encoder_2, TEXT, True))
    tensors = {}
    for prefix, module, targets, is_text in parts:
        for name, m in _layers(module, targets):
            key = prefix + (_text_name(name) if is_text else name).replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = _pair(m, g)
            tensors[f"{key}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    return tensors


def peft_lora(pipe, seed: int, text: bool = True) -> dict:
    """The diffusers/peft layout: unet.<module>.lora_A.weight / lora_B.weight (text_encoder.<module>...)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    parts = [("unet", pipe.unet, ATTENTION)] + ([("text_encoder", pipe.text_encoder, TEXT)] if text else [])
    for prefix, module, targets in parts:
        for name, m in _layers(module, targets):
            name = name if prefix == "unet" else _text_name(name)
            tensors[f"{prefix}.{name}.lora_A.weight"], tensors[f"{prefix}.{name}.lora_B.weight"] = _pair(m, g)
    return tensors


def snapshot(pipe) -> dict:
    """Every weight of the modules a LoRA touches, copied."""
    return {
        f"{c}.{k}": v.clone()
        for c in ("unet", "text_encoder", "text_encoder_2")
        if getattr(pipe, c, None) is not None
        for k, v in getattr(pipe, c).state_dict().items()
    }


def assert_untouched(pipe, before: dict) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    after = snapshot(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed"
    for c in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, c, None)
        if module is not None:
            assert not any(isinstance(m, BaseTunerLayer) for m in module.modules()), f"adapter layers left in {c}"
            assert not getattr(module, "peft_config", None)


# -- the server ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(predictor, tmp_path_factory):
    """The tiny LoRAs (and bad files) on disk, by name."""
    root = tmp_path_factory.mktemp("loras")
    modes = predictor.engine.modes
    sd15, sd_turbo, sdxl = (modes[m].txt2img for m in ("lcm", "sd-turbo", "sdxl-turbo"))
    tensors = {
        "kohya-sd15.safetensors": kohya_lora(sd15, 1),
        "kohya-sd15-b.safetensors": kohya_lora(sd15, 2, text=False),
        "kohya-sd15-c.safetensors": kohya_lora(sd15, 3, text=False),
        "peft-sd-turbo.safetensors": peft_lora(sd_turbo, 4),
        "kohya-sdxl.safetensors": kohya_lora(sdxl, 5),
        "not-a-lora.safetensors": {"model.weight": torch.zeros(4, 4)},
    }
    for name, t in tensors.items():
        save_file(t, root / name)
    torch.save(tensors["kohya-sd15.safetensors"], root / "pickled.safetensors")  # a pickle, whatever its name
    (root / "page.safetensors").write_text("<!doctype html><title>Sign in</title>")
    return root


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    """nginx serving `files`, behind a proxy that logs every request (to count downloads)."""
    with Nginx(files, tmp_path_factory.mktemp("nginx")) as nginx, FaultProxy(nginx.port) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def lora_env(tmp_path, monkeypatch):
    """A fresh cache per test, and http + loopback allowed (the server tests need them; refusal tests unset it)."""
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "lora-cache"))
    monkeypatch.setenv("LORA_ALLOW_HTTP", "1")
    return tmp_path / "lora-cache"


def read(paths) -> list[bytes]:
    return [p.read_bytes() for p in paths]


# -- layouts, scale, isolation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,name",
    [
        ("lcm", "kohya-sd15"),
        ("sd-turbo", "peft-sd-turbo"),
        ("sdxl-turbo", "kohya-sdxl"),
        ("sdxl-lightning-4step", "kohya-sdxl"),
    ],
    ids=[
        "kohya-sd15-with-text-encoder",
        "diffusers-layout",
        "kohya-sdxl-two-text-encoders",
        "kohya-sdxl-on-a-fused-lightning-unet",
    ],
)
def test_style_lora_changes_the_images_and_leaves_no_trace(predictor, run, server, mode, name):
    pipe = predictor.engine.modes[mode].txt2img
    before = snapshot(pipe)
    base, _ = run(**BASE, mode=mode, num_outputs=2)
    styled, metrics = run(**BASE, mode=mode, num_outputs=2, lora_url=f"{server.url}/{name}.safetensors")
    assert all(a != b for a, b in zip(read(base), read(styled), strict=True)), "the LoRA changed nothing"
    assert metrics["lora_cache_hit"] is False and metrics["timings.lora_fetch"] > 0
    assert metrics["timings.lora_load"] > 0
    again, _ = run(**BASE, mode=mode, num_outputs=2)
    assert read(again) == read(base), "the next request's images differ from before: the LoRA leaked"
    assert_untouched(pipe, before)


def test_a_text_encoder_lora_acts_on_a_prompt_whose_embeddings_are_cached(predictor, run, server):
    """The prompt cache (lib/engine/prompts.py) holds plain embeddings: a batch with a style LoRA (this one adapts
    the text encoder too) encodes afresh, and caches nothing."""
    url = f"{server.url}/kohya-sd15.safetensors"
    with prompt_cache(predictor, 0):
        fresh, _ = run(**BASE, mode="lcm", lora_url=url)
    with prompt_cache(predictor, 4):
        base, _ = run(**BASE, mode="lcm")  # the plain embeddings, cached
        styled, _ = run(**BASE, mode="lcm", lora_url=url)
        again, _ = run(**BASE, mode="lcm")
    assert read(styled) == read(fresh), "the LoRA's text encoder was bypassed by cached embeddings"
    assert read(again) == read(base), "the LoRA's embeddings were cached"


def test_text_encoder_layers_are_applied(predictor, server):
    """The kohya file's lora_te_ layers act: the prompt embeddings change while the LoRA is on."""
    pipe = predictor.engine.modes["lcm"].txt2img
    ids = pipe.tokenizer(["a fox"], return_tensors="pt").input_ids
    plain = pipe.text_encoder(ids)[0]
    with apply.style_lora(pipe, cache.fetch(f"{server.url}/kohya-sd15.safetensors"), 1.0, "lcm"):
        assert apply._adapter_layers(pipe.text_encoder)
        assert not torch.equal(plain, pipe.text_encoder(ids)[0])
    assert torch.equal(plain, pipe.text_encoder(ids)[0])


def test_scale_zero_equals_the_base_model_and_scale_matters(run, server):
    url = f"{server.url}/peft-sd-turbo.safetensors"
    base, _ = run(**BASE, mode="sd-turbo")
    zero, _ = run(**BASE, mode="sd-turbo", lora_url=url, lora_scale=0)
    half, _ = run(**BASE, mode="sd-turbo", lora_url=url, lora_scale=0.5)
    full, _ = run(**BASE, mode="sd-turbo", lora_url=url, lora_scale=1)
    assert read(zero) == read(base)
    assert len({*read(base), *read(half), *read(full)}) == 3


def test_combined_with_the_fused_lcm_lora_as_two_adapters(predictor, run, server, tiny_weights):
    """lcm-lora-sd15: LCM-LoRA fused at setup + the style adapter == LCM and style as two unfused adapters
    (LCM at 1.0); afterwards the fused UNet is bit-identical (the LCM-LoRA stays fused)."""
    from diffusers import StableDiffusionPipeline

    from lib.engine.modes import LORA_WEIGHT_NAME, MODES

    mode = MODES["lcm-lora-sd15"]
    pipe = predictor.engine.modes[mode.name].txt2img
    before = snapshot(pipe)
    style = cache.fetch(f"{server.url}/kohya-sd15-b.safetensors")
    g = torch.Generator().manual_seed(0)
    sample, text = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g),
    )

    def unet_out(p):
        with torch.no_grad():
            return p.unet(sample, 500, text).sample

    fused_plain = unet_out(pipe)
    with apply.style_lora(pipe, style, 0.7, mode.name):
        fused_styled = unet_out(pipe)

    reference = StableDiffusionPipeline.from_pretrained(
        tiny_weights / mode.weights.repo.repo_id,
        variant="fp16",
        dtype=torch.float32,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.load_lora_weights(
        tiny_weights / mode.weights.lora.repo_id, weight_name=LORA_WEIGHT_NAME, adapter_name="lcm"
    )
    reference.load_lora_weights(apply.load_state_dict(style), adapter_name="style")
    reference.set_adapters(["lcm", "style"], [1.0, 0.7])
    two_adapters = unet_out(reference)
    reference.set_adapters(["lcm"], [1.0])
    assert torch.allclose(unet_out(reference), fused_plain, atol=1e-4, rtol=1e-4)  # the reference is sound
    assert torch.allclose(fused_styled, two_adapters, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fused_styled, fused_plain, atol=1e-3)
    assert torch.equal(unet_out(pipe), fused_plain)
    assert_untouched(pipe, before)
    paths, _ = run(**BASE, mode=mode.name, lora_url=style.url)  # and through the predictor
    assert len(paths) == 1


def test_fused_qkv_attention_is_bypassed_while_the_lora_is_on_and_restored(tiny_weights, server):
    """With SPEED_FUSE_QKV (on by default on CUDA) attention runs to_qkv; a LoRA on to_q/to_k/to_v must not
    be silently ignored, and the fused processors come back afterwards."""
    from lib.engine.loading import load_modes

    pipe = load_modes(tiny_weights, ("sd-turbo",), torch.device("cpu"), torch.float32)["sd-turbo"].txt2img
    style = cache.fetch(f"{server.url}/peft-sd-turbo.safetensors")
    g = torch.Generator().manual_seed(0)
    sample, text = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g),
    )

    def unet_out():
        with torch.no_grad():
            return pipe.unet(sample, 500, text).sample

    with apply.style_lora(pipe, style, 1.0, "sd-turbo"):
        unfused_styled = unet_out()
    pipe.unet.fuse_qkv_projections()
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    fused_plain = unet_out()
    with apply.style_lora(pipe, style, 1.0, "sd-turbo"):
        assert torch.allclose(unet_out(), unfused_styled, atol=1e-5)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors
    assert torch.equal(unet_out(), fused_plain)


# -- what is refused -----------------------------------------------------------------------------------------------
def test_lora_for_another_base_model_is_refused_naming_the_mismatch(predictor, run, server):
    pipe = predictor.engine.modes["sdxl-turbo"].txt2img
    before = snapshot(pipe)
    base, _ = run(**BASE, mode="sdxl-turbo")
    with pytest.raises(InputError) as err:
        run(**BASE, mode="sdxl-turbo", lora_url=f"{server.url}/kohya-sd15.safetensors")
    message = str(err.value)
    assert message.startswith("lora_url: this LoRA does not fit mode sdxl-turbo's model (SDXL)")
    assert "UNet layers are not in the model (e.g. down_blocks.0.attentions.0.proj_in" in message
    assert "other shapes" in message and "cross-attention width is 32, the model's 96" in message
    assert_untouched(pipe, before)
    again, _ = run(**BASE, mode="sdxl-turbo")
    assert read(again) == read(base)
    # A file with no LoRA layers at all.
    with pytest.raises(InputError, match="lora_url: .*(LoRA|UNet)"):
        run(**BASE, mode="sd-turbo", lora_url=f"{server.url}/not-a-lora.safetensors")


@pytest.mark.parametrize("name,what", [("pickled", "zip archive"), ("page", "HTML")])
def test_non_safetensors_files_are_refused_without_being_loaded(run, server, lora_env, monkeypatch, name, what):
    def never(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    with pytest.raises(InputError) as err:
        run(**BASE, mode="lcm", lora_url=f"{server.url}/{name}.safetensors")
    assert str(err.value).startswith(f"lora_url: the file is a{'n' if what[0] in 'H' else ''} {what}")
    assert "only .safetensors" in str(err.value)
    assert not list(lora_env.glob("*.safetensors")) and not list(lora_env.glob(".*.part"))


def test_too_big_is_refused_on_content_length(run, server, files, lora_env, monkeypatch):
    size = (files / "kohya-sd15.safetensors").stat().st_size
    monkeypatch.setenv("LORA_MAX_BYTES", str(size - 1))
    with pytest.raises(
        InputError, match=r"lora_url: the file is [\d.]+ MB; allowed: up to [\d.]+ MB \(LORA_MAX_BYTES\)"
    ):
        run(**BASE, mode="lcm", lora_url=f"{server.url}/kohya-sd15.safetensors")
    assert not list(lora_env.glob("*"))


class FakeResponse:
    def __init__(self, chunks):
        self.chunks = chunks

    def iter_content(self, size):
        yield from self.chunks


def _file(n_floats: int, note: str = "") -> bytes:
    return save({"lora_unet_x.lora_down.weight": torch.zeros(n_floats)}, metadata={"note": note})


@pytest.mark.parametrize(
    "case,message",
    [
        ("over the cap while streaming", "larger than"),
        ("header declares too much", "allowed: up to"),
        ("longer than the header", "longer than its safetensors header"),
        ("truncated", "ended after"),
    ],
)
def test_size_is_checked_while_streaming(tmp_path, case, message):
    """No Content-Length (chunked): the cap and the header's size are enforced on the bytes as they come."""
    data = _file(1000)
    limit = 10**6
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    if case == "over the cap while streaming":  # a header longer than the cap: refused before it is complete
        data = _file(10, note="x" * 5000)
        limit, chunks = 3000, [data[i : i + 1000] for i in range(0, len(data), 1000)]
    elif case == "header declares too much":
        limit = len(data) - 1
    elif case == "longer than the header":
        chunks = chunks + [b"trailing"]
    else:
        chunks = chunks[:-1]
    with pytest.raises(InputError, match=message):
        fetch._stream(FakeResponse(chunks), tmp_path / "x.part", limit, deadline=float("inf"))


@pytest.mark.parametrize(
    "url,reason",
    [
        ("http://example.com/style.safetensors", "uses http; only https URLs are allowed"),
        ("https://127.0.0.1/style.safetensors", "a loopback address"),
        ("https://169.254.169.254/latest/meta-data", "a cloud metadata address"),
        ("https://168.63.129.16/machine", "a cloud metadata address"),
        ("https://10.1.2.3/style.safetensors", "a private address"),
        ("https://192.168.0.10/style.safetensors", "a private address"),
        ("https://[::1]/style.safetensors", "a loopback address"),
        ("https://[::ffff:10.0.0.1]/style.safetensors", "a private address"),
        ("https://[fe80::1]/style.safetensors", "a link-local address"),
        ("https://100.64.0.1/style.safetensors", "not a public address"),
        ("https://0.0.0.0/style.safetensors", "address"),
        ("https://user:secret@example.com/style.safetensors", "credentials"),
        ("file:///etc/passwd", "not an https URL"),
    ],
)
def test_http_and_inward_addresses_are_refused_without_the_switch(monkeypatch, url, reason):
    monkeypatch.delenv("LORA_ALLOW_HTTP")
    with pytest.raises(InputError) as err:
        cache.fetch(url)
    assert str(err.value).startswith("lora_url: ") and reason in str(err.value)
    assert "secret" not in str(err.value)


def test_host_names_are_checked_on_every_address_they_resolve_to(monkeypatch):
    """A public-looking name that resolves inward is refused at connect time (the resolver is faked: no network),
    also when only one of its addresses is inward."""
    monkeypatch.delenv("LORA_ALLOW_HTTP")
    answers = {
        "internal.example": ["10.0.0.7"],
        "metadata.example": ["169.254.169.254"],
        "mixed.example": ["93.184.216.34", "127.0.0.1"],
    }
    real = socket.getaddrinfo
    connected = []

    def fake(host, port, *args, **kwargs):
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]
        return real(host, port, *args, **kwargs)

    def no_connection(address, *args, **kwargs):
        connected.append(address)
        raise OSError("no connection in this test")

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", no_connection)
    for host, why in (
        ("internal.example", "10.0.0.7, a private address"),
        ("metadata.example", "169.254.169.254, a cloud metadata address"),
        ("mixed.example", "127.0.0.1, a loopback address"),
        ("localhost", "a loopback address"),
    ):
        with pytest.raises(InputError, match=f"lora_url: host {host} resolves to .*{why}"):
            cache.fetch(f"https://{host}/style.safetensors")
    assert not connected


def test_the_predictor_refuses_before_any_work(run, monkeypatch):
    monkeypatch.delenv("LORA_ALLOW_HTTP")
    with pytest.raises(InputError, match="lora_url: http://example.com/x.safetensors uses http"):
        run(**BASE, mode="sd-turbo", lora_url="http://example.com/x.safetensors")
    with pytest.raises(InputError, match="lora_scale: 2.5 is out of range; allowed: 0 to 2"):
        run(**BASE, mode="sd-turbo", lora_url="https://example.com/x.safetensors", lora_scale=2.5)
    with pytest.raises(InputError, match="lora_url: 'ftp://x' is not an https URL"):
        run(**BASE, mode="sd-turbo", lora_url="ftp://x")


class Redirects(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self):  # noqa: N802
        parts = self.path.strip("/").split("/")
        if parts[0] == "loop":
            location = f"/loop/{int(parts[1]) + 1}"
        elif parts[0] == "to-file":
            location = "file:///etc/passwd"
        else:
            location = self.target
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_redirects_are_followed_and_every_hop_is_checked(server):
    Redirects.target = f"{server.url}/kohya-sd15-b.safetensors"
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirects)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        fetched = cache.fetch(f"{base}/style")
        assert fetched.read() == cache.fetch(Redirects.target).read()
        with pytest.raises(InputError, match="lora_url: file:///etc/passwd is not an https URL"):
            cache.fetch(f"{base}/to-file")
        with pytest.raises(InputError, match="more than 5 redirects"):
            cache.fetch(f"{base}/loop/0")
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- the cache -----------------------------------------------------------------------------------------------------
def test_cache_hit_skips_the_download_and_lru_eviction_keeps_the_budget(run, server, files, lora_env, monkeypatch):
    server.reset()
    names = ["kohya-sd15.safetensors", "kohya-sd15-b.safetensors", "kohya-sd15-c.safetensors"]
    urls = [f"{server.url}/{n}" for n in names]
    sizes = [(files / n).stat().st_size for n in names]

    _, first = run(**BASE, mode="lcm", lora_url=urls[0])
    _, second = run(**BASE, mode="lcm", lora_url=urls[0])
    assert (first["lora_cache_hit"], second["lora_cache_hit"]) == (False, True)
    assert len(server.requests("GET", names[0])) == 1
    assert (lora_env / f"{cache.cache_key(urls[0])}.safetensors").read_bytes() == (files / names[0]).read_bytes()

    # Room for two: fetch a, b; use a again (b is now least recently used); fetching c evicts b, keeps a.
    monkeypatch.setenv("LORA_CACHE_BYTES", str(sizes[0] + max(sizes[1:]) + 10))
    cache.fetch(urls[1])
    assert cache.fetch(urls[0]).cached
    cache.fetch(urls[2])
    kept = {p.name for p in lora_env.glob("*.safetensors")}
    assert kept == {f"{cache.cache_key(u)}.safetensors" for u in (urls[0], urls[2])}
    assert sum(p.stat().st_size for p in lora_env.glob("*.safetensors")) <= sizes[0] + max(sizes[1:]) + 10
    assert not cache.fetch(urls[1]).cached  # evicted: downloaded again
    assert len(server.requests("GET", names[1])) == 2


def test_a_fetched_lora_survives_its_eviction_until_it_runs(server, lora_env, monkeypatch):
    held = cache.fetch(f"{server.url}/kohya-sd15-b.safetensors")
    monkeypatch.setenv("LORA_CACHE_BYTES", "1")
    cache.fetch(f"{server.url}/kohya-sd15-c.safetensors")
    assert not held.path.exists()
    assert apply.load_state_dict(held)  # still readable through the job's open file


def test_cached_load_is_fast(predictor, server):
    url = f"{server.url}/kohya-sd15-b.safetensors"
    cache.fetch(url)
    hit = cache.fetch(url)
    assert hit.cached and hit.seconds < 0.5
    pipe = predictor.engine.modes["lcm"].txt2img
    with apply.style_lora(pipe, hit, 1.0, "lcm"):
        pass  # applying + removing a tiny LoRA: well under a second even on a small CPU (measured in the docs)


# -- no leak after an error or a cancel ----------------------------------------------------------------------------
def test_no_leak_after_an_error_during_the_run(predictor, run, server):
    pipe = predictor.engine.modes["lcm"].txt2img
    before = snapshot(pipe)
    base, _ = run(**BASE, mode="lcm")

    def fail(module, args):
        raise RuntimeError("the device fell over")

    hook = pipe.unet.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="the device fell over"):
            run(**BASE, mode="lcm", lora_url=f"{server.url}/kohya-sd15.safetensors")
    finally:
        hook.remove()
    assert_untouched(pipe, before)
    again, _ = run(**BASE, mode="lcm")
    assert read(again) == read(base)


def test_a_retry_after_the_device_ran_out_of_memory_applies_the_lora_again(predictor, run, server):
    url = f"{server.url}/kohya-sd15.safetensors"
    styled, _ = run(**BASE, mode="lcm", lora_url=url)
    pipe = predictor.engine.modes["lcm"].txt2img
    calls = []

    def out_of_memory_once(module, args):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised by the test)")

    hook = pipe.unet.register_forward_pre_hook(out_of_memory_once)
    try:
        retried, _ = run(**BASE, mode="lcm", lora_url=url)
    finally:
        hook.remove()
        for name in predictor.engine.modes:  # the retry moved the other modes out: back as they were
            predictor.engine.residency.ensure(name)
    assert len(calls) > 1 and read(retried) == read(styled)


def test_no_leak_after_a_cancel(predictor, run, server, tmp_path):
    engine = predictor.engine
    pipe = engine.modes["lcm"].txt2img
    before = snapshot(pipe)
    base, _ = run(**BASE, mode="lcm", num_inference_steps=4)
    request = engine.request(**BASE, mode="lcm", num_inference_steps=4, lora_url=f"{server.url}/kohya-sd15.safetensors")
    job = engine.job(request, tmp_path)
    steps = []

    def cancel_after_one_step(module, args):
        steps.append(1)
        if len(steps) == 2:
            job.cancelled = True  # what the batcher does when the prediction is canceled

    hook = pipe.unet.register_forward_pre_hook(cancel_after_one_step)
    try:
        with pytest.raises(Cancelled):
            list(engine.run_batch([job]))
    finally:
        hook.remove()
    assert len(steps) == 2
    assert_untouched(pipe, before)
    again, _ = run(**BASE, mode="lcm", num_inference_steps=4)
    assert read(again) == read(base)


def test_lora_url_and_scale_are_part_of_the_batch_key(predictor):
    from lib.engine.engine import batch_key

    def key(**extra):
        return batch_key(predictor.engine.request(**BASE, mode="sd-turbo", **extra))

    url = "https://example.com/a.safetensors"
    assert key() == key(lora_scale=0.3)  # no LoRA: the scale does not matter
    assert key(lora_url=url) == key(lora_url=url, lora_scale=1.0) != key()
    assert key(lora_url=url) != key(lora_url=url, lora_scale=0.5)
    assert key(lora_url=url) != key(lora_url=url.replace("a.", "b."))


def test_lycoris_and_foreign_layouts_are_refused_clearly(predictor):
    pipe = predictor.engine.modes["lcm"].txt2img
    before = snapshot(pipe)
    loha = {
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(4, 4),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.0),
    }
    with pytest.raises(InputError, match=r"lora_url: not a LoRA layout that can be read \(kohya or diffusers/peft\)"):
        with apply.style_lora(pipe, loha, 1.0, "lcm"):
            pass
    flux = {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4),
    }
    with pytest.raises(InputError, match="lora_url: the file has layers for transformer"):
        with apply.style_lora(pipe, flux, 1.0, "lcm"):
            pass
    assert_untouched(pipe, before)


def test_header_check_unit():
    good = save({"a": torch.zeros(3)})
    assert check.check_header(good)[1] == len(good)
    assert check.check_header(good[:5]) is None
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(3)}, buffer)
    with pytest.raises(InputError, match="zip archive"):
        check.check_header(buffer.getvalue())
    with pytest.raises(InputError, match="pickle"):
        check.check_header(pickle.dumps({"a": 1}, protocol=4))
    bad = bytearray(good)
    bad[8:9] = b"["
    with pytest.raises(InputError):
        check.check_header(bytes(bad))
