"""The same jobs through every door: the CLI, the RunPod handler (the runpod SDK's job runner, as its local
mode and RunPod run it, and once as `--test_input` in a process) and the local HTTP API (`/run` then
`/status`, and `/runsync`), on the tiny model. Every door parses with the same limits and serves with the
same job service, so each case must give the same acceptance, the same error code, the same resolved
parameters and plan, and for a success the same video bytes (sha256; lossless x264, which repeats on a
busy CPU where the default crf does not).

One server and one job service (one resident pipeline) serve every case; 2 steps, the fewest frames.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import uvicorn
from runpod.serverless.modules.rp_job import run_job

from multitalk_worker.config import Settings
from multitalk_worker.local_api.app import create_app
from multitalk_worker.service import JobService
from multitalk_worker.worker import make_handler
from tests.conftest import EXAMPLES, REPO, Cli, tiny_env
from tests.servers import free_port

FAST = {"resolution": "tiny", "max_duration_s": 0.4, "advanced": {"steps": 2, "seed": 3}}
ONE = {"image": "person.png", "speakers": [{"audio": "speech_a.wav"}], "prompt": "a person talks"}
TWO = {
    "image": "two_people.png",
    "speakers": [{"audio": "speech_a.wav", "region": "left"}, {"audio": "speech_b.wav", "region": "right"}],
    "prompt": "two people talk",
}
DUB = {"model": "infinitetalk", "video": "source.mp4", "speakers": [{"audio": "speech_a.wav"}], "prompt": "p"}
IT_IMAGE = ONE | {"model": "infinitetalk"}
# (case, job, expected: "ok" or the error code); paths are relative to the volume (the CLI: under it)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("multitalk one speaker", ONE | FAST, "ok"),
    ("multitalk two speakers", TWO | FAST, "ok"),
    ("infinitetalk dubs a video", DUB | FAST, "ok"),
    ("infinitetalk animates an image", IT_IMAGE | FAST, "ok"),
    (
        "infinitetalk, 120 s of audio capped at 3 s",
        IT_IMAGE | FAST | {"speakers": [{"audio": "speech_120s.wav"}], "max_duration_s": 3.0},
        "ok",
    ),
    (  # no max_duration_s: the whole 300 s track sets the length (InfiniteTalk's limit is 600 s)
        "validate_only of a 300 s infinitetalk job",
        {k: v for k, v in (IT_IMAGE | FAST).items() if k != "max_duration_s"}
        | {"speakers": [{"audio": "speech_300s.wav"}], "validate_only": True},
        "ok",
    ),
    ("unknown field", ONE | FAST | {"colour": "red"}, "INVALID_INPUT"),
    ("image and video", ONE | FAST | {"video": "source.mp4", "model": "infinitetalk"}, "INVALID_INPUT"),
    ("multitalk cannot dub", DUB | FAST | {"model": "multitalk"}, "INVALID_INPUT"),
    ("adapter of another model", ONE | FAST | {"adapter": "single"}, "INVALID_INPUT"),
    ("zero steps", ONE | FAST | {"advanced": {"steps": 0, "seed": 3}}, "INVALID_INPUT"),
    ("three speakers", ONE | FAST | {"speakers": [{"audio": "speech_a.wav"}] * 3}, "INVALID_INPUT"),
    ("multitalk past 40 s", ONE | FAST | {"max_duration_s": 41.0}, "DURATION_TOO_LONG"),
    # past every model's limit: the wire schema's own bound on the field
    ("infinitetalk past 600 s", IT_IMAGE | FAST | {"max_duration_s": 601.0}, "INVALID_INPUT"),
    (  # without max_duration_s the whole track sets the length: refused by the length rule at every door
        "120 s of audio without a cap",
        {
            "image": "person.png",
            "speakers": [{"audio": "speech_120s.wav"}],
            "prompt": "p",
            "resolution": "tiny",
        }
        | {"advanced": {"steps": 2, "seed": 3}},
        "DURATION_TOO_LONG",
    ),
    ("missing audio file", ONE | FAST | {"speakers": [{"audio": "nowhere.wav"}]}, "INVALID_INPUT"),
    ("audio that is no audio", ONE | FAST | {"speakers": [{"audio": "person.png"}]}, "AUDIO_DECODE_FAILED"),
]
# no flag says these; --image with --video is refused by argparse itself (exit status 2, before any check)
CLI_CANNOT = {"unknown field", "validate_only of a 300 s infinitetalk job", "image and video"}
FINISHED = ("COMPLETED", "FAILED", "CANCELLED")


def write_tone(path: Path, seconds: float) -> Path:
    """A 16 kHz mono wav of a voiced-like tone (speech level: the loudness check passes)."""
    t = np.arange(int(seconds * 16000)) / 16000
    samples = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(np.round(samples * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One volume, one job service (its resident pipeline serves the handler and the local API), one
    local API server on 127.0.0.1."""
    root = tmp_path_factory.mktemp("doors")
    volume = root / "volume"
    volume.mkdir()
    for name in ("person.png", "two_people.png", "speech_a.wav", "speech_b.wav", "source.mp4"):
        (volume / name).write_bytes((EXAMPLES / name).read_bytes())
    write_tone(volume / "speech_120s.wav", 120.0)
    write_tone(volume / "speech_300s.wav", 300.0)
    (root / "work").mkdir()
    env = tiny_env(root / "work", volume, MULTITALK_VIDEO_CRF="0")
    service = JobService(Settings.from_env(env))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield {"service": service, "api": f"http://127.0.0.1:{port}", "volume": volume, "env": env, "seen": {}}
    server.should_exit = True
    thread.join(timeout=120)


