"""LongCat-Video-Avatar's audio path after vocal separation (spec longcat-avatar-inference.md §4.2-4.7).

Per stream (person 1, person 2, and a silent "others" stream when extra persons are boxed):

1. the separated vocal at 16 kHz (pipeline/audio.py decodes and resamples; pipeline/vocals.py separates),
   two persons laid out as `parallel` or `sequential` (the reference's `para`/`add`; the shorter
   `parallel` track padded with silence where the reference asserts equal lengths);
2. zero-padded at the end to the rendered length `G = (93 + 80·(S − 1)) / fps` seconds
   (`ceil((G − n/16000)·16000)` zeros when positive), each stream on its own;
3. v1.5: loudness to −23 LUFS, then the Whisper encoder at 25 Hz (`[int(n/16000·25), 5, 1280]`,
   models/whisper_encoder.py). v1.0: loudness, a −45 dBFS Gaussian noise floor, a 3rd-order Butterworth
   low-pass at 3 kHz (causal), then chinese-wav2vec2 at 32 Hz (`[int(n/16000·32), 12, 768]`,
   models/audio_encoder.py, the computation MultiTalk uses at 25 Hz).

Float precision follows the reference's pinned NumPy 1.26: a padded track is float64 there (`np.append`
of Python floats), so its loudness is measured on float64 samples and the gain applied in float64 before
the feature extractor rounds to float32; an unpadded track stays float32 (a float32 gain). Both are
reproduced here, streamed over the float32 track in place (one chunk of float64 at a time).

v1.0's noise floor comes from NumPy's global RNG, never seeded, in the reference (runs differ); here it
is drawn from `np.random.RandomState(seed)` (the same legacy Gaussian, so the reference's draws are
reproduced by seeding its global RNG alike).

The CFG branch without audio uses all-zero feature windows (`null_windows`), which are not the features of
silence (§4.7); segments past the end of the audio see the features of the zero padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, Protocol, cast

import numpy as np
import scipy.signal
import torch
from torch import Tensor
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from multitalk_worker.errors import InvalidInput
from multitalk_worker.models.audio_encoder import audio_features
from multitalk_worker.models.whisper_encoder import whisper_features
from multitalk_worker.pipeline.audio import SILENCE_LUFS, TARGET_LUFS, combine_tracks
from multitalk_worker.pipeline.longcat_segments import (
    ADVANCE,
    SEGMENT_FRAMES,
    SegmentLength,
    SegmentPlan,
    plan_segments,
)
from multitalk_worker.pipeline.loudness import integrated_loudness
from multitalk_worker.pipeline.request import AudioMode

SAMPLE_RATE = 16_000
NOISE_FLOOR_DB = -45.0
LOWPASS_HZ = 3000.0
LOWPASS_ORDER = 3
CHUNK = 1 << 18  # samples processed at a time by the in-place passes

EncoderKind = Literal["whisper", "wav2vec2"]


@dataclass(frozen=True)
class LongCatAudioConfig:
    """What differs between the versions' audio paths."""

    fps: int  # output frame rate
    feature_rate: int  # audio feature frames per second
    encoder: EncoderKind
    prefilter: bool  # v1.0's noise floor and low-pass

    @property
    def stride(self) -> int:
        """`k_a`: feature frames per video frame."""
        return self.feature_rate // self.fps


AUDIO_V15 = LongCatAudioConfig(fps=25, feature_rate=25, encoder="whisper", prefilter=False)
AUDIO_V10 = LongCatAudioConfig(fps=16, feature_rate=32, encoder="wav2vec2", prefilter=True)


class FeatureEncoder(Protocol):
    """A loaded audio encoder: a prepared float32 16 kHz track -> `[frames, groups, C]` float32."""

    def __call__(self, signal: np.ndarray, frames: int) -> Tensor: ...


