"""Applying a style LoRA to a mode's pipeline for one batch, and removing it after, whatever happens (see the
package docstring)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from lib.engine.inputs import InputError
from lib.engine.modes import MODES
from lib.loras.cache import LoraFile
from lib.loras.check import check_file

log = logging.getLogger(__name__)

ADAPTER = "style"
CROSS_ATTENTION_BASES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
COMPONENT_LABELS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


def load_state_dict(lora: LoraFile) -> dict:
    """The tensors of a fetched file, read through the job's open handle (the cache may have evicted the file);
    the header is checked again first. Only safetensors' own parser ever reads the file."""
    from safetensors.torch import load, load_file

    with lora._lock:
        check_file(lora.handle)
        same_file = Path(f"/proc/self/fd/{lora.handle.fileno()}")  # Linux: the open file, even if unlinked
        if same_file.exists():
            return load_file(same_file)  # memory-mapped: one copy, not two
        lora.handle.seek(0)
        return load(lora.handle.read())


_DOWN = re.compile(r"(?:\.lora_A|\.lora_down|[._]lora\.down|\.lora_linear_layer\.down)\.weight$")
_MODULE = [
    re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.down\.weight$"),
    re.compile(r"^(.*)\.(?:lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$"),
]
_TE_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _module_name(key: str, component: str) -> str:
    """The model layer a (diffusers-format) down-weight key is for, as named_modules() names it, roughly."""
    key = key[len(component) + 1 :]
    for pattern in _MODULE:
        if m := pattern.match(key):
            name = m.group(1)
            if m.lastindex == 2:
                projection = m.group(2)
                if component == "unet":
                    name += "." + ("to_out.0" if projection == "to_out" else projection)
                else:
                    name += "." + _TE_NAMES[projection]
            return name.removeprefix("text_model.")
    return key


def _components(pipe) -> dict:
    return {
        c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None
    }


def _adapter_layers(module, adapter: str | None = ADAPTER) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        name.removeprefix("text_model.")
        for name, m in module.named_modules()
        if isinstance(m, BaseTunerLayer) and (adapter is None or adapter in getattr(m, "lora_A", {}))
    ]


def _expected_layers(pipe, state: dict) -> dict[str, set[str]]:
    """Per pipeline component, the layers the file has LoRA weights for (diffusers' conversion of its keys)."""
    try:
        result = pipe.lora_state_dict(dict(state), unet_config=pipe.unet.config)
    except Exception as e:  # noqa: BLE001 - diffusers raises ValueError, KeyError, ... on foreign layouts
        raise InputError(
            f"lora_url: not a LoRA layout that can be read (kohya or diffusers/peft): {str(e)[:300]}"
        ) from None
    converted = result[0] if isinstance(result, tuple) else result
    layers: dict[str, set[str]] = {}
    for key in converted:
        if _DOWN.search(key):
            component = key.split(".", 1)[0]
            layers.setdefault(component, set()).add(_module_name(key, component))
    return layers


def _mismatch(pipe, mode_name: str, state: dict, expected: dict[str, set[str]], error: Exception | None) -> InputError:
    """The InputError that says how the file does not fit the mode's model."""
    base = MODES[mode_name].base_model
    parts = []
    for component, module in _components(pipe).items():
        wanted = expected.get(component, set())
        missing = sorted(name for name in wanted if not _has_layer(module, name))
        if missing:
            parts.append(
                f"{len(missing)} of its {len(wanted)} {COMPONENT_LABELS[component]} layers are not in the "
                f"model (e.g. {', '.join(missing[:2])})"
            )
    shapes = re.findall(
        r"size mismatch for (\S+?)\.lora_[AB]\.\S+: copying a param with shape torch\.Size\((\[.*?\])\)"
        r" from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)",
        str(error or ""),
    )
    if shapes:
        name, theirs, ours = shapes[0]
        parts.append(
            f"{len({s[0] for s in shapes})} layers have other shapes (e.g. {name}: LoRA {theirs}, model {ours})"
        )
    if error is not None and not shapes and not parts:
        parts.append(str(error).strip().splitlines()[0][:300])
    width = _cross_attention_width(state)
    model_width = pipe.unet.config.cross_attention_dim
    if width and width != model_width:
        parts.append(
            f"its cross-attention width is {width}{_base_note(width)}, the model's {model_width}"
            f"{_base_note(model_width)}"
        )
    return InputError(
        f"lora_url: this LoRA does not fit mode {mode_name}'s model ({base}): "
        f"{'; '.join(parts) or 'its layers do not match'}. It was probably made for another base model; "
        f"use one made for {base}"
    )