# ----------------------------------------------------------------------------- the doors


def through_handler(service: JobService, job: dict[str, Any]) -> dict[str, Any]:
    """The runpod SDK's job runner with our handler (what `--test_input` and RunPod call)."""
    answer = asyncio.run(run_job(make_handler(service), {"id": "door", "input": job}))
    if "error" in answer:
        return {"error": json.loads(answer["error"])}
    output = answer["output"]
    if "video" in output:
        data = base64.b64decode(output["video"]["base64"])
        output = output | {"video_sha256": hashlib.sha256(data).hexdigest()}
    return {"output": output}


def through_api(api: str, job: dict[str, Any], route: str) -> dict[str, Any]:
    """`/run` then `/status/{id}` until it ends, or `/runsync`; a refusal at submission is the error."""
    response = requests.post(f"{api}/{route}", json={"input": job}, timeout=600)
    body = response.json()
    if response.status_code != 200:
        return {"error": body["error"]}
    while body["status"] not in FINISHED:
        time.sleep(0.2)
        body = requests.get(f"{api}/status/{body['id']}", timeout=30).json()
    if body["status"] != "COMPLETED":
        return {"error": json.loads(body["error"])}  # a job's error is a JSON string, as on RunPod
    output = body["output"]
    if "video" in output:
        data = requests.get(api + output["video"]["url"], timeout=60).content
        output = output | {"video_sha256": hashlib.sha256(data).hexdigest()}
    return {"output": output}


def cli_args(job: dict[str, Any], volume: Path, out: Path) -> list[str]:
    """The job as the CLI's flags (the CLI builds the same wire input from them)."""
    args = ["generate", "--json", "--weights", "tiny", "--device", "cpu", "--crf", "0", "--out", str(out)]
    flags = {"model": "--model", "adapter": "--adapter", "prompt": "--prompt", "resolution": "--resolution"}
    for field, flag in flags.items():
        if field in job:
            args += [flag, str(job[field])]
    for field in ("image", "video"):
        if field in job:
            args += [f"--{field}", str(volume / job[field])]
    for speaker in job["speakers"]:
        args += ["--audio", str(volume / speaker["audio"])]
        args += ["--region", speaker["region"]] if "region" in speaker else []
    if "max_duration_s" in job:
        args += ["--max-duration", str(job["max_duration_s"])]
    advanced = job.get("advanced", {})
    args += ["--steps", str(advanced["steps"]), "--seed", str(advanced["seed"])]
    return args


