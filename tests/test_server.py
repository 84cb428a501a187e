"""The local HTTP API (FastAPI app served by uvicorn on loopback) and runpod's own `--rp_serve_api` server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn

from multitalk_worker.config import Settings
from multitalk_worker.server import HTTP_STATUS, create_app
from multitalk_worker.worker import Worker
from tests.conftest import REPO
from tests.servers import free_port

JOB = {
    "image": "inputs/person.png",
    "speakers": [{"audio": "inputs/speech_a.wav"}],
    "prompt": "a person talks",
    "resolution": "tiny",
    "max_duration_s": 0.4,
    "advanced": {"steps": 2, "seed": 5},
}


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 in a thread of this process."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Worker(make_settings())), host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_every_code_has_a_status() -> None:
    from multitalk_worker.errors import ERROR_CODES

    assert set(HTTP_STATUS) == set(ERROR_CODES)


def test_health(api: str) -> None:
    response = requests.get(f"{api}/health", timeout=60)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (JOB | {"colour": "red"}, 422, "INVALID_INPUT"),
        (b"{not json", 422, "INVALID_INPUT"),
        (JOB | {"image": "inputs/missing.png"}, 422, "INVALID_INPUT"),  # a retry finds no file either
        (JOB | {"image": "inputs/speech_a.wav"}, 422, "IMAGE_DECODE_FAILED"),
    ],
)
def test_generate_errors(api: str, body: Any, status: int, code: str) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(f"{api}/generate", data=data, timeout=60)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_generate_validate_only(api: str) -> None:
    response = requests.post(f"{api}/generate", json=JOB | {"validate_only": True}, timeout=60)
    assert response.status_code == 200
    assert response.json()["plan"]["resolved"]["seed"] == 5


def test_runpod_serve_api_runs_the_same_handler(volume: Path, tmp_path: Path) -> None:
    """`python -m multitalk_worker.worker --rp_serve_api`: runpod's local server answers /runsync."""
    port = free_port()
    env = {
        **os.environ,
        "MULTITALK_WEIGHTS": "tiny",
        "MULTITALK_VOLUME_ROOT": str(volume),
        "MULTITALK_WORK_DIR": str(tmp_path),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "multitalk_worker.worker", "--rp_serve_api", "--rp_api_port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://localhost:{port}/runsync"
        deadline = time.monotonic() + 90
        while True:
            try:
                response = requests.post(url, json={"input": JOB | {"validate_only": True}}, timeout=60)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, "server did not start"
                time.sleep(0.3)
        assert response.json()["status"] == "COMPLETED"
        assert response.json()["output"]["plan"]["bucket"]
        failed = requests.post(url, json={"input": JOB | {"colour": "red"}}, timeout=60).json()
        assert failed["status"] == "FAILED" and json.loads(failed["error"])["code"] == "INVALID_INPUT"
    finally:
        process.terminate()
        process.wait(timeout=20)
