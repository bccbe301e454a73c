"""The realtime page in a real browser: headless Chromium (the Debian package) driven by Playwright, against the
realtime server started by its entry point on tiny weights. Typing makes frames, painting and the webcam make
img2img frames, #stats shows numbers, two pages each get their own frames, the controls follow the mode table,
and a bad message is answered on the page while everything goes on."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect, sync_playwright

from lib.engine.modes import MODES, NON_COMMERCIAL
from lib.testkit.realtime import launch_chromium
from tests.conftest import REALTIME_MODES

# The page's CSP forbids eval, which Playwright's wait_for_function needs: the tests wait on what the page shows.
FRAME_WAIT_MS = 60_000  # tiny models on two CPU cores make a frame in about half a second; the browser shares them
STATS = re.compile(r"^([\d.]+) fps · (\d+) ms latency · p50 (\d+) ms · p95 (\d+) ms · (\d+) frames$")


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, realtime_server):
    """open_page() -> a connected page in a fresh browser context (its own session)."""
    contexts = []

    def _open():
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        contexts.append(context)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.errors = errors
        page.goto(realtime_server.url + "/")
        expect(page.locator("#status")).to_have_text("connected")
        expect(page.locator("#mode option")).to_have_count(len(REALTIME_MODES.split(",")))
        return page

    yield _open
    for context in contexts:
        context.close()


def frames_shown(page) -> int:
    match = STATS.match(page.locator("#stats").text_content())
    return int(match[5]) if match else 0


def wait_for_frame_info(page, text: str) -> None:
    expect(page.locator("#frame-info")).to_contain_text(text, timeout=FRAME_WAIT_MS)


def test_typing_makes_frames_and_stats_shows_numbers(open_page):
    page = open_page()
    page.locator("#prompt").press_sequentially("a lighthouse at dusk", delay=40)
    wait_for_frame_info(page, "“a lighthouse at dusk”")  # latest wins: the last frame is the whole prompt
    stats = STATS.match(page.locator("#stats").text_content())
    assert stats, page.locator("#stats").text_content()
    fps, (latency, p50, p95, frames) = float(stats[1]), map(int, stats.groups()[1:])
    assert frames >= 1 and latency > 0 and p95 >= p50 > 0 and fps >= 0
    assert frames < len("a lighthouse at dusk")  # far fewer frames than keystrokes
    src = page.locator("#output").get_attribute("src")
    assert src.startswith("blob:")
    size = page.locator("#output").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [512, 512]
    assert "from the prompt" in page.locator("#frame-info").text_content()
    assert page.errors == []


def paint(page, strokes: int = 3) -> None:
    box = page.locator("#canvas").bounding_box()
    for s in range(strokes):
        page.mouse.move(box["x"] + 40 + 30 * s, box["y"] + 60)
        page.mouse.down()
        for i in range(12):
            page.mouse.move(box["x"] + 40 + 30 * s + 15 * i, box["y"] + 60 + 25 * i)
        page.mouse.up()


def test_painting_drives_img2img_frames(open_page):
    page = open_page()
    page.locator("#prompt").fill("a watercolour harbour")
    page.locator("input[name=source][value=canvas]").check()
    paint(page)
    wait_for_frame_info(page, "img2img, strength 0.5")
    before = frames_shown(page)
    paint(page, strokes=1)
    expect(page.locator("#stats")).not_to_contain_text(f"· {before} frames", timeout=FRAME_WAIT_MS)
    assert frames_shown(page) > before
    assert page.errors == []


def test_painting_on_the_canvas_makes_it_the_source_at_once(open_page):
    """A new user types a prompt and paints, without touching the source choice: the strokes give frames."""
    page = open_page()
    page.locator("#prompt").fill("a harbour at noon")
    wait_for_frame_info(page, "from the prompt")
    paint(page)
    assert page.locator("input[name=source][value=canvas]").is_checked()
    wait_for_frame_info(page, "img2img, strength 0.5")
    assert page.errors == []


def test_painted_strokes_guide_a_controlnet(open_page):
    """The painting as a scribble: its lines guide the mode's ControlNet, the prompt sets the content. Offered only
    for modes with ControlNets (lcm here, not sd-turbo)."""
    page = open_page()
    assert page.locator("#control").is_disabled()  # sd-turbo has no ControlNet
    page.locator("#mode").select_option("lcm")
    options = page.locator("#control option").evaluate_all("options => options.map(o => o.value)")
    assert options == ["none", "scribble", "canny", "depth"]
    page.locator("#prompt").fill("a castle on a hill")
    page.locator("#control").select_option("scribble")
    paint(page)
    wait_for_frame_info(page, "guided by scribble")
    assert "“a castle on a hill”" in page.locator("#frame-info").text_content()
    assert page.locator("#output").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [768, 768]
    assert page.errors == []


def test_the_webcam_drives_img2img_frames(open_page):
    page = open_page()
    page.locator("#prompt").fill("a portrait in oils")
    page.locator("input[name=source][value=webcam]").check()  # Chromium's synthetic camera
    wait_for_frame_info(page, "img2img, strength 0.5")
    first = frames_shown(page)
    expect(page.locator("#stats")).not_to_contain_text(f"· {first} frames", timeout=FRAME_WAIT_MS)  # it keeps going
    assert page.errors == []


def test_two_pages_at_once_each_get_their_own_frames(open_page):
    first, second = open_page(), open_page()
    first.locator("#prompt").fill("the first page's prompt")
    second.locator("#prompt").fill("the second page's prompt")
    wait_for_frame_info(first, "“the first page's prompt”")
    wait_for_frame_info(second, "“the second page's prompt”")
    assert frames_shown(first) >= 1 and frames_shown(second) >= 1


def test_the_controls_offer_each_modes_allowed_values(open_page):
    page = open_page()
    options = page.locator("#mode option").evaluate_all("options => options.map(o => o.value)")
    assert options == REALTIME_MODES.split(",")
    for name in options:
        page.locator("#mode").select_option(name)
        mode = MODES[name]
        steps = page.locator("#steps")
        assert (steps.get_attribute("min"), steps.get_attribute("max")) == tuple(map(str, mode.steps.range))
        assert steps.input_value() == str(mode.steps.default)
        licence = page.locator("#licence").text_content()
        assert ("non-commercial" in licence) == (mode.weights.repo.licence == NON_COMMERCIAL)
        assert page.locator("#fast-decode").is_checked()
        size = page.locator("#canvas").evaluate("canvas => [canvas.width, canvas.height]")
        assert size == [mode.size, mode.size]
    strength = page.locator("#strength")
    assert (strength.get_attribute("min"), strength.get_attribute("max")) == ("0.02", "1")


def test_a_bad_message_is_shown_and_the_page_goes_on(open_page):
    page = open_page()
    page.evaluate("window.realtime.send('not json')")
    expect(page.locator("#message")).to_contain_text("message: not JSON")
    page.evaluate("window.realtime.send(JSON.stringify({num_inference_steps: 99}))")
    expect(page.locator("#message")).to_contain_text("num_inference_steps: 99 is not allowed for mode sd-turbo")
    page.locator("#prompt").fill("after the errors")
    wait_for_frame_info(page, "“after the errors”")
    expect(page.locator("#message")).to_have_text("")
    assert page.errors == []
