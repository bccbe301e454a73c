"""The prompt-embedding cache (lib/engine/prompts.py): an unchanged prompt is encoded once and gives the same
images as a fresh encoding; PROMPT_CACHE_SIZE bounds it, least recently used first out; 0 turns it off."""

from __future__ import annotations

import contextlib

from lib.engine.prompts import PromptCache
from lib.testkit.environment import environment

BASE = dict(mode="sd-turbo", width=256, height=256, output_format="png", seed=4)


@contextlib.contextmanager
def encoder_calls(predictor, mode="sd-turbo"):
    calls = []
    handle = predictor.engine.modes[mode].txt2img.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def cache(predictor, size: int):
    engine = predictor.engine
    saved, engine.prompts = engine.prompts, PromptCache(size)
    try:
        yield engine.prompts
    finally:
        engine.prompts = saved


def test_an_unchanged_prompt_is_encoded_once_with_the_same_images(predictor, run):
    with cache(predictor, 0):
        fresh, _ = run(prompt="a lighthouse, cached", **BASE)
    with cache(predictor, 4) as prompts, encoder_calls(predictor) as calls:
        first, m1 = run(prompt="a lighthouse, cached", **BASE)
        assert len(calls) == 1
        second, m2 = run(prompt="a lighthouse, cached", **BASE)
        assert len(calls) == 1, "the second request encoded its prompt again"
        assert (prompts.hits, prompts.misses) == (1, 1)
        run(prompt="another prompt", **BASE)
        assert len(calls) == 2
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second] == [p.read_bytes() for p in fresh]
    assert m2["timings.text_encoding"] < m1["timings.text_encoding"]


def test_a_batch_encodes_each_distinct_prompt_once(predictor, run):
    with cache(predictor, 4), encoder_calls(predictor) as calls:
        paths, _ = run(prompt="four of the same", num_outputs=4, **BASE)
    assert len(paths) == 4 and len(calls) == 1


def test_the_least_recently_used_prompt_leaves_first(predictor, run):
    with cache(predictor, 2) as prompts, encoder_calls(predictor) as calls:
        for prompt in ("one", "two", "one", "three"):  # "two" is the least recently used when "three" comes
            run(prompt=prompt, **BASE)
        assert len(calls) == 3 and len(prompts) == 2
        run(prompt="one", **BASE)
        assert len(calls) == 3
        run(prompt="two", **BASE)
        assert len(calls) == 4


def test_prompt_cache_size_comes_from_the_environment(predictor):
    from lib.engine.engine import Engine

    with environment(PROMPT_CACHE_SIZE="0"):
        engine = Engine(predictor.engine.modes, predictor.engine.device, predictor.engine.dtype)
    assert engine.prompts.size == 0
    engine.prompts.put(("k",), {})
    assert len(engine.prompts) == 0
