"""The try-it page in a real browser: headless Chromium (Debian's package) driven by Playwright for Python.

CI needs two things installed (not in requirements.lock yet; .ci/run belongs to packaging):
    apt-get update && apt-get install -y chromium       # /usr/bin/chromium (Debian 12: Chromium 156)
    playwright==1.65.2 and greenlet==3.5.6 in the lock   # its bundled driver; never `playwright install`
Without them the test skips with one line saying which is missing.

One server and one browser for the module. The tests: an image job (upload the example files, draw both
speakers' boxes, preview the job as the model sees it, run it on the tiny model: two clips, the part so far
seen playing before the job completes, then the finished video from where the part was); a dub (the
example video through the page: the model choice follows the source, the result plays); a phone (390 px wide,
a box drawn by touch events, nothing off the screen, a failed check clears the old preview).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from multitalk_worker.local_api.app import create_app
from multitalk_worker.service import JobService
from tests.conftest import EXAMPLES, tiny_settings
from tests.servers import serve_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_DIR = os.environ.get("MULTITALK_TEST_SCREENSHOTS")  # set to keep the page's screenshots

if not CHROMIUM.exists():
    pytest.skip(
        f"browser test skipped: no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True
    )
if importlib.util.find_spec("playwright") is None:
    pytest.skip("browser test skipped: no Playwright (pip install playwright)", allow_module_level=True)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The local API on the tiny model, on loopback, for the module (the page sends its files inline)."""
    tmp = tmp_path_factory.mktemp("web")
    with serve_app(create_app(JobService(tiny_settings(tmp, tmp)))) as base:
        requests.get(f"{base}/health", timeout=300)  # the first report's cold checks, before the page asks
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium for the module. When the module ends, after a failure too, and when the run is
    stopped by SIGTERM (`timeout`), every process under Playwright's driver (the browser, its renderers and
    helpers, the driver itself) is SIGKILLed once the browser has been asked to close: orphaned headless
    Chromium processes of an earlier run were found spinning at 94 % of a core on the 2-core machine, the
    likely cause of an earlier stall of this test."""
    from playwright.sync_api import sync_playwright

    this = psutil.Process()
    before = {child.pid for child in this.children()}
    playwright = sync_playwright().start()
    drivers = [child for child in this.children() if child.pid not in before]

    def processes() -> list[psutil.Process]:
        found = list(drivers)
        for driver in drivers:
            with contextlib.suppress(psutil.Error):
                found += driver.children(recursive=True)
        return found

    def stopped(signum: int, frame: object) -> None:
        _kill(processes())
        raise KeyboardInterrupt  # pytest stops the run, its teardowns done

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
    finally:
        running = processes()  # before closing: a closed driver's browser would be orphaned, out of reach
        with contextlib.suppress(Exception):
            playwright.stop()  # closes the browser
        _kill(running)
        signal.signal(signal.SIGTERM, previous)


def _kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()  # psutil checks the start time: a reused pid is not touched
    psutil.wait_procs(processes, timeout=10)


@pytest.fixture
def page(browser: Any, api: str) -> Iterator[Any]:
    """A desktop-sized page on the try-it page, the tiny model preselected."""
    context = browser.new_context(viewport={"width": 1200, "height": 1400})
    yield _open(context, api)
    context.close()


def _open(context: Any, api: str) -> Any:
    page = context.new_page()
    page.goto(api + "/")
    page.wait_for_function("document.getElementById('resolution').value === 'tiny'")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    return page


def _screenshot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if SCREENSHOT_DIR:
        shutil.copy(path, Path(SCREENSHOT_DIR) / path.name)


def _drag(page: Any, box: dict[str, float], start: tuple[float, float], end: tuple[float, float]) -> None:
    mouse = page.mouse
    mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    mouse.down()
    mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=5)
    mouse.up()


def _wait_for_playable_result(page: Any) -> float:
    """Waits for the finished video and its metadata; returns its duration as the <video> element reads it.
    (While the job runs the element may already play the part so far: the job's end is waited for first.)"""
    page.wait_for_function(
        "!document.getElementById('result').hidden && !document.getElementById('download').hidden",
        timeout=600_000,
    )
    page.wait_for_function("document.getElementById('result').readyState >= 1", timeout=60_000)
    return float(page.evaluate("document.getElementById('result').duration"))


def test_page_previews_runs_and_plays_a_two_speaker_job_as_it_grows(
    page: Any, api: str, tmp_path: Path
) -> None:
    """Two speakers at once (4.1 s of speech: two tiny clips). Once the first clip is finished the page shows
    the part so far and starts it by itself (muted); it is seen playing while /status still says
    IN_PROGRESS; the finished video goes on from where the part was."""
    assert page.input_value("#model") == "multitalk"  # MULTITALK_MODEL, from /health
    held = page.inner_text("#models")
    assert "multitalk (adapters multitalk; takes image)" in held, held
    assert "infinitetalk (adapters single, multi; takes image or video)" in held, held
    page.set_input_files("#image", str(EXAMPLES / "two_people.png"))
    page.set_input_files("#audio1", str(EXAMPLES / "speech_a.wav"))
    page.set_input_files("#audio2", str(EXAMPLES / "speech_b.wav"))
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    page.wait_for_function("document.getElementById('canvas').height !== 360")
    canvas = page.locator("#canvas").bounding_box()
    assert canvas is not None
    page.click("#draw1")
    _drag(page, canvas, (0.05, 0.1), (0.45, 0.9))
    page.click("#draw2")
    _drag(page, canvas, (0.55, 0.1), (0.95, 0.9))
    assert "speaker 2: [0.55" in page.inner_text("#region-text")

    page.click("#check")
    page.wait_for_function("document.getElementById('preview').src.startsWith('data:image/png')")
    plan = page.inner_text("#plan")
    assert "2 clip(s)" in plan and "99 frames" in plan and "2 steps x 3 passes" in plan, plan
    width = page.evaluate("document.getElementById('preview').naturalWidth")
    assert width == 64  # two_people.png is 2:1, the tiny 0.50 bucket is 32x64 (H x W)
    _screenshot(page, tmp_path, "web-preview")

    page.evaluate(RECORD_PLAYING)
    page.click("#submit")
    page.wait_for_function(PLAYING_OR_DONE, timeout=300_000)
    assert page.evaluate(PLAYING), "the job completed before its part so far was seen playing"
    src = page.evaluate("document.getElementById('result').src")
    job_id = src.split("/jobs/")[1].split("/")[0]
    status = requests.get(f"{api}/status/{job_id}", timeout=30).json()
    # seen playing, then the job asked: it had not completed when the part so far played
    assert "?ready=" in src and status["status"] == "IN_PROGRESS", (src, status["status"])
    assert status["clips_done"] == 1, status
    _screenshot(page, tmp_path, "web-part")

    duration = _wait_for_playable_result(page)
    assert abs(duration - 3.96) < 0.1, duration
    assert page.inner_text("#status").startswith("done: 99 frames, 64x32")
    href = page.get_attribute("#download", "href")
    assert href is not None and href.endswith("/video")
    page.wait_for_function("window.playing.some(([src]) => !src.includes('?ready='))", timeout=60_000)
    playing = page.evaluate("window.playing")
    times = [at for _, at in playing]
    assert times == sorted(times), playing  # the final video goes on from the part's position, not from 0
    assert "?ready=" in playing[0][0] and playing[-1][0].endswith("/video"), playing
    _screenshot(page, tmp_path, "web-done")


# The <video> plays: shown, not paused, past its first frame.
PLAYING = """(() => {
  const video = document.getElementById('result');
  return !video.hidden && !video.paused && video.currentTime > 0;
})()"""

PLAYING_OR_DONE = f"{PLAYING} || !document.getElementById('download').hidden"

# Every 'playing' event of the <video>: [its source, its position then].
RECORD_PLAYING = """(() => {
  const video = document.getElementById('result');
  window.playing = [];
  video.addEventListener('playing', () => window.playing.push([video.src, video.currentTime]));
})()"""


def test_page_dubs_a_video_to_a_playable_result(page: Any, api: str, tmp_path: Path) -> None:
    """examples/source.mp4 (384x448, 1 s) dubbed with speech_a.wav: choosing the video picks InfiniteTalk
    (the job sends `model`), its first frame is the picture, and the finished video plays in the page."""
    page.set_input_files("#video", str(EXAMPLES / "source.mp4"))
    page.wait_for_function("document.getElementById('model').value === 'infinitetalk'")
    page.wait_for_function("document.getElementById('canvas').height === Math.round(480 * 448 / 384)")
    page.set_input_files("#audio1", str(EXAMPLES / "speech_a.wav"))
    page.fill("#max_duration_s", "0.4")
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    page.click("#submit")
    duration = _wait_for_playable_result(page)
    assert abs(duration - 0.4) < 0.1, duration
    status = page.inner_text("#status")
    assert status.startswith("done: 10 frames"), status
    href = page.get_attribute("#download", "href")
    job_id = href.split("/")[-2]
    result = requests.get(f"{api}/status/{job_id}", timeout=10).json()["output"]
    assert (result["model"], result["adapter"], result["source"]["kind"]) == (
        "infinitetalk",
        "single",
        "video",
    )
    _screenshot(page, tmp_path, "web-dub")


def test_phone_width_draws_a_region_by_touch_and_a_failed_check_clears_the_preview(
    browser: Any, api: str, tmp_path: Path
) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    try:
        page = _open(context, api)
        page.set_input_files("#image", str(EXAMPLES / "two_people.png"))
        page.set_input_files("#audio1", str(EXAMPLES / "speech_a.wav"))
        page.set_input_files("#audio2", str(EXAMPLES / "speech_b.wav"))
        page.fill("#max_duration_s", "0.4")
        page.wait_for_function("document.getElementById('canvas').height !== 360")
        overflow = page.evaluate(OFF_SCREEN)
        assert overflow == [], overflow

        page.click("#draw1")
        page.locator("#canvas").scroll_into_view_if_needed()
        canvas = page.locator("#canvas").bounding_box()
        assert canvas is not None and canvas["width"] <= 390 - 2 * 16, canvas
        scroll_y = page.evaluate("window.scrollY")
        _touch_drag(context, page, canvas, (0.1, 0.2), (0.4, 0.8))
        text = page.inner_text("#region-text")
        assert text.startswith("speaker 1: [0.10, 0.20, 0.40, 0.80]"), text
        page.click("#draw2")
        _touch_drag(context, page, canvas, (0.9, 0.9), (0.6, 0.1))  # drawn from the other corner
        text = page.inner_text("#region-text")
        assert text.endswith("speaker 2: [0.60, 0.10, 0.90, 0.90]"), text
        assert page.evaluate("[window.scrollX, window.scrollY]") == [0, scroll_y]  # the finger did not scroll

        page.click("#check")
        page.wait_for_function("document.getElementById('preview').src.startsWith('data:image/png')")
        assert page.inner_text("#plan") != ""
        assert page.evaluate(OFF_SCREEN) == []
        _screenshot(page, tmp_path, "web-phone")
        page.fill("#steps", "1000")  # over the schema's bound of 100: the check fails
        page.click("#check")
        page.wait_for_function("document.getElementById('status').className === 'error'")
        assert "INVALID_INPUT" in page.inner_text("#status")
        assert page.get_attribute("#preview", "src") is None and page.inner_text("#plan") == ""
        assert page.is_hidden("#bar")
    finally:
        context.close()


# Every visible element whose box runs past the viewport's right edge, and the page's scroll width.
OFF_SCREEN = """(() => {
  const width = document.documentElement.clientWidth;
  const out = [];
  const scroll = document.documentElement.scrollWidth;
  if (scroll > width) out.push(`scrollWidth ${scroll}`);
  for (const el of document.body.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > width + 0.5) out.push(`${el.tagName}#${el.id} right ${r.right}`);
  }
  return out;
})()"""


def _touch_drag(
    context: Any, page: Any, box: dict[str, float], start: tuple[float, float], end: tuple[float, float]
) -> None:
    """A one-finger drag as touch events (Chrome DevTools' Input.dispatchTouchEvent, what a touch screen
    sends): the page sees touch-derived pointer events, not a mouse."""
    cdp = context.new_cdp_session(page)

    def at(fx: float, fy: float) -> list[dict[str, float]]:
        return [{"x": box["x"] + fx * box["width"], "y": box["y"] + fy * box["height"]}]

    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": at(*start)})
    for i in range(1, 6):
        t = i / 5
        point = at(start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": point})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()
