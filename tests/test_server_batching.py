"""Cross-request batching in the real Cog server with concurrent predictions (COG_MAX_CONCURRENCY > 1).

A request that arrives at an idle device starts at once; requests that arrive while the device is busy queue and
run as one batch. Each burst here is sent while a slower prediction (AHEAD) keeps the device busy, so that it lands
in one batch however long a loaded machine takes to hand the server its requests."""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lib.testkit.cog_server import CogServer, decode_output, input_error, shared_server

CONCURRENCY = 4
BASE = dict(mode="sd-turbo", width=256, height=256, output_format="png", disable_safety_checker=True)
AHEAD = dict(
    BASE, prompt="ahead", seed=99, width=1024, height=1024, num_inference_steps=4, num_outputs=2
)  # seconds on 2 CPU cores


@pytest.fixture(scope="module")
def solo_server(tmp_path_factory, pytestconfig):
    """The shared server (one slot, so no batching window): the reference solo runs."""
    return shared_server(tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory, pytestconfig):
    """A server with a slot for each request of a burst and one for the prediction ahead of it, a cap of 4 images,
    loading the weights the shared server fetched."""
    fetched = shared_server(tmp_path_factory, pytestconfig)
    s = CogServer(
        tmp_path_factory.mktemp("batching-server"),
        {
            "WEIGHTS_DIR": str(fetched.weights_dir),
            "WEIGHTS_OFFLINE": "1",
            "ENABLED_MODES": "sd-turbo",
            "COG_MAX_CONCURRENCY": str(CONCURRENCY + 1),
            "BATCH_WINDOW_MS": "1000",
            "BATCH_MAX_IMAGES": "4",
        },
    )
    s.start()
    yield s
    s.stop()


def burst(server, inputs, cancel_id=None):
    """Send AHEAD, then (once it runs) every prediction at once (sync, each on its own thread); optionally cancel one
    by id while they wait. Returns the burst's predictions."""

    def send(item):
        pid, body = item
        code, prediction = server.request("PUT", f"/predictions/{pid}", {"id": pid, "input": body})
        return code, prediction

    items = [(f"b{time.monotonic_ns()}-{i}", body) for i, body in enumerate(inputs)]
    with ThreadPoolExecutor(len(items) + 1) as pool:
        ahead = pool.submit(send, (f"a{time.monotonic_ns()}", AHEAD))
        time.sleep(0.5)  # alone at an idle device, it starts at once
        futures = [pool.submit(send, item) for item in items]
        if cancel_id is not None:
            time.sleep(0.1)  # queued behind AHEAD
            server.cancel(items[cancel_id][0])
        first = ahead.result()[1]
        assert first["status"] == "succeeded" and first["metrics"]["batch"]["requests"] == 1, first
        return [f.result()[1] for f in futures]


def pixels(uri):
    return np.asarray(decode_output(uri)[0].convert("RGB"), dtype=np.int16)


def test_overlapping_predictions_are_batched_and_equal_solo_runs(batching_server, solo_server):
    inputs = [dict(BASE, prompt=f"prompt {i}", seed=10 + i) for i in range(CONCURRENCY)]
    results = burst(batching_server, inputs)
    assert all(p["status"] == "succeeded" for p in results), [p.get("error") for p in results]
    assert [p["metrics"]["batch"]["requests"] for p in results] == [CONCURRENCY] * CONCURRENCY
    for p, body in zip(results, inputs, strict=True):
        solo = solo_server.predict(**body)
        assert solo["metrics"]["batch"]["requests"] == 1
        assert np.abs(pixels(p["output"][0]) - pixels(solo["output"][0])).max() <= 2


def test_a_cancel_and_an_invalid_input_leave_the_rest_of_the_batch_intact(batching_server, solo_server):
    inputs = [
        dict(BASE, prompt="keep", seed=1),
        dict(BASE, prompt="cancel me", seed=2),
        dict(BASE, prompt="bad", seed=3, width=260),  # the schema allows it; the model refuses it
        dict(BASE, prompt="keep too", seed=4),
    ]
    results = burst(batching_server, inputs, cancel_id=1)
    assert results[1]["status"] == "canceled"
    assert results[2]["status"] == "failed" and input_error(results[2]).startswith("width:")
    for i in (0, 3):
        assert results[i]["status"] == "succeeded", results[i].get("error")
        assert results[i]["metrics"]["batch"]["requests"] == 2  # the canceled and the invalid one never joined
        solo = solo_server.predict(**inputs[i])
        assert np.abs(pixels(results[i]["output"][0]) - pixels(solo["output"][0])).max() <= 2
    assert batching_server.settled_status() == "READY"


def test_a_burst_over_the_cap_is_served_in_several_batches(batching_server):
    inputs = [dict(BASE, prompt=f"p{i}", seed=20 + i, num_outputs=2) for i in range(CONCURRENCY)]  # 8 images, cap 4
    results = burst(batching_server, inputs)
    assert all(p["status"] == "succeeded" and len(p["output"]) == 2 for p in results)
    assert all(p["metrics"]["batch"]["images"] <= 4 for p in results)
    assert sorted(p["metrics"]["batch"]["requests"] for p in results) == [2, 2, 2, 2]  # two batches of two
