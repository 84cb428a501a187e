"""The RunPod handler end to end on the tiny model, through the runpod SDK's own `run_job` (the code path a
RunPod worker takes), with real loopback S3 and https servers.

Generations on the tiny model cost tens of seconds on a CPU, so only two tests generate; every failing job
fails before the GPU stage.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from runpod.serverless.modules.rp_job import run_job
from torch.distributed import DistBackendError

from multitalk_worker.config import Settings
from multitalk_worker.errors import ERROR_CODES, OutputInvalid
from multitalk_worker.logs import configure_logging
from multitalk_worker.media import probe_mp4, read_frames, write_mp4
from multitalk_worker.pipeline.request import GenerationResult
from multitalk_worker.progress import Snapshot
from multitalk_worker.service import JobService
from multitalk_worker.service.faults import error_for
from multitalk_worker.service.verify import verify_video
from multitalk_worker.worker import make_handler
from tests.conftest import EXAMPLES, REPO
from tests.servers import OUTPUT_BUCKET, HttpsServer, S3Server

FAST = {"resolution": "tiny", "max_duration_s": 0.4, "advanced": {"steps": 2, "seed": 3}}


def job_input(**fields: Any) -> dict[str, Any]:
    base = {
        "image": "inputs/person.png",
        "speakers": [{"audio": "inputs/speech_a.wav"}],
        "prompt": "a person talks",
    }
    return base | FAST | fields


def run(worker: JobService, raw: Any, job_id: str = "job-1") -> dict[str, Any]:
    """One job through the runpod SDK's run_job, as on RunPod. Returns the SDK's result dict."""
    return asyncio.run(run_job(make_handler(worker), {"id": job_id, "input": raw}))


def error_of(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" in result, result
    error = json.loads(result["error"])
    assert set(error) == {"code", "message", "stage", "retryable"}
    assert "Traceback" not in error["message"]
    return error


# ----------------------------------------------------------------------------- one test per error code


def test_invalid_input_unknown_field(make_settings: Callable[..., Settings]) -> None:
    error = error_of(run(JobService(make_settings()), job_input(colour="red")))
    assert (error["code"], error["stage"], error["retryable"]) == ("INVALID_INPUT", "validate", False)
    assert "colour: unknown field" in error["message"]


def test_declared_audio_length_is_refused_before_decoding(make_settings: Callable[..., Settings]) -> None:
    """The container's declared length is checked first: the message names the speaker's input."""
    raw = {k: v for k, v in job_input(max_duration_s=None).items() if v is not None}
    error = error_of(run(JobService(make_settings(MULTITALK_MAX_DURATION_S="1")), raw))
    assert error["code"] == "DURATION_TOO_LONG"
    assert error["message"].startswith("speakers[0].audio lasts 4.1 s"), error


@pytest.mark.parametrize(
    ("fields", "env", "code", "stage"),
    [
        ({"image": "inputs/missing.png"}, {}, "INVALID_INPUT", "fetch"),
        ({}, {"MULTITALK_MAX_INPUT_MB": "0.001"}, "INPUT_TOO_LARGE", "fetch"),
        ({"speakers": [{"audio": "inputs/person.png"}]}, {}, "AUDIO_DECODE_FAILED", "fetch"),
        ({"image": "inputs/speech_a.wav"}, {}, "IMAGE_DECODE_FAILED", "fetch"),
        ({"max_duration_s": None}, {"MULTITALK_MAX_DURATION_S": "1"}, "DURATION_TOO_LONG", "validate"),
        ({"max_duration_s": 2.0}, {"MULTITALK_MAX_DURATION_S": "1"}, "DURATION_TOO_LONG", "validate"),
        ({"output": {"delivery": "s3"}}, {}, "INVALID_INPUT", "validate"),
        ({}, {"MULTITALK_WEIGHTS": "/nonexistent/weights"}, "MODEL_MISSING", "load"),
    ],
)
def test_failing_jobs_fail_early_with_their_code(
    make_settings: Callable[..., Settings], fields: dict[str, Any], env: dict[str, str], code: str, stage: str
) -> None:
    raw = {k: v for k, v in job_input(**fields).items() if v is not None}
    if env.get("MULTITALK_WEIGHTS"):
        raw["resolution"] = "480p"
    error = error_of(run(JobService(make_settings(**env)), raw))
    assert (error["code"], error["stage"]) == (code, stage), error


def test_audio_that_does_not_decode(make_settings: Callable[..., Settings], volume: Path) -> None:
    (volume / "inputs" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(200))
    error = error_of(run(JobService(make_settings()), job_input(speakers=[{"audio": "inputs/broken.wav"}])))
    assert error["code"] == "AUDIO_DECODE_FAILED"


def test_model_load_failed(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    (weights / "config.json").write_text('{"dim": 7}')
    raw = job_input(resolution="480p")
    error = error_of(run(JobService(make_settings(MULTITALK_WEIGHTS=str(weights))), raw))
    assert (error["code"], error["stage"]) == ("MODEL_LOAD_FAILED", "load")


def failing_sink(exc: BaseException) -> Callable[[dict[str, Any], Snapshot], None]:
    """Test double of RunPod's progress queue that raises `exc` on the first update (inside generation)."""

    def sink(job: dict[str, Any], update: Snapshot) -> None:
        raise exc

    return sink