@dataclass(frozen=True)
class PaddedTrack:
    samples: np.ndarray  # float32 [n]
    padded: bool  # zeros were appended (the reference's track is then float64)


def feature_frames(num_samples: int, rate: int) -> int:
    """`int(n / 16000 · rate)`, in the reference's float arithmetic."""
    return int(num_samples / SAMPLE_RATE * rate)


def video_frames(num_samples: int, fps: int) -> int:
    """The video frames a 16 kHz track covers (truncated)."""
    return int(num_samples / SAMPLE_RATE * fps)


def rendered_seconds(segments: int, fps: int) -> float:
    """`G`: the seconds S segments render, in the reference's float expression."""
    return SEGMENT_FRAMES / fps + (segments - 1) * ADVANCE / fps


def pad_track(signal: np.ndarray, seconds: float) -> PaddedTrack:
    """Append `ceil((G − n/16000)·16000)` zeros when positive (§4.2); a longer track is not cut."""
    added = math.ceil((seconds - signal.shape[0] / SAMPLE_RATE) * SAMPLE_RATE)
    if added <= 0:
        return PaddedTrack(signal, padded=False)
    return PaddedTrack(np.concatenate([signal, np.zeros(added, np.float32)]), padded=True)


def loudness_gain(track: PaddedTrack) -> float | None:
    """The gain to −23 LUFS, measured as pyloudnorm measures the reference's array; None for silence."""
    store = np.float64 if track.padded else np.float32
    level = integrated_loudness(track.samples, SAMPLE_RATE, store)
    if abs(level) > SILENCE_LUFS or math.isnan(level):
        return None
    return float(np.power(10.0, (TARGET_LUFS - level) / 20.0))


def _scaled(chunk: np.ndarray, gain: float | None, padded: bool) -> np.ndarray:
    """The chunk after the loudness gain, in the reference's dtype (float64 when padded)."""
    if gain is None:
        return chunk.astype(np.float64) if padded else chunk
    if padded:
        return chunk.astype(np.float64) * gain
    return chunk * np.float32(gain)


def normalise_track(track: PaddedTrack) -> np.ndarray:
    """v1.5 step 1 (§4.4): the track at −23 LUFS as the float32 samples the feature extractor sees,
    written over `track.samples`."""
    gain = loudness_gain(track)
    samples = track.samples
    if gain is None:
        return samples
    for start in range(0, samples.shape[0], CHUNK):
        part = samples[start : start + CHUNK]
        part[:] = _scaled(part, gain, track.padded)
    return samples


def prefilter_track(track: PaddedTrack, noise: np.random.RandomState) -> np.ndarray:
    """v1.0 steps 1-3 (§4.3): loudness, `randn·10^(−45/20)` noise from `noise`, causal 3 kHz Butterworth
    low-pass (float64, zero initial state), rounded to float32 over `track.samples`."""
    gain = loudness_gain(track)
    amplitude = 10 ** (NOISE_FLOOR_DB / 20)
    # output="ba" returns the (b, a) pair; scipy's stubs give the union of every output form
    b, a = cast(
        tuple[np.ndarray, np.ndarray], scipy.signal.butter(LOWPASS_ORDER, LOWPASS_HZ / (SAMPLE_RATE / 2))
    )
    state = np.zeros(max(len(a), len(b)) - 1)
    samples = track.samples
    for start in range(0, samples.shape[0], CHUNK):
        part = samples[start : start + CHUNK]
        noisy = _scaled(part, gain, track.padded) + noise.randn(part.shape[0]) * amplitude
        filtered, state = scipy.signal.lfilter(b, a, noisy, zi=state)
        part[:] = filtered
    return samples


