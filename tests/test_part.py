"""The part so far of a running local job (issue #22): /status says how many seconds are ready, and
/jobs/{id}/video answers with the finished clips as one mp4 with audio, whose frames are the final video's
first frames, then with the finished file. The publisher of the part so far (S3 delivery; its end-to-end test
is tests/test_worker.py's) uploads the newest part beside the clip loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests

from multitalk_worker.config import Settings
from multitalk_worker.errors import UploadFailed
from multitalk_worker.local_api.app import create_app
from multitalk_worker.media import probe_mp4, read_frames
from multitalk_worker.pipeline.request import VideoSpec
from multitalk_worker.progress import Snapshot
from multitalk_worker.segments import ClipSegments
from multitalk_worker.service import JobService
from multitalk_worker.service.part import PartPublisher
from tests.servers import serve_app

# the whole 4.1 s track: two tiny clips
JOB = {
    "image": "inputs/person.png",
    "speakers": [{"audio": "inputs/speech_a.wav"}],
    "prompt": "a person talks",
    "resolution": "tiny",
    "advanced": {"steps": 2, "seed": 5},
}


def test_the_part_so_far_of_a_running_job(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    with serve_app(create_app(JobService(make_settings()))) as api:
        job_id = requests.post(f"{api}/run", json={"input": JOB}, timeout=30).json()["id"]
        deadline = time.monotonic() + 600
        while True:
            status = requests.get(f"{api}/status/{job_id}", timeout=30).json()
            if status["status"] == "IN_PROGRESS" and status["clips_done"] >= 1:
                break
            assert status["status"] in ("IN_QUEUE", "IN_PROGRESS"), status
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        first_s = status["ready_s"]
        assert first_s > 0  # the first clip, encoded
        part = requests.get(f"{api}/jobs/{job_id}/video", timeout=60)
        assert part.status_code == 200 and part.headers["content-type"] == "video/mp4"
        (tmp_path / "part.mp4").write_bytes(part.content)
        while status["status"] == "IN_PROGRESS":
            time.sleep(0.1)
            status = requests.get(f"{api}/status/{job_id}", timeout=30).json()
        assert status["status"] == "COMPLETED", status
        assert status["clips_done"] >= 2 and status["ready_s"] > first_s
        final = requests.get(f"{api}/jobs/{job_id}/video", timeout=60)
        (tmp_path / "final.mp4").write_bytes(final.content)
    info, whole = probe_mp4(tmp_path / "part.mp4"), probe_mp4(tmp_path / "final.mp4")
    assert info.has_audio and abs(info.audio_duration_s - info.frames / info.fps) < 0.07
    assert round(first_s * info.fps) <= info.frames < whole.frames
    # the part's frames are the finished clips' frames: the final video's first ones, bit for bit
    part_frames, final_frames = read_frames(tmp_path / "part.mp4"), read_frames(tmp_path / "final.mp4")
    assert np.array_equal(part_frames, final_frames[: len(part_frames)])


def test_a_stopped_server_resumes_its_running_job_and_keeps_finished_ones(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The local API on a data folder is stopped (gracefully: the running job is not CANCELLED) after the
    running job's first clip; a new server on the same folder lists the finished job, serves its video, and
    runs the stopped one to the end from its checkpoint (no clip made twice)."""
    data = tmp_path / "data"
    settings = make_settings(
        MULTITALK_API_DATA_DIR=str(data), MULTITALK_CHECKPOINT_DIR=str(data / "checkpoints")
    )
    short = JOB | {"max_duration_s": 0.4}
    with serve_app(create_app(JobService(settings))) as api:
        done_id = requests.post(f"{api}/runsync", json={"input": short}, timeout=600).json()["id"]
        job_id = requests.post(f"{api}/run", json={"input": JOB}, timeout=30).json()["id"]
        deadline = time.monotonic() + 600
        while requests.get(f"{api}/status/{job_id}", timeout=30).json()["clips_done"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with serve_app(create_app(JobService(settings))) as api:
        finished = requests.get(f"{api}/status/{done_id}", timeout=30).json()
        assert finished["status"] == "COMPLETED"
        assert requests.get(f"{api}/jobs/{done_id}/video", timeout=30).status_code == 200
        deadline = time.monotonic() + 600
        while (status := requests.get(f"{api}/status/{job_id}", timeout=30).json())["status"] != "COMPLETED":
            assert status["status"] in ("IN_QUEUE", "IN_PROGRESS"), status
            assert time.monotonic() < deadline
            time.sleep(0.1)
    clips = status["output"]["clips"]
    assert clips["resumed"] >= 1 and clips["resume"].startswith("resumed after clip")
    assert clips["resumed"] + clips["generated"] == status["clips_done"]


class RecordingBucket:
    """Test double of S3 behind a `PartDelivery`: keeps each uploaded part's frame count; the first upload
    is refused."""

    def __init__(self) -> None:
        self.calls = 0
        self.frames: list[int] = []

    def deliver_part(self, video: Path) -> dict[str, object]:
        self.calls += 1
        if self.calls == 1:
            raise UploadFailed("the bucket refused it", retryable=True)
        self.frames.append(probe_mp4(video).frames)
        return {"url": f"http://bucket.invalid/part?upload={self.calls}"}

    def remove_part(self) -> None:
        raise AssertionError("the job service removes the part, not the publisher")


def test_the_publisher_uploads_the_newest_part_and_skips_a_refused_one(tmp_path: Path) -> None:
    sink = ClipSegments(tmp_path / "segments")
    fps, rate = 25, 16_000
    sink.open(VideoSpec(16, 16, 6, fps, np.zeros(6 * rate // fps, np.float32), rate))
    for value in (40, 120, 200):  # three clips of two frames
        sink.write(np.full((2, 16, 16, 3), value, np.uint8))
    bucket = RecordingBucket()
    publisher = PartPublisher(bucket, lambda: sink.folder, tmp_path)
    empty = Snapshot("sample", 2, 3, 1, 2, None, None, None, False, clips_done=1)
    try:
        publisher.offer(1)
        _wait(lambda: bucket.calls == 1)
        assert publisher.annotate(empty) == empty  # refused: logged, no URL
        publisher.offer(3)
        publisher.offer(2)  # an older count than the newest offered: nothing to do
        _wait(lambda: publisher.annotate(empty).part_url is not None)
        shown = publisher.annotate(empty)
        assert (shown.part_url, shown.part_clips) == ("http://bucket.invalid/part?upload=2", 3)
    finally:
        publisher.close()
    assert bucket.frames == [6] and publisher.published == 1 and publisher.seconds > 0
    assert not (tmp_path / "part.mp4").exists()  # the part's file is removed once uploaded


def _wait(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
