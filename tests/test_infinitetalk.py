"""InfiniteTalk's clip loop on the tiny model (spec IT 5): plan, conditioning, clean motion latents, RNG
draws, output length, and the conditioner's reference frames."""

from __future__ import annotations

import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline import conditioning
from multitalk_worker.pipeline import pipeline as pipeline_module
from multitalk_worker.pipeline.inputs import prepare_inputs
from multitalk_worker.pipeline.plan import plan_clips
from multitalk_worker.pipeline.request import GenerationRequest, SamplingParams, Speaker
from multitalk_worker.pipeline.sampling import ClipConditions, GuidanceSettings, PassInputs, sample_clip
from multitalk_worker.tiny import build_tiny_bundle

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("audio_frames", "clips", "frames"),
    [
        (100, 2, 100),  # spec IT 5.5: 2 clips, 153 generated, 100 kept
        (250, 4, 250),
        (267, 4, 267),  # the reference's example 1
        (1000, 14, 1000),
        (1500, 14, 1000),  # capped at 1000 frames (the reference's --max_frame_num)
        (82, 2, 82),
        (153, 2, 153),
        (154, 3, 154),
    ],
)
def test_plan_keeps_the_audio_length(audio_frames: int, clips: int, frames: int) -> None:
    plan = plan_clips(audio_frames, 1000, 9, "audio")
    assert plan.output_frames == frames and len(plan.starts) == clips
    assert plan.starts == tuple(72 * k for k in range(clips))
    kept = [plan.kept(i) for i in range(clips)]
    assert kept[0][0] == 0 and all(first == 9 for first, _ in kept[1:])
    assert sum(last - first for first, last in kept) == frames


def test_clip_mode_is_one_clip_cut_to_the_cap() -> None:
    plan = plan_clips(500, 50, 9, "audio")
    assert plan.starts == (0,) and plan.output_frames == 50 and not plan.streaming


def _tiny_conditions(clean: torch.Tensor | None, motion: torch.Tensor | None) -> ClipConditions:
    audio = torch.zeros(1, 1, 81, 5, 2, 16)
    context = torch.zeros(1, 16, 32)
    return ClipConditions(
        passes={"cond": PassInputs(context, audio), "drop_audio": PassInputs(context, audio)},
        clip_fea=torch.zeros(1, 257, 32),
        y=torch.zeros(1, 20, 21, 4, 6),
        person_masks=torch.ones(3, 4, 6),
        motion_latent=motion,
        clean_latent=clean,
    )


def test_sampling_keeps_the_clean_latent_and_draws_as_the_reference() -> None:
    """The model sees the clean latent at every step, the final latent holds it exactly, and a later
    clip draws steps + 1 discarded motion noises (spec IT 5.3, 5.6)."""
    dit = build_tiny_bundle(dtype=torch.float32).dit
    settings = GuidanceSettings(steps=3, shift=2.0, text_scale=1.0, audio_scale=2.0)
    clean = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    original_embed = dit.embed

    def recording_embed(latent: torch.Tensor, *args: object) -> object:
        seen.append(latent[:, :, :3].clone())
        return original_embed(latent, *args)

    dit.embed = recording_embed  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 16, 21, 4, 6, generator=generator)
    out = sample_clip(dit, noise, _tiny_conditions(clean, clean), settings, generator)
    assert len(seen) == 6 and all(torch.equal(s, clean) for s in seen)
    assert torch.equal(out[:, :, :3], clean)
    replay = torch.Generator().manual_seed(5)
    torch.randn(1, 16, 21, 4, 6, generator=replay)
    for _ in range(settings.steps + 1):
        torch.randn(16, 3, 4, 6, generator=replay)
    assert torch.equal(torch.randn(4, generator=replay), torch.randn(4, generator=generator))
    first_clip = torch.Generator().manual_seed(5)
    torch.randn(1, 16, 21, 4, 6, generator=first_clip)
    sample_clip(dit, noise, _tiny_conditions(clean[:, :, :1], None), settings, first_clip)
    replay = torch.Generator().manual_seed(5)
    torch.randn(1, 16, 21, 4, 6, generator=replay)  # clip 0 draws nothing more
    assert torch.equal(torch.randn(4, generator=replay), torch.randn(4, generator=first_clip))


@pytest.fixture(scope="module")
def pipeline() -> pipeline_module.TalkingVideoPipeline:
    bundle = build_tiny_bundle(dtype=torch.float32, model="infinitetalk", adapter="single")
    return pipeline_module.TalkingVideoPipeline(bundle)


def _long_speech(path: Path, repeats: int) -> Path:
    with wave.open(str(EXAMPLES / "speech_a.wav")) as src:
        params, data = src.getparams(), src.readframes(src.getnframes())
    with wave.open(str(path), "wb") as out:
        out.setparams(params)
        out.writeframes(data * repeats)
    return path


def _request(audio: Path, **changes: object) -> GenerationRequest:
    base = GenerationRequest(
        model="infinitetalk",
        image=EXAMPLES / "person.png",
        speakers=(Speaker(audio),),
        prompt="a person talking to the camera",
        resolution="tiny",
        sampling=SamplingParams(steps=1, text_guidance=1.0, audio_guidance=2.0, seed=3),
    )
    return replace(base, **changes)


def test_an_image_source_is_not_held_after_its_first_frame() -> None:
    """Every clip's reference is frame 0 as prepared: prepare_inputs drops the full-size picture."""
    inputs = prepare_inputs(_request(EXAMPLES / "speech_a.wav"), tiny_model=True)
    try:
        assert inputs.source.still
        with pytest.raises(RuntimeError, match="closed"):
            inputs.source.frame(72)
    finally:
        inputs.close()


