"""The local HTTP API through its real server (uvicorn on loopback, in a thread of this process), and runpod's
own `--rp_serve_api` server: async jobs, the queue bound, cancel, the video download, OpenAPI, the request
guards (Host, origin, content type, token) and liveness under load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests

from multitalk_worker.config import Settings
from multitalk_worker.local_api.app import HTTP_STATUS, create_app
from multitalk_worker.local_api.guard import RequestGuard
from multitalk_worker.media import probe_mp4
from multitalk_worker.schema import AdvancedInput, GenerateInput
from multitalk_worker.service import JobService
from tests.conftest import REPO
from tests.servers import free_port, serve_app

JOB = {
    "image": "inputs/person.png",
    "speakers": [{"audio": "inputs/speech_a.wav"}],
    "prompt": "a person talks",
    "resolution": "tiny",
    "max_duration_s": 0.4,
    "advanced": {"steps": 2, "seed": 5},
}
LONG_JOB = JOB | {
    "advanced": {"steps": 100, "seed": 5}
}  # ~100 tiny steps: seconds of CPU, long enough to act
FINISHED = ("COMPLETED", "FAILED", "CANCELLED")


@pytest.fixture
def serve(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., str]]:
    """serve(**env) -> base URL of the app with those settings, on 127.0.0.1."""
    with ExitStack() as servers:

        def start(**env: str) -> str:
            return servers.enter_context(serve_app(create_app(JobService(make_settings(**env)))))

        yield start


@pytest.fixture
def api(serve: Callable[..., str]) -> str:
    return serve()


def run(api: str, job: dict[str, Any]) -> str:
    response = requests.post(f"{api}/run", json={"input": job}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "IN_QUEUE"
    return str(response.json()["id"])


def wait_until(api: str, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = requests.get(f"{api}/status/{job_id}", timeout=30).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.02)


def test_every_code_has_a_status() -> None:
    from multitalk_worker.errors import ERROR_CODES

    assert set(HTTP_STATUS) == set(ERROR_CODES)


def test_health(api: str) -> None:
    response = requests.get(f"{api}/health", timeout=60)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["queue"]["capacity"] == 8


def test_health_outside_the_checkout(volume: Path, tmp_path: Path) -> None:
    """Issue 11.9: started from another folder with the default (relative) MULTITALK_LOCK_FILE, /health is
    200: the lock file is looked up in the checkout, not the current directory."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MULTITALK_LOCK_FILE"}
    env |= {"MULTITALK_WEIGHTS": "tiny", "MULTITALK_DEVICE": "cpu", "MULTITALK_VOLUME_ROOT": str(volume)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "multitalk_worker.local_api", "--port", str(port)],
        env=env,
        cwd=elsewhere,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        response = _get_when_up(f"http://127.0.0.1:{port}/health", process)
        versions = next(c for c in response.json()["checks"] if c["name"] == "versions")
        assert versions["ok"], versions
        assert response.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