def stream_tracks(vocals: Sequence[np.ndarray], mode: AudioMode, others: bool) -> list[np.ndarray]:
    """The streams' 16 kHz vocals before padding (§4.6): person 1 (and person 2, laid out by `mode`),
    then an all-zero track of the same length when `others` (extra persons driven by silence)."""
    if not 1 <= len(vocals) <= 2:
        raise InvalidInput(f"{len(vocals)} speakers given; one or two are accepted")
    tracks = list(combine_tracks(vocals, mode).tracks)
    if others:
        if len(tracks) != 2:
            raise InvalidInput("extra persons need two speakers with their regions")
        tracks.append(np.zeros_like(tracks[0]))
    return tracks


def track_features(
    signal: np.ndarray,
    segments: int,
    config: LongCatAudioConfig,
    encode: FeatureEncoder,
    noise: np.random.RandomState | None = None,
) -> Tensor:
    """One stream's features over the whole padded track, `[La, groups, C]` float32 (§4.2-4.4)."""
    track = pad_track(np.array(signal, dtype=np.float32), rendered_seconds(segments, config.fps))
    if config.prefilter:
        if noise is None:
            raise ValueError("v1.0's noise floor needs a random source")
        prepared = prefilter_track(track, noise)
    else:
        prepared = normalise_track(track)
    features = encode(prepared, feature_frames(prepared.shape[0], config.feature_rate))
    if torch.isnan(features).any():
        raise InvalidInput("the audio features contain NaN (damaged audio?)")
    return features


def null_windows(windows: Tensor) -> Tensor:
    """The unconditional branch's audio (§7.3): all-zero feature windows of the same shape."""
    return torch.zeros_like(windows)


@dataclass(frozen=True)
class LongCatAudio:
    """A request's audio, ready for the segment loop."""

    features: tuple[Tensor, ...]  # per stream [La, groups, C] float32: person 1, person 2, silent others
    soundtrack: np.ndarray  # what the video is muxed with: the unseparated audio, 16 kHz mono float32
    plan: SegmentPlan
    stride: int  # feature frames per video frame, for `segment_windows`


def prepare_longcat_audio(
    raw: Sequence[np.ndarray],
    vocals: Sequence[np.ndarray] | None,
    mode: AudioMode,
    config: LongCatAudioConfig,
    encode: FeatureEncoder,
    *,
    max_frames: int,
    length: SegmentLength = "audio",
    others: bool = False,
    seed: int = 0,
) -> LongCatAudio:
    """Streams, segment plan and features of one request (§4.2-4.7).

    `raw`: each person's decoded 16 kHz track (pipeline/audio.read_track, not normalised); `vocals`: the
    same tracks after vocal separation (pipeline/vocals.py), or None when separation is off (the raw audio
    then drives the model). The plan follows the driving audio's frames at the model's fps (`length`:
    trimmed to the audio, or whole segments); every stream is padded to the plan's rendered length and
    encoded on its own. `seed` seeds v1.0's noise floor."""
    streams = stream_tracks(vocals if vocals is not None else raw, mode, others)
    plan = plan_segments(video_frames(streams[0].shape[0], config.fps), max_frames, length)
    noise = np.random.RandomState(seed) if config.prefilter else None
    segments = len(plan.segments)
    features = tuple(track_features(track, segments, config, encode, noise) for track in streams)
    soundtrack = combine_tracks(raw, mode).soundtrack
    return LongCatAudio(features=features, soundtrack=soundtrack, plan=plan, stride=config.stride)


def whisper_encoder(encoder: WhisperEncoder, extractor: WhisperFeatureExtractor) -> FeatureEncoder:
    """v1.5's FeatureEncoder: the loaded Whisper encoder and its feature extractor (weights/whisper.py)."""
    return partial(whisper_features, encoder, extractor)


def wav2vec_encoder(model: Wav2Vec2Model, extractor: Wav2Vec2FeatureExtractor) -> FeatureEncoder:
    """v1.0's FeatureEncoder: chinese-wav2vec2 at the requested frame count (weights/wav2vec.py)."""

    def encode(signal: np.ndarray, frames: int) -> Tensor:
        return audio_features(model, extractor, signal, frames=frames)

    return encode
