"""Prompt embeddings, encoded by the engine rather than inside the pipelines, and kept in an LRU cache: an
unchanged prompt (the realtime server's frames while someone paints; repeated API prompts) is not encoded again.

Each distinct prompt is encoded once with the pipeline's own `encode_prompt` (the call the pipeline would make),
and a batch's embeddings are its images' rows put together, so a prompt's embedding does not depend on which
batch it came in. The cache holds device tensors (about 160 KB per SD prompt, 330 KB per SDXL one, twice that
with classifier-free guidance); PROMPT_CACHE_SIZE entries, 0 to turn it off. A style LoRA may change the text
encoders: its batches are encoded fresh and not cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from lib.engine.modes import SDXL

# The pipeline arguments encode_prompt's outputs go to, in its order (SD's two; SDXL's four).
SD_EMBEDS = ("prompt_embeds", "negative_prompt_embeds")
SDXL_EMBEDS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


class PromptCache:
    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> dict[str, torch.Tensor] | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return found

    def put(self, key: tuple, embeds: dict[str, torch.Tensor]) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._entries[key] = embeds
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@torch.no_grad()  # as the pipelines encode; not inference_mode: its tensors may not meet compiled modules later
def encode_one(pipe, family: str, prompt: str, negative: str | None, cfg: bool) -> dict[str, torch.Tensor]:
    """One prompt's embeddings (batch 1), keyed by the pipeline argument each one goes to."""
    device = pipe._execution_device
    if family == SDXL:
        out = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative,
        )
        names = SDXL_EMBEDS
    else:
        out = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt=negative)
        names = SD_EMBEDS
    return {name: tensor for name, tensor in zip(names, out, strict=True) if tensor is not None}


def embeddings(
    pipe, family: str, mode_name: str, prompts: list[str], negatives: list[str | None], cfg: bool, cache: PromptCache
) -> dict[str, torch.Tensor]:
    """The pipeline keyword arguments for a batch whose image i has prompts[i] (and negatives[i], acting only
    with `cfg`): each distinct prompt encoded once, from the cache where it is there. A `cache` of None encodes
    every prompt fresh (a style LoRA is on)."""
    rows: list[dict[str, torch.Tensor]] = []
    fresh: dict[tuple, dict[str, torch.Tensor]] = {}
    for prompt, negative in zip(prompts, negatives, strict=True):
        key = (mode_name, prompt, negative if cfg else None, cfg)
        embeds = fresh.get(key) or (cache.get(key) if cache is not None else None)
        if embeds is None:
            embeds = encode_one(pipe, family, prompt, negative if cfg else None, cfg)
            if cache is not None:
                cache.put(key, embeds)
        fresh[key] = embeds
        rows.append(embeds)
    return {name: torch.cat([row[name] for row in rows]) for name in rows[0]}
