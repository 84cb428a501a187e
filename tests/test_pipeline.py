"""The clip/streaming plan and the whole pipeline on the tiny model (spec 6.6, 7)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from multitalk_worker.errors import Cancelled, DurationTooLong, InvalidInput
from multitalk_worker.models.configs import TINY
from multitalk_worker.pipeline.conditioning import known_frames_mask
from multitalk_worker.pipeline.pipeline import TalkingVideoPipeline, to_uint8
from multitalk_worker.pipeline.plan import ClipPlan, plan_clips
from multitalk_worker.pipeline.request import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Speaker,
)
from multitalk_worker.progress import Progress
from multitalk_worker.timeline import resolve_max_frames
from multitalk_worker.tiny import build_tiny_bundle

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SPEECH_A_FRAMES = 102  # int(65529 / 640): examples/speech_a.wav at 16 kHz


@pytest.mark.parametrize(
    ("audio_frames", "starts", "frames"),
    [
        (122, (0, 56), 119),  # the spec's example: 137 generated, 119 kept
        (82, (0,), 79),  # the reference's clip 1 would be cut away entirely: not made
        (84, (0,), 81),
        (85, (0, 56), 82),
        (137, (0, 56), 134),
        (138, (0, 56), 135),  # the reference makes a third clip and cuts all of it
        (140, (0, 56), 137),
        (141, (0, 56, 112), 138),
        (1000, tuple(range(0, 897, 56)), 964),  # spec: La = 1000 -> 964 frames
        (1003, tuple(range(0, 897, 56)), 967),  # cut to 1000, then the last clip's padding (33)
        (1040, tuple(range(0, 953, 56)), 1000),  # audio beyond the last clip: exactly 1000 frames
    ],
)
def test_plan_follows_the_reference_loop(audio_frames: int, starts: tuple[int, ...], frames: int) -> None:
    plan = plan_clips(audio_frames, 1000, 25, "drop_padding")
    assert plan.starts == starts and plan.output_frames == frames and plan.streaming
    assert plan.padded_clip is not None and plan.padded_clip >= len(starts) - 1


def test_plan_clip_count_and_frames_match_the_spec_formulas() -> None:
    for audio_frames in range(82, 1000, 7):
        plan = plan_clips(audio_frames, 1000, 25, "drop_padding")
        k = max(1, math.ceil((min(1000, audio_frames) - 81) / 56))
        assert plan.padded_clip == k  # the reference makes k + 1 clips and pads the last one
        assert plan.starts == tuple(56 * i for i in range(len(plan.starts))) and len(plan.starts) in (
            k,
            k + 1,
        )
        kept = 81 + 56 * (len(plan.starts) - 1)
        assert kept - 56 < plan.output_frames <= kept  # every clip made keeps at least one frame
        if 56 * k + 81 <= 1000:
            assert plan.output_frames == audio_frames - 3


def test_plan_clip_mode_when_capped_to_one_clip() -> None:
    assert plan_clips(500, 81, 25, "drop_padding") == plan_clips(500, 81, 25, "drop_padding")
    plan = plan_clips(500, 50, 25, "drop_padding")
    assert (
        plan.starts == (0,) and plan.output_frames == 50 and not plan.streaming and plan.padded_clip is None
    )
    assert plan_clips(500, 81, 25, "drop_padding").output_frames == 81


def test_max_duration_rules() -> None:
    assert resolve_max_frames(None, 20.0, 1000) == 1000
    assert resolve_max_frames(2.0, 20.0, 1000) == 50
    assert resolve_max_frames(None, 40.0, 1000) == 1000
    with pytest.raises(DurationTooLong, match="at most 40 s"):
        resolve_max_frames(None, 44.0, 1000)
    with pytest.raises(DurationTooLong, match="exceeds the limit of 40 s"):
        resolve_max_frames(41.0, 20.0, 1000)
    with pytest.raises(InvalidInput, match="shorter than one frame"):
        resolve_max_frames(0.01, 20.0, 1000)


def test_known_frames_mask() -> None:
    first = known_frames_mask(1, (2, 3))
    assert first.shape == (1, 4, 21, 2, 3)
    assert first[:, :, 0].eq(1).all() and first[:, :, 1:].eq(0).all()
    later = known_frames_mask(25, (2, 3))
    assert later[:, :, :7].eq(1).all() and later[:, :, 7:].eq(0).all()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_uint8_cast_truncates_as_the_reference_numpy_code(device: str) -> None:
    video = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0]).view(1, 5, 1, 1).expand(3, 5, 1, 1)
    assert to_uint8(video.to(device))[:, 0, 0, 0].tolist() == [0, 0, 127, 254, 255]
    video = torch.randn(3, 4, 16, 8, generator=torch.Generator().manual_seed(0)) * 0.7  # some beyond [-1, 1]
    unit = ((video + 1) / 2).permute(1, 2, 3, 0).numpy()  # the reference's float32 numpy steps
    assert np.array_equal(to_uint8(video.to(device)), np.clip(unit * 255, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pipeline() -> TalkingVideoPipeline:
    return TalkingVideoPipeline.from_pretrained("tiny", device="cpu")


def _request(**changes: object) -> GenerationRequest:
    base = GenerationRequest(
        image=EXAMPLES / "person.png",
        speakers=(Speaker(EXAMPLES / "speech_a.wav"),),
        prompt="a person talking to the camera",
        resolution="tiny",
        sampling=SamplingParams(steps=2, seed=7),
    )
    return replace(base, **changes)


def capped_request() -> GenerationRequest:
    """Clip mode: one clip cut to 25 frames, 3 guidance passes, 2 steps, seed 7 (conftest's `capped_clip`)."""
    return _request(max_duration_s=1.0)


def test_one_person_video(pipeline: TalkingVideoPipeline) -> None:
    events: list[Progress] = []
    result = pipeline(_request(), progress=events.append)
    assert result.frames.shape == (SPEECH_A_FRAMES - 3, 64, 48, 3) and result.frames.dtype == np.uint8
    assert result.audio.shape == (result.frames.shape[0] * 640,) and result.sample_rate == 16000
    assert result.fps == 25 and result.seed == 7
    assert result.frames.std(axis=0).mean() > 1.0  # frames differ over time
    assert result.resolved["clips"] == 2 and result.resolved["mode"] == "streaming"
    assert result.resolved["shift"] == 7.0 and result.resolved["passes_per_step"] == 3
    assert {"audio", "text", "condition", "sample", "decode", "color", "frames"} <= set(result.timings)
    samples = [(e.chunk, e.step) for e in events if e.stage == "sample"]
    assert samples == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(e.chunks == 2 for e in events if e.stage == "sample")


def test_same_seed_same_video_other_seed_differs(
    pipeline: TalkingVideoPipeline, capped_clip: GenerationResult
) -> None:
    """`capped_clip` came from another pipeline of the same tiny model."""
    capped = capped_request()
    a, b = capped_clip, pipeline(capped)
    assert a.frames.shape[0] == 25 and a.resolved["mode"] == "clip"
    assert np.array_equal(a.frames, b.frames)
    other = pipeline(replace(capped, sampling=SamplingParams(steps=2, seed=8)))
    assert not np.array_equal(a.frames, other.frames)


def test_two_people_with_regions(pipeline: TalkingVideoPipeline) -> None:
    request = _request(
        image=EXAMPLES / "two_people.png",
        speakers=(
            Speaker(EXAMPLES / "speech_a.wav", (0.0, 0.0, 0.5, 1.0)),
            Speaker(EXAMPLES / "speech_b.wav", "right"),
        ),
        audio_mode="parallel",
        max_duration_s=1.0,
        sampling=SamplingParams(steps=1, text_guidance=1.0, audio_guidance=2.0),
    )
    result = pipeline(request)
    assert result.frames.shape == (25, 32, 64, 3)
    assert result.resolved["persons"] == 2 and result.resolved["passes_per_step"] == 2
    assert result.resolved["audio_padded_s"] == pytest.approx(4.0955625 - 3.4809375)


def test_cancel_raises_between_steps(pipeline: TalkingVideoPipeline) -> None:
    seen: list[Progress] = []
    with pytest.raises(Cancelled):
        pipeline(_request(), progress=seen.append, cancel=lambda: any(e.stage == "sample" for e in seen))
    assert sum(e.stage == "sample" for e in seen) == 1


def test_request_checks() -> None:
    real_like = TalkingVideoPipeline(
        build_tiny_bundle(config=replace(TINY, name="tiny-as-14b"), dtype=torch.float32)
    )
    with pytest.raises(InvalidInput, match="only for the built-in tiny model"):
        real_like(_request())
    tiny = TalkingVideoPipeline.from_pretrained("tiny", device="cpu")
    with pytest.raises(InvalidInput, match="steps=0"):
        tiny(_request(sampling=SamplingParams(steps=0)))
    with pytest.raises(DurationTooLong):
        tiny(_request(max_duration_s=60.0))


def test_skipping_a_fully_cut_last_clip_keeps_the_output(
    pipeline: TalkingVideoPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audio of 83 frames: the reference makes 2 clips and keeps 80 frames, all from clip 0."""
    import wave

    from multitalk_worker.pipeline import inputs as inputs_module

    path = tmp_path / "83.wav"
    tone = (8000 * np.sin(np.arange(83 * 640 + 100) / 6) * np.hanning(83 * 640 + 100)).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000), out.writeframes(tone.tobytes())
    request = _request(speakers=(Speaker(path),), sampling=SamplingParams(steps=1, seed=3))
    ours = pipeline(request)
    assert ours.frames.shape[0] == 80 and ours.resolved["clips"] == 1
    full = ClipPlan(starts=(0, 56), max_frames=1000, output_frames=80, padded_clip=1, motion_frames=25)
    monkeypatch.setattr(inputs_module, "plan_clips", lambda *args: full)
    reference_loop = pipeline(request)
    assert reference_loop.resolved["clips"] == 2
    assert np.array_equal(ours.frames, reference_loop.frames)