@pytest.mark.parametrize(
    ("exc", "code", "refresh"),
    [
        (
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "OUT_OF_MEMORY",
            True,
        ),
        (torch.AcceleratorError("CUDA error: an illegal memory access"), "GENERATION_FAILED", True),
        (ZeroDivisionError("boom"), "GENERATION_FAILED", False),
    ],
)
def test_generation_faults_and_refresh(
    make_settings: Callable[..., Settings], exc: Exception, code: str, refresh: bool
) -> None:
    worker = JobService(make_settings(), progress_sink=failing_sink(exc))
    result = run(worker, job_input())
    error = error_of(result)
    assert (error["code"], error["stage"]) == (code, "generate")
    assert result.get("stopPod", False) is refresh  # the SDK turns refresh_worker into stopPod
    assert "boom" not in error["message"] and "illegal" not in error["message"]
    worker.progress_sink = None
    assert "error" not in run(worker, job_input(validate_only=True))  # the same worker serves the next job


@pytest.mark.parametrize(
    ("output", "env", "code"),
    [
        ({"delivery": "base64"}, {"MULTITALK_MAX_BASE64_MB": "0.001"}, "OUTPUT_TOO_LARGE"),
        ({"delivery": "s3"}, {"denied": "1"}, "UPLOAD_FAILED"),
    ],
)
def test_delivery_failures_after_generation(
    make_settings: Callable[..., Settings],
    s3_server: S3Server,
    output: dict[str, Any],
    env: dict[str, str],
    code: str,
) -> None:
    """A job that generated but cannot deliver fails with the delivery's code; no partial success."""
    keys = s3_server.reader_denied if env.pop("denied", None) else None
    worker = JobService(make_settings(**s3_server.env(keys), **env))
    error = error_of(run(worker, job_input(output=output)))
    assert (error["code"], error["stage"]) == (code, "output")
    assert "error" not in run(worker, job_input(validate_only=True))


def test_volume_delivery(make_settings: Callable[..., Settings], volume: Path, tmp_path: Path) -> None:
    result = run(
        JobService(make_settings()), job_input(output={"delivery": "volume", "path": "renders/a.mp4"})
    )
    out = result["output"]
    assert out["video"] == {"delivery": "volume", "path": str((volume / "renders" / "a.mp4").resolve())}
    check_video((volume / "renders" / "a.mp4").read_bytes(), out, tmp_path)


@pytest.mark.parametrize(
    ("exc", "code", "refresh"),
    [
        (torch.OutOfMemoryError("out of memory"), "OUT_OF_MEMORY", True),
        (torch.AcceleratorError("device-side assert triggered"), "GENERATION_FAILED", True),
        (DistBackendError("NCCL communicator was aborted"), "GENERATION_FAILED", True),
        # by type, never by text: a plain RuntimeError that mentions CUDA is this job's internal error
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "GENERATION_FAILED", False),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), "GENERATION_FAILED", False),
    ],
)
def test_faults_are_told_apart_by_type(exc: Exception, code: str, refresh: bool) -> None:
    error, refreshed = error_for(exc, "generate")
    assert (error.code, refreshed) == (code, refresh)
    assert ("GPU fault" in error.message) is (refresh and code == "GENERATION_FAILED")


