"""The RunPod worker under torchrun: two CPU processes (gloo) share each job, rank 0 serves the runpod SDK
(`--test_input`, its local mode), and the stop message ends the follower when rank 0 is done."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from multitalk_worker.media import probe_mp4, read_frames
from tests.conftest import REPO

# 4 steps with TeaCache on at the largest threshold the schema accepts (the sampler's path with residuals)
JOB = {
    "image": "inputs/person.png",
    "speakers": [{"audio": "inputs/speech_a.wav"}],
    "prompt": "a person talks",
    "resolution": "tiny",
    "max_duration_s": 0.4,
    "advanced": {"steps": 4, "seed": 3, "teacache_threshold": 1.0},
}
FRAMES = 10  # 0.4 s at 25 fps
# as tests/test_sequence_parallel_cli.py: lossless output (x264 at the default crf is not repeatable on a
# busy CPU); float32 kernel rounding on other shapes may flip a uint8 value; a wrong split gives a mean
# |diff| above 1.
MAX_MEAN_DIFFERENCE = 0.05
MAX_DIFFERENT_FRACTION = 5e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    job: dict[str, Any], volume: Path, work: Path, processes: int
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MULTITALK_WEIGHTS": "tiny",
        "MULTITALK_VOLUME_ROOT": str(volume),
        "MULTITALK_WORK_DIR": str(work),
        "MULTITALK_VIDEO_CRF": "0",
    }
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    command = [*launcher, "-m", "multitalk_worker.worker", "--test_input", json.dumps({"input": job})]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )


def test_two_processes_serve_the_single_process_video(volume: Path, tmp_path: Path) -> None:
    """Both runs as subprocesses with the same environment (thread settings change frame rounding)."""
    videos = {}
    for processes in (2, 1):
        path = f"out/{processes}.mp4"
        done = _worker({**JOB, "output": {"delivery": "volume", "path": path}}, volume, tmp_path, processes)
        assert done.returncode == 0, done.stdout + done.stderr
        if processes > 1:
            assert done.stderr.count("generating with 2 processes") == 1, done.stderr  # rank 0's pipeline
            assert done.stderr.count("stop message from rank 0") == 1, done.stderr  # the follower
        videos[processes] = volume / path
    assert probe_mp4(videos[2]).frames == probe_mp4(videos[1]).frames == FRAMES
    split, single = read_frames(videos[2]), read_frames(videos[1])
    assert split.shape == single.shape == (FRAMES, 64, 48, 3)
    difference = np.abs(split.astype(np.int16) - single.astype(np.int16))
    assert difference.mean() <= MAX_MEAN_DIFFERENCE, f"mean |diff| {difference.mean():.4f}"
    assert (difference > 0).mean() <= MAX_DIFFERENT_FRACTION, f"{(difference > 0).mean():.2%} differ"
    assert list(tmp_path.glob("multitalk-*")) == []  # rank 0's scratch folders are gone


def test_a_bad_job_fails_on_rank_0_and_the_follower_stops(volume: Path, tmp_path: Path) -> None:
    """An unknown field: rank 0 fails the job with INVALID_INPUT (runpod's local mode exits 1), the follower
    gets the stop message, and torchrun returns promptly."""
    started = time.monotonic()
    done = _worker({**JOB, "colour": "red"}, volume, tmp_path, 2)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert '"code": "INVALID_INPUT"' in output and "colour: unknown field" in output, output
    assert output.count("Traceback (most recent call last)") == 1, output  # torchrun's own report only
    assert "ChildFailedError" in output
    assert time.monotonic() - started < 60
