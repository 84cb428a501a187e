"""Audio loading, normalisation, two-person layouts and per-clip windows (spec 2, 6.6 step 10)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyloudnorm
import pytest
import soxr
import torch

from multitalk_worker import timeline
from multitalk_worker.errors import AudioDecodeFailed, DurationTooLong, InvalidInput
from multitalk_worker.media import write_mp4
from multitalk_worker.pipeline import audio
from multitalk_worker.pipeline.inputs import AUDIO_CONTEXT_S, audio_budget
from multitalk_worker.pipeline.plan import plan_clips
from multitalk_worker.registry import INFINITETALK, MULTITALK
from multitalk_worker.timeline import resolve_max_frames
from tests import hostile

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_audio(path: Path, samples: np.ndarray, rate: int, codec: str = "pcm_s16le") -> Path:
    """Encode float [channels, n] samples with PyAV (wav for PCM codecs, mp3 with libmp3lame)."""
    channels = samples.shape[0]
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        fmt = "fltp" if codec == "libmp3lame" else ("flt" if codec == "pcm_f32le" else "s16")
        data = samples.astype(np.float32)
        if fmt == "s16":
            data = np.clip(np.round(data * 32767), -32768, 32767).astype(np.int16)
        if fmt in ("s16", "flt"):
            data = data.T.reshape(1, -1)  # packed
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def voiced(seconds: float, rate: int, freq: float = 180.0, seed: int = 0) -> np.ndarray:
    """A speech-like test signal: harmonics with a slow envelope plus a little noise, float32 [n]."""
    t = np.arange(int(seconds * rate)) / rate
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    tone = sum(np.sin(2 * np.pi * freq * k * t) / k for k in range(1, 6))
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.2 * env * tone + noise).astype(np.float32)


def test_frame_count_and_minimum_match_reference_arithmetic() -> None:
    assert timeline.audio_frames(16000 * 4) == 100
    assert timeline.audio_frames(52479) == 81 and timeline.audio_frames(52480) == 82
    assert timeline.min_audio_s() == pytest.approx(3.28)


def test_example_speech_is_normalised_to_minus_23_lufs() -> None:
    prepared = audio.prepare_audio([EXAMPLES / "speech_a.wav"], "parallel", 81)
    track = prepared.tracks[0]
    assert track.dtype == np.float32
    assert pyloudnorm.Meter(16000).integrated_loudness(track) == pytest.approx(-23.0, abs=0.01)
    assert prepared.frames > 81
    np.testing.assert_array_equal(prepared.soundtrack, np.clip(track, -1, 1))
    assert prepared.soundtrack is track  # nothing to clip: one array, not two


def test_a_loud_track_is_clipped_in_the_soundtrack_only() -> None:
    loud = np.array([0.5, 1.5, -2.0, 0.25], np.float32)
    prepared = audio.combine_tracks([loud], "parallel")
    assert prepared.tracks[0].tolist() == [0.5, 1.5, -2.0, 0.25]
    assert prepared.soundtrack.tolist() == [0.5, 1.0, -1.0, 0.25]


def test_stereo_44k_is_channel_mean_then_soxr_hq(tmp_path: Path) -> None:
    left, right = voiced(3.5, 44100, 150), voiced(3.5, 44100, 230, seed=1)
    path = write_audio(tmp_path / "stereo.wav", np.stack([left, right]), 44100)
    samples, rate = audio.decode_audio(path)
    assert rate == 44100 and samples.shape == (2, left.shape[0])
    mono = audio.decode_track(path).samples  # each decoded frame's mean, resampled as a stream
    assert mono.shape[0] == math.ceil(left.shape[0] * 16000 / 44100)  # librosa's length
    expected = one_call_16k(samples.mean(axis=0, dtype=np.float32), 44100)
    np.testing.assert_array_equal(mono, expected)
    # int16 decoding is x / 32768, as libsndfile/librosa read it
    np.testing.assert_allclose(samples[0], np.round(left * 32767) / 32768, atol=1e-7)


def test_mp3_and_video_soundtrack_decode(tmp_path: Path) -> None:
    signal = voiced(3.6, 44100)
    mp3 = write_audio(tmp_path / "speech.mp3", np.stack([signal, signal]), 44100, codec="libmp3lame")
    track = audio.read_track(mp3)
    assert abs(track.shape[0] / 16000 - 3.6) < 0.1
    video = tmp_path / "clip.mp4"
    frames = np.zeros((90, 16, 16, 3), np.uint8)
    write_mp4(video, frames, voiced(3.6, 16000), 16000)
    track = audio.read_track(video)  # video path: FFmpeg resampler to 16 kHz stereo s16, then mean
    assert abs(track.shape[0] / 16000 - 3.6) < 0.1
    assert np.abs(track).max() > 0.05


@pytest.mark.parametrize(("rate", "chunk"), [(44100, 1152), (48000, 4097), (22050, 1), (8000, 700)])
def test_the_streamed_resampler_gives_the_one_call_samples(rate: int, chunk: int) -> None:
    """soxr as a stream over decoder-sized chunks is soxr over the whole track, bit for bit."""
    mono = voiced(3.3, rate, seed=rate)
    track = audio._Track16k(rate, expected_s=1.0)  # too small on purpose: the buffer grows
    for start in range(0, mono.shape[0], chunk if chunk > 1 else 997):
        track.add(mono[start : start + (chunk if chunk > 1 else 997)])
    np.testing.assert_array_equal(track.finish(), one_call_16k(mono, rate))


def one_call_16k(mono: np.ndarray, rate: int) -> np.ndarray:
    """librosa.load's resampling: one soxr HQ call, the output padded with zeros or cut to
    ceil(n * 16000 / rate)."""
    out = soxr.resample(mono, rate, 16000, quality="HQ")
    size = math.ceil(mono.shape[0] * 16000 / rate)
    return np.pad(out, (0, max(0, size - out.shape[0])))[:size]


def test_normalisation_is_in_place_and_reaches_minus_23_lufs() -> None:
    signal = voiced(70.0, 16000)  # longer than one chunk of the streamed meter
    out = audio.loudness_normalise(signal)
    assert out is signal
    assert pyloudnorm.Meter(16000).integrated_loudness(out) == pytest.approx(-23.0, abs=1e-3)


def test_silence_is_left_unchanged() -> None:
    silence = np.zeros(16000, np.float32)
    out = audio.loudness_normalise(silence)
    assert np.array_equal(out, silence) and np.isfinite(out).all()


def test_sequential_layout_and_soundtrack(tmp_path: Path) -> None:
    a = write_audio(tmp_path / "a.wav", voiced(2.0, 16000)[None], 16000)
    b = write_audio(tmp_path / "b.wav", voiced(1.5, 16000, 250)[None], 16000)
    prepared = audio.prepare_audio([a, b], "sequential", 81)
    first, second = prepared.tracks
    assert first.shape == second.shape == (56000,)
    assert not first[32000:].any() and not second[:32000].any()
    assert first[:32000].any() and second[32000:].any()
    np.testing.assert_allclose(prepared.soundtrack, np.clip(first + second, -1, 1), atol=1e-7)


def test_parallel_pads_the_shorter_track_with_silence(tmp_path: Path) -> None:
    a = write_audio(tmp_path / "a.wav", voiced(4.0, 16000)[None], 16000)
    b = write_audio(tmp_path / "b.wav", voiced(3.5, 16000, 250)[None], 16000)
    prepared = audio.prepare_audio([a, b], "parallel", 81)
    assert prepared.tracks[0].shape == prepared.tracks[1].shape == (64000,)
    assert not prepared.tracks[1][56000:].any()
    assert prepared.padded_s == pytest.approx(0.5)


def test_bad_inputs_raise_typed_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(AudioDecodeFailed, match="garbage.wav"):
        audio.prepare_audio([garbage], "parallel", 81)
    short = write_audio(tmp_path / "short.wav", voiced(0.3, 16000)[None], 16000)
    with pytest.raises(InvalidInput, match=r"0\.30 s long; at least 3\.28 s"):
        audio.prepare_audio([short], "parallel", 81)
    ok = EXAMPLES / "speech_a.wav"
    with pytest.raises(InvalidInput, match="3 speakers given; one or two"):
        audio.prepare_audio([ok, ok, ok], "parallel", 81)
    with pytest.raises(InvalidInput, match="each track needs at least 0.4 s"):
        audio.prepare_audio([ok, short], "sequential", 81)
    nan = voiced(3.5, 16000)
    nan[1000] = np.nan
    nan_path = write_audio(tmp_path / "nan.wav", nan[None], 16000, codec="pcm_f32le")
    with pytest.raises(InvalidInput, match="NaN"):
        audio.prepare_audio([nan_path], "parallel", 81)
    with pytest.raises(InvalidInput, match="NaN"):
        audio.check_embedding(torch.tensor([[0.0, float("nan")]]), 1)


def test_clip_windows_clamp_on_the_full_track() -> None:
    emb = torch.arange(100, dtype=torch.float32)[:, None, None].expand(100, 2, 3)  # value = frame index
    windows = audio.clip_windows([emb, emb + 1000], start=0, frames=81)
    assert windows.shape == (2, 81, 5, 2, 3)
    assert windows[0, 0, :, 0, 0].tolist() == [0, 0, 0, 1, 2]
    assert windows[1, 40, :, 0, 0].tolist() == [1038, 1039, 1040, 1041, 1042]
    later = audio.clip_windows([emb], start=56, frames=81)
    assert later[0, 0, :, 0, 0].tolist() == [54, 55, 56, 57, 58]  # real neighbours across the boundary
    assert later[0, -1, :, 0, 0].tolist() == [99, 99, 99, 99, 99]


def test_reflect_pad_before_the_last_clip() -> None:
    emb = torch.arange(122, dtype=torch.float32)[:, None, None]
    (padded,), misses = audio.reflect_pad([emb], clip_end=137)
    assert misses == [18]
    assert padded.shape[0] == 140
    assert padded[122:, 0, 0].tolist() == list(range(121, 103, -1))
    (same,), misses = audio.reflect_pad([emb], clip_end=100)
    assert misses == [0] and same is emb


def test_a_budget_cuts_a_capped_track_and_refuses_a_long_uncapped_one(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "ten.wav", voiced(10.0, 22050)[None], 22050)
    track = audio.decode_track(path, audio.AudioBudget(4.36, cut=True))
    taken = math.ceil(4.36 * 22050)  # samples at the stream's rate, then resampled
    assert track.cut and track.rate == 22050 and track.samples.shape[0] == math.ceil(taken * 16000 / 22050)
    whole = audio.decode_track(path)
    start = track.samples.shape[0] - 1000  # before the resampler's flush at the cut
    np.testing.assert_array_equal(track.samples[:start], whole.samples[:start])  # the same start
    assert not audio.decode_track(path, audio.AudioBudget(10.5, cut=False)).cut
    with pytest.raises(DurationTooLong, match=r"ten.wav lasts 10.0 s; videos are at most 6 s"):
        audio.decode_track(path, audio.AudioBudget(6.0, cut=False))  # declared: refused undecoded


@pytest.mark.parametrize(
    ("rate", "channels", "message"), [(1, 1, "sample rate 1 Hz"), (16000, 16, "16 audio channels")]
)
def test_rate_and_channels_are_checked_before_decoding(
    tmp_path: Path, rate: int, channels: int, message: str
) -> None:
    path = hostile.wav_header(tmp_path / "odd.wav", rate=rate, channels=channels)
    with pytest.raises(InvalidInput, match=message):
        audio.prepare_audio([path], "parallel", 81)


@pytest.mark.parametrize("cap", [0.04, 0.2, 3.24, 3.28, 5.0, 12.7, 39.0, 40.0])
def test_the_budget_keeps_the_clip_plan_of_the_whole_track(cap: float) -> None:
    """A capped job plans the same clips and frames from its cut track as from a 10-minute one."""
    for spec in (MULTITALK, INFINITETALK):
        budget = audio_budget(cap, spec)
        assert (
            budget.cut and budget.seconds <= 41.44 + AUDIO_CONTEXT_S
        )  # cap 40 s: its 17th clip ends at 1033
        max_frames = resolve_max_frames(cap, 0.0, spec.max_frames)
        cut_frames = timeline.audio_frames(math.ceil(budget.seconds * timeline.SAMPLE_RATE))
        rule = (spec.motion_frames, spec.length_rule)
        assert plan_clips(cut_frames, max_frames, *rule) == plan_clips(30_000, max_frames, *rule)
        last_end = plan_clips(cut_frames, max_frames, *rule).starts[-1] + 81
        assert cut_frames >= last_end + max(audio.WINDOW_OFFSETS) + 1  # no window of the last clip clamped


def test_budget_of_uncapped_jobs_is_the_streaming_limit() -> None:
    assert audio_budget(None, MULTITALK) == audio.AudioBudget(40.2, cut=False)
    assert audio_budget(None, INFINITETALK) == audio.AudioBudget(600.2, cut=False)
    assert audio_budget(0.2, MULTITALK).seconds == pytest.approx(4.36)