def test_error_mapping_covers_every_code() -> None:
    from multitalk_worker import errors

    classes = {cls.code for cls in vars(errors).values() if isinstance(cls, type) and hasattr(cls, "code")}
    assert set(ERROR_CODES) <= classes
    assert error_for(MemoryError(), "generate")[0].code == "OUT_OF_MEMORY"
    from_inputs, refresh = error_for(MemoryError(), "fetch")  # the inputs' cost: a retry cannot succeed
    assert (from_inputs.code, from_inputs.retryable, refresh) == ("INPUT_TOO_LARGE", False, False)
    for code in ERROR_CODES:
        cls = next(
            c for c in vars(errors).values() if isinstance(c, type) and getattr(c, "code", None) == code
        )
        mapped, _ = error_for(cls("x"), "generate")
        assert mapped.to_dict()["code"] == code


def test_cancelled_before_generation(make_settings: Callable[..., Settings]) -> None:
    cancel = threading.Event()
    cancel.set()
    outcome = JobService(make_settings()).run({"id": "c", "input": job_input()}, cancel)
    assert outcome.error is not None and outcome.error["code"] == "CANCELLED"


def test_runpod_cancel_reaches_the_pipeline(make_settings: Callable[..., Settings]) -> None:
    started = threading.Event()
    worker = JobService(make_settings(), progress_sink=lambda job, update: started.set())

    async def scenario() -> None:
        task = asyncio.ensure_future(make_handler(worker)({"id": "c2", "input": job_input()}))
        await asyncio.to_thread(started.wait, 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert worker._lock.acquire(timeout=1)  # the job's thread has finished
    worker._lock.release()


def test_output_invalid_when_the_mp4_disagrees(tmp_path: Path) -> None:
    frames = np.zeros((5, 16, 16, 3), np.uint8)
    path = tmp_path / "v.mp4"
    write_mp4(path, frames, np.zeros(3200, np.float32), 16_000, 25)
    good = GenerationResult(frames, 5, (16, 16), np.zeros(3200, np.float32), 16_000, 25, 1, {}, {})
    assert verify_video(path, good).frames == 5
    claims_more = GenerationResult(None, 7, (16, 16), good.audio, 16_000, 25, 1, {}, {})
    with pytest.raises(OutputInvalid) as info:
        verify_video(path, claims_more)
    assert info.value.code == "OUTPUT_INVALID" and "5 frames decoded, 7 written" in info.value.message


# ----------------------------------------------------------------------------- validate_only and health


def test_validate_only_returns_the_plan(
    make_settings: Callable[..., Settings], https_server: HttpsServer
) -> None:
    url = https_server.add("/w/person.png", (EXAMPLES / "person.png").read_bytes(), "image/png")
    settings = make_settings(MULTITALK_CA_BUNDLE=str(https_server.ca_bundle))
    result = run(JobService(settings), job_input(image=url, validate_only=True, preset="fusionx"))
    plan = result["output"]["plan"]
    assert result["output"]["validate_only"] is True
    assert plan["image"]["width"] > 0 and len(plan["bucket"]) == 2
    assert plan["resolved"]["steps"] == 2 and plan["resolved"]["text_guidance"] == 1.0
    assert plan["resolved"]["shift"] == 2.0 and plan["resolved"]["preset_needs_lora"] is True
    assert plan["delivery"] == {"delivery": "base64"} and plan["duration_s"] == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"speakers": [{"audio": "inputs/speech_a.wav", "region": "left"}]},
            "only applies with two speakers",
        ),
        (
            {
                "image": "inputs/two_people.png",
                "speakers": [
                    {"audio": "inputs/speech_a.wav", "region": [0.0, 0.0, 0.6, 1.0]},
                    {"audio": "inputs/speech_b.wav", "region": [0.4, 0.0, 1.0, 1.0]},
                ],
            },
            "regions of the two speakers overlap",
        ),
    ],
)
def test_validate_only_refuses_what_the_job_refuses(
    make_settings: Callable[..., Settings], fields: dict[str, Any], message: str
) -> None:
    """validate_only runs the job's own input checks (pipeline.check_inputs): its OK means the inputs pass."""
    error = error_of(run(JobService(make_settings()), job_input(validate_only=True, **fields)))
    assert (error["code"], error["retryable"]) == ("INVALID_INPUT", False) and message in error["message"]


def test_tiny_worker_defaults_to_the_tiny_buckets(make_settings: Callable[..., Settings]) -> None:
    """A job naming no resolution gets the tiny family on the tiny model, as the tiny CLI does."""
    raw = {k: v for k, v in job_input(validate_only=True).items() if k != "resolution"}
    plan = run(JobService(make_settings()), raw)["output"]["plan"]
    assert plan["resolved"]["resolution"] == "tiny" and plan["bucket"] == [64, 48]  # 448x384 image