def _base_note(width) -> str:
    return f" ({CROSS_ATTENTION_BASES[width]})" if width in CROSS_ATTENTION_BASES else ""


def _has_layer(module, name: str) -> bool:
    for candidate in (name, f"text_model.{name}"):
        try:
            module.get_submodule(candidate)
            return True
        except AttributeError:
            pass
    return False


def _cross_attention_width(state: dict) -> int | None:
    """The text-embedding width the LoRA's cross-attention key/value layers take (768 SD 1.x, 2048 SDXL, ...)."""
    for key, tensor in state.items():
        if (
            "attn2" in key
            and ("to_k" in key or "to_v" in key)
            and ("down" in key or "lora_A" in key)
            and tensor.ndim == 2
        ):
            return int(tensor.shape[1])
    return None


def _apply(pipe, state: dict, scale: float, mode_name: str) -> None:
    import diffusers
    import transformers

    expected = _expected_layers(pipe, state)
    components = _components(pipe)
    foreign = sorted(set(expected) - set(COMPONENT_LABELS))
    if foreign:
        raise InputError(
            f"lora_url: the file has layers for {', '.join(foreign[:3])}, which a Stable Diffusion "
            f"pipeline does not have; it is not a LoRA for mode {mode_name}"
        )
    if not expected.get("unet"):
        raise InputError("lora_url: the file has no UNet layers; a style LoRA must adapt the UNet")
    absent = [c for c in expected if c not in components]
    if absent:
        raise InputError(
            f"lora_url: the file has {COMPONENT_LABELS[absent[0]]} layers, which mode {mode_name}'s model "
            f"({MODES[mode_name].base_model}) does not have; it was made for another base model "
            f"(e.g. SDXL)"
        )
    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(logging.CRITICAL)  # our own message says what did not fit
    transformers.utils.logging.set_verbosity(logging.ERROR)
    try:
        try:
            pipe.load_lora_weights(dict(state), adapter_name=ADAPTER, low_cpu_mem_usage=True)
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
            raise _mismatch(pipe, mode_name, state, expected, e) from None
        loaded = {c: len(_adapter_layers(m)) for c, m in components.items()}
        if any(loaded.get(c, 0) != len(layers) for c, layers in expected.items()) or any(
            n and c not in expected for c, n in loaded.items()
        ):
            raise _mismatch(pipe, mode_name, state, expected, None)
        pipe.set_adapters([ADAPTER], [scale])
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


def _unfuse_attention(unet):
    """Fused QKV projections (lib/engine/speed.py) run to_qkv and would bypass adapters on to_q/to_k/to_v: while the
    adapter is on, the separate projections are back (views of the fused weights: no copy) and the plain
    processors run. Returns what to restore (None: nothing changed)."""
    from lib.engine.speed import restore_projections

    processors = unet.attn_processors
    if not any("Fused" in type(p).__name__ for p in processors.values()):
        return None
    rebuilt = restore_projections(unet)
    original = getattr(unet, "original_attn_processors", None)
    if original and len(original) == len(processors):
        unet.set_attn_processor(dict(original))
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    return processors, rebuilt


def _remove(pipe, restore) -> None:
    from lib.engine.speed import drop_projections

    pipe.unload_lora_weights()  # swaps the original layers back in: exact, and the fused LCM weights stay
    if restore is not None:
        processors, rebuilt = restore
        pipe.unet.set_attn_processor(processors)
        drop_projections(rebuilt)
    left = {c: n for c, m in _components(pipe).items() if (n := len(_adapter_layers(m, None)))}
    if left:
        raise RuntimeError(
            f"the style LoRA could not be removed ({left} adapter layers left); the engine's "
            "models are no longer the original ones"
        )


@contextlib.contextmanager
def style_lora(pipe, lora: LoraFile | dict, scale: float, mode_name: str) -> Iterator[None]:
    """`lora` applied to `pipe` at `scale` inside the block; removed on the way out, whatever happens. The models run
    as loaded meanwhile: a CUDA graph replay or compiled code would not see the adapters (lib/engine/graphs.py)."""
    from lib.engine.graphs import eager

    state = lora if isinstance(lora, dict) else load_state_dict(lora)
    with eager():
        restore = _unfuse_attention(pipe.unet)
        try:
            _apply(pipe, state, scale, mode_name)
            yield
        finally:
            _remove(pipe, restore)