def _get_when_up(url: str, process: subprocess.Popen[bytes]) -> requests.Response:
    deadline = time.monotonic() + 90
    while True:
        try:
            return requests.get(url, timeout=60)
        except requests.ConnectionError:
            assert time.monotonic() < deadline and process.poll() is None, "server did not start"
            time.sleep(0.3)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (JOB | {"colour": "red"}, 422, "INVALID_INPUT"),
        (b"{not json", 422, "INVALID_INPUT"),
        (b"\xff\xfe{}", 422, "INVALID_INPUT"),
        (b"[" * 10_000 + b"]" * 10_000, 422, "INVALID_INPUT"),  # issue 11.5: was a plain-text 500
        (JOB | {"image": "inputs/missing.png"}, 422, "INVALID_INPUT"),  # a retry finds no file either
        (JOB | {"image": "inputs/speech_a.wav"}, 422, "IMAGE_DECODE_FAILED"),
    ],
)
def test_generate_errors(api: str, body: Any, status: int, code: str) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(
        f"{api}/generate", data=data, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_deeply_nested_job_input_is_a_typed_error(api: str) -> None:
    nested = '{"input": {"image": ' + "[" * 10_000 + "]" * 10_000 + "}}"
    response = requests.post(
        f"{api}/run", data=nested, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "INVALID_INPUT"
    assert "nested too deeply" in response.json()["error"]["message"]


def test_generate_validate_only(api: str) -> None:
    response = requests.post(f"{api}/generate", json=JOB | {"validate_only": True}, timeout=60)
    assert response.status_code == 200
    assert response.json()["plan"]["resolved"]["seed"] == 5


def test_async_job_cancel_then_next_job_runs_to_its_video(serve: Callable[..., str]) -> None:
    """A job cancelled mid-sampling ends CANCELLED; the next one goes queued -> running (with progress) ->
    done, its video downloads and decodes, and after MULTITALK_JOB_TTL_S both its record and file are gone.
    (Two jobs only: on a loaded CPU each tiny job's VAE work takes tens of seconds.)"""
    api = serve(MULTITALK_JOB_TTL_S="4")  # the test waits it out
    first = run(api, LONG_JOB)
    second = run(api, JOB | {"advanced": {"steps": 12, "seed": 5}})
    wait_until(api, first, lambda b: b["progress"]["stage"] == "sample" and b["progress"]["step"] >= 1)
    assert requests.get(f"{api}/status/{second}", timeout=10).json()["position"] == 1
    assert requests.post(f"{api}/cancel/{first}", timeout=10).json()["id"] == first
    ended = wait_until(api, first, lambda b: b["status"] in FINISHED)
    assert ended["status"] == "CANCELLED" and json.loads(ended["error"])["code"] == "CANCELLED"
    assert ended["progress"]["step"] < 100
    seen: list[dict[str, Any]] = []

    def record(body: dict[str, Any]) -> bool:
        seen.append(body)
        return body["status"] in FINISHED

    final = wait_until(api, second, record)
    assert final["status"] == "COMPLETED", final
    assert {"IN_PROGRESS", "COMPLETED"} <= {b["status"] for b in seen}
    sampling = [
        b["progress"] for b in seen if b["status"] == "IN_PROGRESS" and b["progress"]["stage"] == "sample"
    ]
    assert sampling, [b["progress"]["stage"] for b in seen]
    assert {p["steps"] for p in sampling} == {12} and {p["chunks"] for p in sampling} == {1}
    timed = [p for p in sampling if p["eta_s"] is not None]
    assert timed and all(0 <= p["percent"] < 100 for p in timed)  # 100 only once the job has finished
    assert [p["percent"] for p in sampling] == sorted(p["percent"] for p in sampling)
    assert (final["progress"]["percent"], final["progress"]["eta_s"]) == (100.0, 0.0)
    video = final["output"]["video"]
    assert video["delivery"] == "local" and video["url"] == f"/jobs/{second}/video" and "path" not in video
    response = requests.get(api + video["url"], timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    assert len(response.content) == final["output"]["bytes"]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"downloaded-{second}.mp4"
    try:
        path.write_bytes(response.content)
        info = probe_mp4(path)
    finally:
        path.unlink(missing_ok=True)
    assert info.frames == final["output"]["frames"] == 10 and info.has_audio
    time.sleep(max(0.0, final["expires_at"] - time.time()) + 0.5)
    assert requests.get(f"{api}/status/{second}", timeout=10).status_code == 404
    assert requests.get(f"{api}/jobs/{second}/video", timeout=10).status_code == 404


def test_runsync_waits_and_unknown_job_is_404(api: str) -> None:
    body = requests.post(f"{api}/runsync", json={"input": JOB | {"validate_only": True}}, timeout=120).json()
    assert body["status"] == "COMPLETED" and body["output"]["plan"]["resolved"]["seed"] == 5
    missing = requests.get(f"{api}/status/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    assert requests.get(f"{api}/jobs/nope/video", timeout=10).status_code == 404
    not_a_video = requests.get(f"{api}/jobs/{body['id']}/video", timeout=10)
    assert not_a_video.status_code == 409 and not_a_video.json()["error"]["code"] == "NOT_READY"
    refused = requests.post(f"{api}/run", json=JOB, timeout=10)  # not wrapped in {"input": ...}
    assert refused.status_code == 422 and "input" in refused.json()["error"]["message"]


def test_full_queue_answers_429_and_health_stays_live(serve: Callable[..., str]) -> None:
    """Issue 11.2: one job running, the queue full and 45 more requests arriving: /health and /status
    answer within a second; requests beyond the queue get 429 QUEUE_FULL."""
    api = serve(MULTITALK_QUEUE_SIZE="1")
    requests.get(f"{api}/health", timeout=60)  # the first report (cold checks) is made once
    running = run(api, LONG_JOB)
    wait_until(api, running, lambda b: b["status"] == "IN_PROGRESS")  # cancelled below before its first clip
    waiting = run(api, LONG_JOB)
    full = requests.post(f"{api}/run", json={"input": JOB}, timeout=10)
    assert full.status_code == 429 and full.json()["error"]["code"] == "QUEUE_FULL"
    assert full.json()["error"]["retryable"] is True

    def generate(_: int) -> int:
        return requests.post(f"{api}/generate", json=JOB, timeout=60).status_code

    with ThreadPoolExecutor(45) as pool:
        statuses = pool.map(generate, range(45))
        for path in ("/health", "/status", f"/status/{running}"):
            tick = time.monotonic()
            assert requests.get(api + path, timeout=5).status_code == 200
            assert time.monotonic() - tick < 1.0, path
        assert set(statuses) == {429}
    queue = requests.get(f"{api}/status", timeout=5).json()["queue"]
    assert queue == {"running": running, "waiting": 1, "capacity": 1, "kept": 0}
    assert requests.get(f"{api}/status/{waiting}", timeout=5).json()["position"] == 1
    for job_id in (waiting, running):
        requests.post(f"{api}/cancel/{job_id}", timeout=10)
    assert wait_until(api, waiting, lambda b: b["status"] in FINISHED)["status"] == "CANCELLED"


def test_openapi_lists_every_job_field_with_bounds(api: str) -> None:
    document = requests.get(f"{api}/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    assert set(schemas["GenerateInput"]["properties"]) == set(GenerateInput.model_fields)
    assert set(schemas["AdvancedInput"]["properties"]) == set(AdvancedInput.model_fields)
    steps = schemas["AdvancedInput"]["properties"]["steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (1, 100)
    body = document["paths"]["/run"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/RunRequest"}
    assert {"/run", "/runsync", "/status/{job_id}", "/cancel/{job_id}", "/jobs/{job_id}/video"} <= set(
        document["paths"]
    )
    assert requests.get(f"{api}/docs", timeout=10).status_code == 200


# ----------------------------------------------------------------------------- guards (issue 11.3)


def test_foreign_host_is_refused(api: str) -> None:
    """DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own name as Host."""
    for method, path in (("GET", "/health"), ("GET", "/status/x"), ("POST", "/run")):
        response = requests.request(
            method, api + path, headers={"Host": "rebind.example:8000"}, json={"input": JOB}, timeout=10
        )
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] == "FORBIDDEN"
        assert "MULTITALK_ALLOWED_HOSTS" in response.json()["error"]["message"]
    assert requests.get(api + "/health", headers={"Host": "localhost:1"}, timeout=60).status_code == 200


def test_allowed_hosts_setting(serve: Callable[..., str]) -> None:
    api = serve(MULTITALK_ALLOWED_HOSTS="studio.lan")
    assert requests.get(api + "/status", headers={"Host": "studio.lan:8000"}, timeout=10).status_code == 200
    assert requests.get(api + "/status", timeout=10).status_code == 403  # 127.0.0.1 is no longer listed


def test_cross_origin_and_non_json_job_requests_are_refused(api: str) -> None:
    """CSRF: a foreign page can POST text/plain or a form without a preflight; such requests run no job."""
    body = json.dumps({"input": JOB})
    cross = requests.post(
        f"{api}/run",
        data=body,
        headers={"Content-Type": "application/json", "Origin": "http://evil.example"},
        timeout=10,
    )
    assert cross.status_code == 403 and cross.json()["error"]["code"] == "FORBIDDEN"
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        plain = requests.post(f"{api}/generate", data=json.dumps(JOB), headers=headers, timeout=10)
        assert plain.status_code == 415, content_type
        assert plain.json()["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    sneaky = requests.post(
        f"{api}/cancel/x", headers={"Origin": "null", "Sec-Fetch-Site": "cross-site"}, timeout=10
    )
    assert sneaky.status_code == 403
    same = requests.post(f"{api}/run", json={"input": JOB}, headers={"Origin": api}, timeout=10)
    assert same.status_code == 200
    assert requests.get(f"{api}/status", timeout=10).json()["queue"]["kept"] + 1 >= 1


def test_bearer_token(serve: Callable[..., str]) -> None:
    api = serve(MULTITALK_API_TOKEN="s3cret-token")
    assert requests.get(f"{api}/health", timeout=60).status_code == 200  # liveness needs no token
    assert requests.get(f"{api}/", timeout=10).status_code == 200  # nor the page (it asks for the token)
    refused = requests.get(f"{api}/status", timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHORIZED"
    wrong = requests.get(f"{api}/status", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    good = requests.get(f"{api}/status", headers={"Authorization": "Bearer s3cret-token"}, timeout=10)
    assert good.status_code == 200
    assert "s3cret-token" not in requests.get(f"{api}/health", timeout=60).text


def test_non_loopback_clients_need_the_token(make_settings: Callable[..., Settings]) -> None:
    """A client address beyond loopback (not reachable from a test socket: the guard's own check)."""
    guard = RequestGuard(lambda *a: None, make_settings())  # type: ignore[arg-type, return-value]
    scope = {"type": "http", "path": "/status", "method": "GET", "headers": [(b"host", b"localhost")]}
    assert guard.check({**scope, "client": ("127.0.0.1", 5)}) is None
    refusal = guard.check({**scope, "client": ("192.0.2.7", 5)})
    assert refusal is not None and refusal.status_code == 403
    with_token = RequestGuard(lambda *a: None, make_settings(MULTITALK_API_TOKEN="t"))  # type: ignore[arg-type, return-value]
    authorised = {
        **scope,
        "client": ("192.0.2.7", 5),
        "headers": [*scope["headers"], (b"authorization", b"Bearer t")],
    }
    assert with_token.check(authorised) is None


def test_listening_beyond_loopback_needs_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    from multitalk_worker.local_api.app import main

    assert main(["--host", "0.0.0.0", "--port", "1"]) == 2  # refused before loading anything
    assert "needs MULTITALK_API_TOKEN" in capsys.readouterr().err


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


def test_a_body_past_the_inline_cap_is_refused_without_reading_it(serve: Callable[..., str]) -> None:
    """The body is read up to three inline inputs at MULTITALK_MAX_INPUT_MB (as base64) plus 1 MB: a larger
    one, declared or chunked, is a typed 413 and the server goes on serving."""
    api = serve(MULTITALK_MAX_INPUT_MB="0.01")  # limit: 3 x 13,334 + 1,000,000 bytes
    padding = "A" * 1_100_000
    body = json.dumps({"input": JOB | {"prompt": padding}}).encode()
    declared = requests.post(
        f"{api}/run", data=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "INPUT_TOO_LARGE"
    assert "over 1.0 MB" in declared.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts what it reads
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    chunked = requests.post(
        f"{api}/generate", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert chunked.status_code == 413
    assert chunked.json()["error"]["code"] == "INPUT_TOO_LARGE"
    small = requests.post(f"{api}/generate", json=JOB | {"validate_only": True}, timeout=60)
    assert small.status_code == 413  # read and checked: the example speech is over this 0.01 MB cap
    assert "speakers[0].audio: 0.1 MB exceeds the limit" in small.json()["error"]["message"]