@pytest.mark.parametrize("port", ["99999", "abc", "-1"])
def test_url_with_an_invalid_port(make_settings: Callable[..., Settings], port: str) -> None:
    error = error_of(run(JobService(make_settings()), job_input(image=f"https://example.com:{port}/a.png")))
    assert (error["code"], error["stage"]) == ("INVALID_INPUT", "validate")
    assert "is not a TCP port (1-65535)" in error["message"]


def test_volume_name_over_the_limit(make_settings: Callable[..., Settings]) -> None:
    error = error_of(run(JobService(make_settings()), job_input(image="inputs/" + "x" * 256 + ".png")))
    assert error["code"] == "INVALID_INPUT" and "at most 255 bytes" in error["message"]


@pytest.mark.parametrize(
    ("output", "env", "code", "fragment"),
    [
        ({"delivery": "volume", "path": "inputs/person.png/a.mp4"}, {}, "INVALID_INPUT", "is a file"),
        ({"delivery": "volume", "path": "renders/" + "n" * 300 + ".mp4"}, {}, "INVALID_INPUT", "at most 255"),
        ({"delivery": "s3"}, {"MULTITALK_S3_BUCKET": "no-such-bucket"}, "UPLOAD_FAILED", "no such bucket"),
    ],
)
def test_unwritable_destination_is_refused_before_generation(
    make_settings: Callable[..., Settings],
    s3_server: S3Server,
    output: dict[str, Any],
    env: dict[str, str],
    code: str,
    fragment: str,
) -> None:
    """Refused before any input is fetched or frame made (no progress update), and not retryable."""
    updates: list[dict[str, Any]] = []
    worker = JobService(
        make_settings(**{**s3_server.env(), **env}), progress_sink=lambda j, u: updates.append(u)
    )
    error = error_of(run(worker, job_input(output=output)))
    assert (error["code"], error["stage"], error["retryable"]) == (code, "output", False)
    assert fragment in error["message"] and updates == []


def test_health_reports_without_secrets(make_settings: Callable[..., Settings], s3_server: S3Server) -> None:
    settings = make_settings(**s3_server.env())
    report = run(JobService(settings), {"action": "health"})["output"]
    assert report["status"] == "ok", report["checks"]
    assert {c["name"] for c in report["checks"]} == {"imports", "versions", "media", "weights", "gpu"}
    text = json.dumps(report)
    assert s3_server.writer[1] not in text and s3_server.writer[0] not in text
    assert report["settings"]["MULTITALK_S3_SECRET_ACCESS_KEY"] == "set"


# ----------------------------------------------------------------------------- full jobs


def check_video(data: bytes, result: dict[str, Any], tmp_path: Path) -> None:
    assert hashlib.sha256(data).hexdigest() == result["sha256"] and len(data) == result["bytes"]
    path = tmp_path / "got.mp4"
    path.write_bytes(data)
    info = probe_mp4(path)
    assert (info.frames, info.fps, info.width, info.height) == (
        result["frames"],
        25.0,
        result["width"],
        result["height"],
    )
    assert info.frames == 10 and info.has_audio and abs(info.audio_duration_s - 0.4) < 0.1
    assert result["seed"] == 3 and result["resolved"]["steps"] == 2
    assert result["timings"]["model_load_s"] >= 0 and isinstance(result["timings"]["cold_start"], bool)
    assert result["worker"]["version"]


