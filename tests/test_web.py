"""The try-it page in a real browser: headless Chromium (Debian's package) driven by Playwright for Python.

CI needs two things installed (not in requirements.lock yet; .ci/run belongs to packaging):
    apt-get update && apt-get install -y chromium       # /usr/bin/chromium (Debian 12: Chromium 156)
    playwright==1.65.2 and greenlet==3.5.6 in the lock   # its bundled driver; never `playwright install`
Without them the test skips with one line saying which is missing.

The test uploads the example files, draws both speakers' boxes, previews the job (the bucket crop with the
masks as the model sees them), runs it on the tiny model to the end and checks that the page plays the video.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn

from multitalk_worker.config import Settings
from multitalk_worker.local_api.app import create_app
from multitalk_worker.service import JobService
from tests.conftest import EXAMPLES
from tests.servers import free_port

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


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(JobService(make_settings())), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=300)


def _screenshot(page: object, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    if SCREENSHOT_DIR:
        shutil.copy(path, Path(SCREENSHOT_DIR) / path.name)


def _drag(page: object, box: dict[str, float], start: tuple[float, float], end: tuple[float, float]) -> None:
    mouse = page.mouse  # type: ignore[attr-defined]
    mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    mouse.down()
    mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=5)
    mouse.up()


def test_page_previews_runs_and_plays_a_two_speaker_job(api: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = context.new_page()
            page.set_viewport_size({"width": 1200, "height": 1400})
            page.goto(api + "/")
            page.wait_for_function("document.getElementById('resolution').value === 'tiny'")
            page.set_input_files("#image", str(EXAMPLES / "two_people.png"))
            page.set_input_files("#audio1", str(EXAMPLES / "speech_a.wav"))
            page.set_input_files("#audio2", str(EXAMPLES / "speech_b.wav"))
            page.fill("#max_duration_s", "0.4")
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
            assert "1 clip(s)" in plan and "10 frames" in plan and "2 steps x 3 passes" in plan, plan
            width = page.evaluate("document.getElementById('preview').naturalWidth")
            assert width == 64  # two_people.png is 2:1, the tiny 0.50 bucket is 32x64 (H x W)
            _screenshot(page, tmp_path, "web-preview")

            page.click("#submit")
            page.wait_for_function("!document.getElementById('result').hidden", timeout=600_000)
            page.wait_for_function("document.getElementById('result').readyState >= 1", timeout=60_000)
            duration = page.evaluate("document.getElementById('result').duration")
            assert abs(duration - 0.4) < 0.1, duration
            assert page.inner_text("#status").startswith("done: 10 frames, 64x32")
            href = page.get_attribute("#download", "href")
            assert href is not None and href.endswith("/video")
            _screenshot(page, tmp_path, "web-done")
        finally:
            context.close()