def through_cli(cli: Cli, job: dict[str, Any], volume: Path, out: Path) -> dict[str, Any]:
    proc = cli(*cli_args(job, volume, out))
    if proc.returncode != 0:
        line = proc.stderr.strip().splitlines()[-1]
        return {"error": {"code": line.split("[", 1)[1].split("]", 1)[0], "message": line}}
    output = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"output": output | {"video_sha256": hashlib.sha256(out.read_bytes()).hexdigest()}}


# ----------------------------------------------------------------------------- what must agree


def outcome(answer: dict[str, Any]) -> str:
    return "ok" if "output" in answer else answer["error"]["code"]


def pipeline_report(answer: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's report as every door gives it (the CLI's has no job fields, such as the preset)."""
    output = answer["output"]
    resolved = output["resolved"] if "resolved" in output else output["plan"]["resolved"]
    return {k: v for k, v in resolved.items() if k not in ("preset", "preset_needs_lora")}


@pytest.mark.parametrize(("case", "job", "expected"), CASES, ids=[c[0] for c in CASES])
def test_the_same_job_through_every_door(
    doors: dict[str, Any], cli: Cli, tmp_path: Path, case: str, job: dict[str, Any], expected: str
) -> None:
    answers = {"handler": through_handler(doors["service"], job)}
    if expected == "ok" and "validate_only" not in job:  # a generation: /run + /status, or /runsync
        route = "runsync" if len(doors["seen"]) % 2 else "run"
        answers[f"api /{route}"] = through_api(doors["api"], job, route)
    else:  # refusals and plans are cheap: both routes
        answers["api /run"] = through_api(doors["api"], job, "run")
        answers["api /runsync"] = through_api(doors["api"], job, "runsync")
    if case not in CLI_CANNOT:
        answers["cli"] = through_cli(cli, job, doors["volume"], tmp_path / "out.mp4")
    doors["seen"][case] = answers
    assert {door: outcome(a) for door, a in answers.items()} == dict.fromkeys(answers, expected), answers
    if expected != "ok":
        return
    reports = {door: pipeline_report(a) for door, a in answers.items()}
    served = reports["handler"]
    for door, report in reports.items():  # the CLI reports what the pipeline made; the others say as much
        assert {k: served[k] for k in report} == report, (door, report, served)
    if "validate_only" in job:
        plans = [{k: v for k, v in a["output"]["plan"].items() if k != "delivery"} for a in answers.values()]
        assert all(plan == plans[0] for plan in plans), plans
        assert plans[0]["resolved"]["model"] == "infinitetalk" and plans[0]["duration_s"] > 299
        return
    digests = {door: a["output"]["video_sha256"] for door, a in answers.items()}
    assert len(set(digests.values())) == 1, digests
    assert answers["handler"]["output"]["sha256"] == digests["handler"]


def test_the_handler_in_its_own_process_makes_the_same_video(doors: dict[str, Any]) -> None:
    """`python -m multitalk_worker.worker --test_input`: the runpod SDK's local mode, one job, in a process
    of its own; its video is the in-process handler's, byte for byte."""
    job = CASES[0][1]
    env = {**os.environ, **doors["env"], "PYTHONPATH": str(REPO / "src")}  # the same threads: the same floats
    command = [sys.executable, "-m", "multitalk_worker.worker", "--test_input", json.dumps({"input": job})]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = doors["seen"].get(CASES[0][0]) or {"handler": through_handler(doors["service"], job)}
    digest = expected["handler"]["output"]["sha256"]
    printed = re.findall(r"'sha256': '([0-9a-f]{64})'", done.stdout)  # the SDK's "Job result" line
    assert printed == [digest], (printed, digest)