def test_twenty_jobs_in_a_row(
    make_settings: Callable[..., Settings],
    s3_server: S3Server,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Failures mixed with successes on one worker: every job gets its own outcome, the two real
    generations (base64, then s3) return verified videos, no temp files remain, and nothing secret,
    presigned or base64 reaches any log."""
    settings = make_settings(MULTITALK_LOG_LEVEL="DEBUG", **s3_server.env())
    configure_logging(settings.log_level)
    caplog.set_level(logging.DEBUG)
    worker = JobService(settings)
    image_b64 = base64.b64encode((EXAMPLES / "person.png").read_bytes()).decode()
    failing = [
        ({"colour": "red"}, "INVALID_INPUT"),
        ({"image": "inputs/missing.png"}, "INVALID_INPUT"),
        ({"speakers": [{"audio": "inputs/person.png"}]}, "AUDIO_DECODE_FAILED"),
        ({"image": "inputs/speech_a.wav"}, "IMAGE_DECODE_FAILED"),
        ({"image": f"s3://{OUTPUT_BUCKET}/nope.png"}, "INPUT_FETCH_FAILED"),
        ({"max_duration_s": 41}, "DURATION_TOO_LONG"),
        ({"advanced": {"steps": 0}}, "INVALID_INPUT"),
        ({"resolution": "1080p"}, "INVALID_INPUT"),
        ({"image": "../escape.png"}, "INVALID_INPUT"),
    ]
    outcomes: list[tuple[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for index in range(20):
        job_id = f"job-{index:02d}"
        if index == 10:
            # test double of RunPod's queue: what worker.runpod_progress sends
            worker.progress_sink = lambda job, snapshot: updates.append(snapshot.to_dict())
            result = run(worker, job_input(image=image_b64, output={"delivery": "base64"}), job_id)
            worker.progress_sink = None
            check_video(base64.b64decode(result["output"]["video"]["base64"]), result["output"], tmp_path)
            steps = [(u["chunk"], u["step"]) for u in updates if u["stage"] == "sample"]
            assert steps == [(1, 1), (1, 2)], updates  # one clip, two steps
            # the local API's progress fields; of 2 steps + 1 decode, the decode still to run at 2 steps
            percents = [u["percent"] for u in updates if u["percent"] is not None]  # None before clip 1
            assert set(updates[0]) == {f.name for f in dataclasses.fields(Snapshot)}
            assert percents == sorted(percents) and percents[-1] == 66.6, updates
            outcomes.append(("ok", result["output"]["video"]["delivery"]))
        elif index == 19:
            result = run(worker, job_input(output={"delivery": "s3", "key": "runs/last.mp4"}), job_id)
            video = result["output"]["video"]
            assert (video["bucket"], video["key"]) == (OUTPUT_BUCKET, "multitalk/runs/last.mp4")
            body = s3_server.client().get_object(Bucket=OUTPUT_BUCKET, Key=video["key"])
            assert body["ContentType"] == "video/mp4"
            check_video(body["Body"].read(), result["output"], tmp_path)
            assert "X-Amz-Signature=" in video["url"] and video["url_expires_in_s"] == 3600
            outcomes.append(("ok", video["delivery"]))
        elif index % 3 == 0:
            assert run(worker, {"action": "health"}, job_id)["output"]["status"] == "ok"
            outcomes.append(("ok", "health"))
        else:
            fields, code = failing[index % len(failing)]
            assert error_of(run(worker, job_input(**fields), job_id))["code"] == code
            outcomes.append(("error", code))
    assert outcomes[10] == ("ok", "base64") and outcomes[19] == ("ok", "s3")
    assert list((tmp_path / "work").iterdir()) == []  # every job's scratch folder is gone

    captured = capfd.readouterr()
    logs = "\n".join(r.getMessage() for r in caplog.records) + captured.out + captured.err
    assert "job-19 done" in logs
    for secret in (*s3_server.writer, image_b64[100:160], "X-Amz-Signature", "X-Amz-Credential"):
        assert secret not in logs
    assert not re.search(r"[A-Za-z0-9+/]{200,}", logs)  # no base64 payload of any kind


def test_s3_delivery_shows_the_part_so_far_as_it_grows(
    make_settings: Callable[..., Settings], s3_server: S3Server, tmp_path: Path
) -> None:
    """A two-clip job (the whole 4.1 s of speech_a) with S3 delivery through the RunPod handler: after clip 1
    the part so far is uploaded beside the video's key, its presigned URL comes in the progress updates, and
    what that URL gives while the job runs decodes to the finished clip's frames (the final video's first
    frames, bit for bit) with their audio; at the end the part is deleted and the object is the whole
    video."""
    key = "multitalk/grows.mp4"
    client = s3_server.client()
    updates: list[Snapshot] = []
    fetched: list[tuple[int, bytes]] = []

    def sink(job: dict[str, Any], snapshot: Snapshot) -> None:  # test double of RunPod's queue
        updates.append(snapshot)
        if snapshot.clips_done and not any(u.part_url for u in updates):
            _wait_for_object(client, key + ".part")  # a client waiting for the part (the upload is a thread)
        if snapshot.part_url and not fetched:  # fetched while the job runs: the clip loop waits on this
            s3_server.enforce_auth(False)  # moto cannot check presigned signatures
            try:
                fetched.append((snapshot.part_clips, requests.get(snapshot.part_url, timeout=30).content))
            finally:
                s3_server.enforce_auth(True)

    worker = JobService(make_settings(**s3_server.env()), progress_sink=sink)
    raw = job_input(output={"delivery": "s3", "key": "grows.mp4"})
    del raw["max_duration_s"]  # the whole track
    result = run(worker, raw, "grows")["output"]

    assert result["frames"] > 81 and updates[-1].chunks == 2, result  # two clips
    assert fetched and fetched[0][0] == 1, [(u.clips_done, u.part_clips) for u in updates]
    first_clip_s = next(u.ready_s for u in updates if u.clips_done == 1)
    (tmp_path / "part.mp4").write_bytes(fetched[0][1])
    body = client.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read()
    (tmp_path / "final.mp4").write_bytes(body)
    assert hashlib.sha256(body).hexdigest() == result["sha256"]
    part, final = probe_mp4(tmp_path / "part.mp4"), probe_mp4(tmp_path / "final.mp4")
    assert part.frames == round(first_clip_s * 25) and final.frames == result["frames"]
    assert part.has_audio and abs(part.audio_duration_s - part.frames / 25) < 0.07
    part_frames = read_frames(tmp_path / "part.mp4")
    assert np.array_equal(part_frames, read_frames(tmp_path / "final.mp4")[: len(part_frames)])
    listed = client.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix="multitalk/grows")
    assert [o["Key"] for o in listed.get("Contents", [])] == [key]  # the part is gone
    assert result["timings"]["part_s"] > 0
    assert "X-Amz-Signature" not in repr(updates[-1])  # snapshots are logged at DEBUG: no presigned URL


def _wait_for_object(client: Any, key: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=key).get("KeyCount"):
        assert time.monotonic() < deadline, f"no {key} after {timeout_s} s"
        time.sleep(0.05)


def test_test_input_command_line(volume: Path, tmp_path: Path) -> None:
    """`python -m multitalk_worker.worker --test_input` (runpod's local mode) on the tiny model: a job with
    an unknown field fails with INVALID_INPUT and exit status 1. (A job that succeeds in local mode, exit
    status 0 and the SDK's result line: the next test, with S3 delivery; the full job of
    examples/tiny_job.json is run by scripts/demo.sh.)"""
    env = {
        **os.environ,
        "MULTITALK_WEIGHTS": "tiny",
        "MULTITALK_VOLUME_ROOT": str(volume),
        "MULTITALK_WORK_DIR": str(tmp_path),
    }
    job = {"input": job_input(colour="red")}
    command = [sys.executable, "-m", "multitalk_worker.worker", "--test_input", json.dumps(job)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 1 and "INVALID_INPUT" in out.stdout + out.stderr


def test_test_input_with_s3_delivery_prints_no_secret(
    volume: Path, tmp_path: Path, s3_server: S3Server
) -> None:
    """Local test mode prints the SDK's "Job result" line at INFO; with S3 delivery that result holds a
    presigned URL (signature, access key id). Every line of the run is captured: neither appears, while the
    bucket and key do. (moto refuses a made-up session token, so none is set; the whole query, where a
    token would be, is cut.)"""
    env = {
        **os.environ,
        "MULTITALK_WEIGHTS": "tiny",
        "MULTITALK_VOLUME_ROOT": str(volume),
        "MULTITALK_WORK_DIR": str(tmp_path),
        **s3_server.env(),
    }
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    job = {"input": job_input(output={"delivery": "s3", "key": "secrets/test.mp4"})}
    command = [sys.executable, "-m", "multitalk_worker.worker", "--test_input", json.dumps(job)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    lines = out.stdout + out.stderr
    assert out.returncode == 0, lines
    assert "Job result" in lines and "multitalk/secrets/test.mp4" in lines
    assert "?<query redacted>" in lines
    for secret in (*s3_server.writer, "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token"):
        assert secret not in lines, secret


def test_example_job_is_valid(make_settings: Callable[..., Settings]) -> None:
    """examples/tiny_job.json parses against the schema and names committed example inputs."""
    from multitalk_worker.schema import GenerateInput, JobLimits, parse_job_input

    raw = json.loads((REPO / "examples" / "tiny_job.json").read_text())
    parsed = parse_job_input(raw["input"], JobLimits.from_settings(make_settings()))
    assert isinstance(parsed, GenerateInput)
    assert (REPO / parsed.image).is_file()
    assert all((REPO / s.audio).is_file() for s in parsed.speakers)
