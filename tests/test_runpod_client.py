"""The local API driven by the runpod SDK's own client, unmodified: `runpod.Endpoint` pointed at a real server
on loopback through `runpod.endpoint_url_base`, as docs/api.md tells a RunPod user to do. Every SDK call
(`run_sync`, `run` + `status` + `output`, `stream`, `cancel`, `health`, `purge_queue`) with RunPod's
`policy` in the body; a webhook received by the loopback https server (tests/servers.py; loopback is allowed
by the test settings, as for the fetch tests); a failed job's error read the way docs/deploy.md's client
reads it (`json.loads(status["error"])`); RunPod's TIMED_OUT for a job past its executionTimeout.

One server for the module; one tiny generation (2 steps, 10 frames) and one cut short by its timeout.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import runpod
import soundfile

from multitalk_worker.config import Settings
from multitalk_worker.local_api.app import create_app
from multitalk_worker.local_api.jobs import JobQueue
from multitalk_worker.service import JobService
from tests.conftest import EXAMPLES, tiny_settings
from tests.servers import HttpsServer, serve_app
from tests.test_server import JOB, LONG_JOB  # 2 steps, 10 frames; 100 steps: past a 5 s timeout

ENDPOINT = "local-endpoint"  # any id: the local API serves one endpoint under every id
POLICY = {"executionTimeout": 600_000, "ttl": 3_600_000}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, https_server: HttpsServer) -> Iterator[str]:
    root = tmp_path_factory.mktemp("runpod-client")
    (root / "inputs").mkdir()
    for name in ("person.png", "speech_a.wav"):
        shutil.copy(EXAMPLES / name, root / "inputs" / name)
    speech, rate = soundfile.read(EXAMPLES / "speech_a.wav", dtype="float32")
    soundfile.write(root / "inputs" / "long.wav", np.tile(speech, 6), rate)  # 24 s
    # loopback is allowed (the webhook receiver is on it); its self-signed certificate is trusted
    settings = tiny_settings(root, root, MULTITALK_CA_BUNDLE=str(https_server.ca_bundle))
    with serve_app(create_app(JobService(settings))) as base:
        requests.get(f"{base}/health", timeout=300)  # the first report's cold checks; the SDK waits 3 s
        yield base


@pytest.fixture
def endpoint(api: str, monkeypatch: pytest.MonkeyPatch) -> runpod.Endpoint:
    """The SDK's Endpoint aimed at the local API (docs/api.md, "The runpod SDK")."""
    monkeypatch.setattr(runpod, "api_key", "unused-on-loopback")  # the SDK insists on one
    monkeypatch.setattr(runpod, "endpoint_url_base", api)
    return runpod.Endpoint(ENDPOINT)