def test_image_to_video_longer_than_two_clips(
    pipeline: pipeline_module.TalkingVideoPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every clip conditions on the image; clips after the first continue from the clean latent of the
    previous clip's last 9 colour-corrected frames; the video is exactly as long as the audio."""
    audio = _long_speech(tmp_path / "long.wav", 2)  # 204 frames -> 3 clips
    encoded: list[torch.Tensor] = []
    latents: list[torch.Tensor] = []
    decoded: list[torch.Tensor] = []
    corrected: list[torch.Tensor] = []

    def encode(vae: object, video: torch.Tensor) -> torch.Tensor:
        encoded.append(video.clone())
        latents.append(original_encode(vae, video))
        return latents[-1]

    def decode(vae: object, latent: torch.Tensor) -> torch.Tensor:
        decoded.append(latent.clone())
        return original_decode(vae, latent)

    def correct(video: torch.Tensor, *args: object) -> torch.Tensor:
        out = original_correct(video, *args)
        corrected.append(out.clone())
        return out

    original_encode, original_decode = conditioning.vae_encode, pipeline_module.vae_decode
    original_correct = pipeline_module.match_colors
    monkeypatch.setattr(conditioning, "vae_encode", encode)
    monkeypatch.setattr(pipeline_module, "vae_decode", decode)
    monkeypatch.setattr(pipeline_module, "match_colors", correct)
    result = pipeline(_request(audio))
    assert result.frames is not None and result.frames.shape == (204, 64, 48, 3)
    assert result.frame_count == 204 and result.audio.shape == (204 * 640,)
    assert result.resolved["clips"] == 3 and result.resolved["model"] == "infinitetalk"
    assert result.frames.std(axis=0).mean() > 1.0
    # encodes: clip 0 = y (1 known frame + 80 zeros), the reference frame alone; later clips: the cached
    # y of the same image, and the last 9 corrected frames of the clip before
    assert [e.shape[2] for e in encoded] == [81, 1, 9, 9]
    assert torch.equal(encoded[1], encoded[0][:, :, :1])
    for k in (1, 2):
        assert torch.equal(encoded[k + 1][0], corrected[k - 1][:, -9:])
        assert torch.equal(decoded[k][:, :, :3], latents[k + 1])  # final latent: clean motion frames
    assert torch.equal(decoded[0][:, :, :1], latents[1])


def test_same_seed_same_video(pipeline: pipeline_module.TalkingVideoPipeline, tmp_path: Path) -> None:
    request = _request(EXAMPLES / "speech_a.wav", max_duration_s=2.0)
    a, b = pipeline(request), pipeline(request)
    assert a.frames is not None and a.frames.shape[0] == 50
    assert np.array_equal(a.frames, b.frames)


def test_the_model_must_match_the_loaded_one(pipeline: pipeline_module.TalkingVideoPipeline) -> None:
    with pytest.raises(InvalidInput, match="serves model infinitetalk"):
        pipeline(replace(_request(EXAMPLES / "speech_a.wav"), model="multitalk"))
    with pytest.raises(InvalidInput, match="exactly one of image and video"):
        pipeline(_request(EXAMPLES / "speech_a.wav", image=None))


def test_video_to_video_reference_frames_and_colour_reference(
    pipeline: pipeline_module.TalkingVideoPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clip k takes source frame 72k (held at the last frame past the end) as its reference; every clip is
    colour-corrected towards frame 0, not towards its own reference (spec IT 5.4, 9.4, 9.8)."""
    from tests.media_files import read_number, write_video

    source = write_video(tmp_path / "source.mp4", 100, 25)
    audio = _long_speech(tmp_path / "long.wav", 2)  # 204 frames -> clips at 0, 72, 144
    asked: list[int] = []
    references: list[torch.Tensor] = []
    original_prepare = conditioning.image_prep.prepare_image

    def prepare(image: object, resolution: str) -> object:
        asked.append(read_number(image))  # type: ignore[arg-type]
        return original_prepare(image, resolution)  # type: ignore[arg-type]

    original_correct = pipeline_module.match_colors

    def correct(video: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
        references.append(reference.clone())
        return original_correct(video, reference, strength)

    monkeypatch.setattr(conditioning.image_prep, "prepare_image", prepare)
    monkeypatch.setattr(pipeline_module, "match_colors", correct)
    request = _request(audio, image=None, video=source, source_fps="reference")
    result = pipeline(request)
    # frame 0 for the bucket and masks, then clips 0, 1, 2 (frame 144 is past the end: the last, held)
    assert asked == [0, 0, 72, 99]
    assert result.frames is not None and result.frames.shape[0] == 204
    assert result.resolved["source"] == {
        "kind": "video", "fps": 25.0, "frames": 100, "duration_s": 4.0, "counted_by": "demux",
        "fps_mode": "reference", "last_frame_held": True, "last_frame_held_from": 144, "frames_held": 60,
        "frames_past_end": 104,
    }  # fmt: skip
    first = original_prepare(read_frame_zero(source), "tiny").pixels[0, :, 0]
    assert len(references) == 3 and all(torch.equal(r, first) for r in references)


def read_frame_zero(path: Path) -> object:
    from multitalk_worker.pipeline.video import open_source

    source = open_source(path, kind="video")
    try:
        return source.frame(0).copy()
    finally:
        source.close()
