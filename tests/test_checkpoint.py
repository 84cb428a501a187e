"""pipeline/checkpoint.py: a job stopped after a clip and run again continues from the next clip, and
its video has the same bytes as a run that never stopped (MultiTalk two speakers, InfiniteTalk dubbing a
30 fps video, InfiniteTalk from an image); a changed job starts afresh and says why; old checkpoints
expire."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from multitalk_worker.errors import Cancelled
from multitalk_worker.pipeline.checkpoint import ClipCheckpoint, expire_checkpoints
from multitalk_worker.pipeline.pipeline import TalkingVideoPipeline
from multitalk_worker.pipeline.request import GenerationRequest, SamplingParams, Speaker
from tests.media_files import write_video

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def request(case: str, tmp_path: Path) -> GenerationRequest:
    sampling = SamplingParams(steps=2, seed=-1)  # a drawn seed must survive the resume
    one = (Speaker(EXAMPLES / "speech_a.wav"),)
    if case == "multitalk-two":
        speakers = (
            Speaker(EXAMPLES / "speech_a.wav", (0, 0, 0.5, 1)),
            Speaker(EXAMPLES / "speech_b.wav", (0.5, 0, 1, 1)),
        )
        return GenerationRequest(
            model="multitalk",
            image=EXAMPLES / "two_people.png",
            speakers=speakers,
            prompt="two",
            resolution="tiny",
            sampling=sampling,
        )
    if case == "infinitetalk-video":
        video = write_video(tmp_path / "thirty.mp4", 120, rate=30)
        return GenerationRequest(
            model="infinitetalk",
            video=video,
            speakers=one,
            prompt="dub",
            resolution="tiny",
            sampling=sampling,
        )
    return GenerationRequest(
        model="infinitetalk",
        image=EXAMPLES / "person.png",
        speakers=one,
        prompt="talk",
        resolution="tiny",
        sampling=sampling,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", ["multitalk-two", "infinitetalk-video", "infinitetalk-image"])
def test_a_resumed_job_makes_the_same_video(case: str, tmp_path: Path) -> None:
    job = request(case, tmp_path)
    pipeline = TalkingVideoPipeline.from_pretrained("tiny", device="cpu", model=job.model)

    stopped = ClipCheckpoint(tmp_path / "job", "digest-1")
    with pytest.raises(Cancelled):  # stopped once the first clip is on disk
        pipeline(job, checkpoint=stopped, cancel=lambda: len(stopped.sink.paths()) >= 1)
    again = ClipCheckpoint(tmp_path / "job", "digest-1")
    resumed = pipeline(job, checkpoint=again)
    again.sink.assemble(tmp_path / "resumed.mp4")
    assert (resumed.clips_resumed, resumed.resume_reason) == (1, "resumed after clip 1")
    assert resumed.clips_generated == resumed.resolved["clips"] - 1 >= 1

    whole = ClipCheckpoint(tmp_path / "whole", "digest-1")
    fixed = GenerationRequest(**{**job.__dict__, "sampling": SamplingParams(steps=2, seed=resumed.seed)})
    uninterrupted = pipeline(fixed, checkpoint=whole)
    whole.sink.assemble(tmp_path / "whole.mp4")
    assert uninterrupted.clips_resumed == 0 and uninterrupted.resume_reason == "no checkpoint"
    assert sha(tmp_path / "resumed.mp4") == sha(tmp_path / "whole.mp4")


def test_a_changed_job_starts_afresh(tmp_path: Path) -> None:
    job = request("infinitetalk-image", tmp_path)
    pipeline = TalkingVideoPipeline.from_pretrained("tiny", device="cpu", model=job.model)
    first = ClipCheckpoint(tmp_path / "job", "digest-1")
    with pytest.raises(Cancelled):
        pipeline(job, checkpoint=first, cancel=lambda: len(first.sink.paths()) >= 1)
    changed = ClipCheckpoint(tmp_path / "job", "digest-2")
    result = pipeline(job, checkpoint=changed)
    assert result.clips_resumed == 0 and "changed" in (result.resume_reason or "")
    assert result.clips_generated == result.resolved["clips"] == len(changed.sink.paths())


def test_an_incomplete_checkpoint_is_not_trusted(tmp_path: Path) -> None:
    checkpoint = ClipCheckpoint(tmp_path / "job", "d")
    (checkpoint.folder / "meta.json").write_text('{"version": 1, "digest": "d", "clips_done": 2}')
    (checkpoint.folder / "state.pt").write_bytes(b"truncated")
    opened = checkpoint.open()
    assert opened.state is None and "incomplete" in opened.reason
    assert not any(checkpoint.folder.glob("*.pt"))


def test_old_checkpoints_expire(tmp_path: Path) -> None:
    old, new = ClipCheckpoint(tmp_path / "old", "d"), ClipCheckpoint(tmp_path / "new", "d")
    for checkpoint in (old, new):
        (checkpoint.folder / "meta.json").write_text("{}")
    hour_ago = time.time() - 3600
    os.utime(old.folder / "meta.json", (hour_ago, hour_ago))
    assert expire_checkpoints(tmp_path, ttl_s=600) == [old.folder]
    assert new.folder.exists() and not old.folder.exists()