def _status(api: str, job_id: str) -> dict[str, Any]:
    """As docs/deploy.md's client polls: the raw status JSON."""
    response = requests.get(f"{api}/{ENDPOINT}/status/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_sdk_runs_streams_and_reads_a_job_and_its_webhook(
    endpoint: runpod.Endpoint, api: str, https_server: HttpsServer
) -> None:
    health = endpoint.health()
    assert set(health["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert health["workers"] == {"idle": 1, "running": 0} and health["status"] == "ok"

    plan = endpoint.run_sync({"input": JOB | {"validate_only": True}, "policy": POLICY}, timeout=120)
    assert plan["plan"]["frames"] == 10 and plan["plan"]["resolved"]["steps"] == 2

    hook = https_server.base_url + "/hook"
    job = endpoint.run({"input": JOB, "policy": POLICY, "webhook": hook})
    updates = list(job.stream())  # each progress update, read once, until the job has finished
    sampling = [u for u in updates if u["stage"] == "sample"]
    assert [(u["chunk"], u["step"]) for u in sampling] == [(1, 1), (1, 2)], updates
    assert updates[0]["stage"] in ("fetch", "validate") and updates[-1]["stage"] != "sample"
    assert job.status() == "COMPLETED"
    output = job.output()
    assert output["frames"] == 10 and output["video"]["url"] == f"/jobs/{job.job_id}/video"
    assert requests.get(api + output["video"]["url"], timeout=30).content[4:8] == b"ftyp"
    status = _status(api, job.job_id)
    assert status["executionTime"] > 0 and status["delayTime"] >= 0 and "error" not in status

    deadline = time.monotonic() + 30  # the webhook is posted from its own thread
    while not https_server.posts and time.monotonic() < deadline:
        time.sleep(0.1)
    path, posted = https_server.posts[-1]
    assert path == "/hook" and posted["id"] == job.job_id and posted["status"] == "COMPLETED"
    assert posted["output"]["sha256"] == output["sha256"]
    assert endpoint.health()["jobs"]["completed"] >= 2


def test_sdk_reads_a_failed_job_as_deploy_md_does(endpoint: runpod.Endpoint, api: str) -> None:
    """A job that fails on its input (a picture given as speech) ends FAILED; its `error` is a JSON string,
    as on RunPod, so deploy.md's `json.loads(status["error"])` works; run_sync answers no output."""
    bad = JOB | {"speakers": [{"audio": "inputs/person.png"}]}
    job = endpoint.run({"input": bad, "policy": POLICY})
    assert job.output(timeout=120) is None and job.status() == "FAILED"
    status = _status(api, job.job_id)
    assert isinstance(status["error"], str)
    error = json.loads(status["error"])
    assert error["code"] == "AUDIO_DECODE_FAILED" and error["retryable"] is False, error
    assert endpoint.run_sync({"input": bad}, timeout=120) is None


def test_sdk_cancel_purge_and_execution_timeout(endpoint: runpod.Endpoint, api: str) -> None:
    """A long job with a 5 s executionTimeout ends TIMED_OUT at its next step; of the two queued behind it,
    one is cancelled through the SDK and the other removed by purge_queue. The long job is 20 s of speech in
    clips of 100 steps, minutes of CPU (a 4 s job of 100-step clips once finished inside the 5 s on CI)."""
    long_speech = {"speakers": [{"audio": "inputs/long.wav"}], "max_duration_s": 20.0}
    slow = endpoint.run({"input": LONG_JOB | long_speech, "policy": {"executionTimeout": 5_000}})
    queued = [endpoint.run({"input": JOB, "policy": POLICY}) for _ in range(2)]
    cancelled = queued[0].cancel()
    assert cancelled["id"] == queued[0].job_id and cancelled["status"] == "CANCELLED"
    assert endpoint.purge_queue() == {"removed": 1, "status": "completed"}
    assert queued[1].status() == "CANCELLED"
    assert slow.output(timeout=300) is None and slow.status() == "TIMED_OUT"
    error = json.loads(_status(api, slow.job_id)["error"])
    assert error["code"] == "TIMED_OUT" and "executionTimeout (5000 ms)" in error["message"], error
    progress = _status(api, slow.job_id)["progress"]
    assert progress["step"] < 100  # stopped at a step, not run to the end
    assert endpoint.health()["jobs"]["failed"] >= 1


def test_refusals_in_the_documented_shape(api: str) -> None:
    """Policy keys, webhooks outside the address policy and unknown routes: typed errors, never FastAPI's
    {"detail": ...}; the same under an endpoint id and at the root."""
    for base in (api, f"{api}/{ENDPOINT}"):
        unknown_policy = requests.post(
            f"{base}/run", json={"input": JOB, "policy": {"executionTimout": 5000}}, timeout=30
        )
        assert unknown_policy.status_code == 422
        assert "executionTimout" in unknown_policy.json()["error"]["message"]
        short = requests.post(
            f"{base}/run", json={"input": JOB, "policy": {"executionTimeout": 10}}, timeout=30
        )
        assert short.status_code == 422 and "5000" in short.json()["error"]["message"]
        for webhook, problem in (
            ("http://127.0.0.1/hook", "only https"),
            ("https://10.1.2.3/hook", "not a public address"),
            ("https://169.254.169.254/latest", "not a public address"),
        ):
            refused = requests.post(f"{base}/run", json={"input": JOB, "webhook": webhook}, timeout=30)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["code"] == "INVALID_INPUT"
            assert refused.json()["error"]["message"].startswith("webhook:")
            assert problem in refused.json()["error"]["message"]
    extra = requests.post(f"{api}/run", json={"input": JOB, "s3Config": {}}, timeout=30)
    assert extra.status_code == 422 and '"policy" and "webhook"' in extra.json()["error"]["message"]
    missing = requests.get(f"{api}/{ENDPOINT}/status/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    nowhere = requests.get(f"{api}/no/such/route", timeout=10)
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "NOT_FOUND"
    assert "detail" not in nowhere.json()
    wrong_method = requests.get(f"{api}/{ENDPOINT}/run", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_a_waiting_job_past_its_ttl_ends_timed_out(tmp_path: Path) -> None:
    """policy.ttl counts from submission: a job still waiting when it passes ends TIMED_OUT without running
    (the queue's runner is not started here, so the job can only wait); one without a ttl waits on."""
    settings = Settings.from_env({"MULTITALK_WEIGHTS": "tiny", "MULTITALK_DEVICE": "cpu"})
    queue = JobQueue(JobService(settings), capacity=4, ttl_s=60, results=tmp_path)
    short = queue.submit(JOB, ttl_s=0.2)
    patient = queue.submit(JOB)
    time.sleep(0.3)
    ended = queue.get(short.id)
    assert ended is not None and ended.status == "TIMED_OUT" and ended.input is None
    assert ended.error is not None and ended.error["code"] == "TIMED_OUT" and ended.error["stage"] == "queue"
    assert "policy.ttl (200 ms" in ended.error["message"]
    waiting = queue.get(patient.id)
    assert waiting is not None and waiting.status == "IN_QUEUE" and queue.position(patient.id) == 1
    assert queue.totals()["TIMED_OUT"] == 1
