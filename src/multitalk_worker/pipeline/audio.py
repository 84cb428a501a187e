"""Speech tracks in, per-person 16 kHz signals and per-clip wav2vec2 windows out (spec 2).

Loading (spec 2.1): any format FFmpeg decodes, read with PyAV. Audio files are downmixed by averaging the
channels and resampled to 16 kHz with soxr "HQ" (librosa's default resampler, which the reference uses);
the output length is `ceil(n * 16000 / rate)` as librosa pads/trims it. Video files (by extension, as the
reference decides) first go through FFmpeg's own resampler to 16 kHz stereo s16, as the reference's
`ffmpeg -ar 16000 -ac 2 -acodec pcm_s16le` call does. Every track is then loudness-normalised to -23 LUFS
(ITU-R BS.1770, pyloudnorm), except when |loudness| > 100 LUFS (silence), which is left unchanged.

Two persons (spec 2.3): `sequential` plays person 1 and then person 2 (each padded with zeros over the
other's turn). `parallel` plays both at once; the reference crashes when the two tracks differ in length,
we pad the shorter one with trailing silence (what a user who recorded two tracks of one conversation
expects: that person is silent after their track ends). Equal-length inputs are unaffected.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyloudnorm
import soxr
import torch

from multitalk_worker.errors import AudioDecodeFailed, InvalidInput
from multitalk_worker.pipeline.request import AudioMode
from multitalk_worker.timeline import FPS, SAMPLE_RATE, audio_frames

logger = logging.getLogger(__name__)

TARGET_LUFS = -23.0
SILENCE_LUFS = 100.0  # |loudness| above this counts as silence: no gain (spec 2.1)
LOUDNESS_BLOCK_S = 0.4  # pyloudnorm's gating block; shorter signals cannot be measured
WINDOW_OFFSETS = (-2, -1, 0, 1, 2)  # audio frames around each video frame (spec 2.6)
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv")
MAX_SPEAKERS = 2


@dataclass(frozen=True)
class PreparedAudio:
    """Per-person signals (equal length, 16 kHz float32) and the soundtrack to mux."""

    tracks: tuple[np.ndarray, ...]
    soundtrack: np.ndarray  # float32 mono, person sum clipped to [-1, 1]
    padded_s: float = 0.0  # seconds of silence appended to the shorter `parallel` track

    @property
    def num_samples(self) -> int:
        return int(self.tracks[0].shape[0])

    @property
    def frames(self) -> int:
        """`La`: the 25 fps video frames the audio covers, truncated as the reference does."""
        return audio_frames(self.num_samples)


def _to_float_planar(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame as float32 [channels, samples] in [-1, 1] (int formats divided by 2^(bits-1))."""
    data = frame.to_ndarray()
    if not frame.format.is_planar:
        data = data.reshape(-1, len(frame.layout.channels)).T
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    return data.astype(np.float32)


def _decode_frames(path: Path, resampler: av.AudioResampler | None) -> tuple[list[np.ndarray], int]:
    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise AudioDecodeFailed(f"{path.name}: no audio stream found")
        stream = container.streams.audio[0]
        rate = SAMPLE_RATE if resampler is not None else int(stream.codec_context.sample_rate)
        for frame in container.decode(stream):
            frames = resampler.resample(frame) if resampler is not None else [frame]
            chunks.extend(_to_float_planar(f) for f in frames)
        if resampler is not None:
            chunks.extend(_to_float_planar(f) for f in resampler.resample(None))
    return chunks, rate


def decode_audio(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of `path` to float32 [channels, samples] and its sample rate.

    Video files (by extension) are converted like the reference's ffmpeg call: 16 kHz, stereo, s16.
    """
    is_video = path.suffix.lower() in VIDEO_EXTENSIONS
    resampler = av.AudioResampler(format="s16", layout="stereo", rate=SAMPLE_RATE) if is_video else None
    try:
        chunks, rate = _decode_frames(path, resampler)
    except AudioDecodeFailed:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise AudioDecodeFailed(f"{path.name}: not a readable audio or video file ({exc})") from exc
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise AudioDecodeFailed(f"{path.name}: the audio stream holds no samples")
    return np.concatenate(chunks, axis=1), rate


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Channel mean, then soxr HQ to 16 kHz with librosa's output length `ceil(n * 16000 / rate)`."""
    mono = np.mean(samples, axis=0, dtype=np.float32) if samples.shape[0] > 1 else samples[0]
    if rate == SAMPLE_RATE:
        return mono.astype(np.float32, copy=False)
    out = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    size = int(math.ceil(mono.shape[0] * SAMPLE_RATE / rate))
    if out.shape[0] < size:
        out = np.pad(out, (0, size - out.shape[0]))
    return out[:size].astype(np.float32, copy=False)


def loudness_normalise(signal: np.ndarray, target_lufs: float = TARGET_LUFS) -> np.ndarray:
    """Constant gain to `target_lufs` integrated loudness; silence (|LUFS| > 100) is returned as is.

    The gain is applied in float32 (as the reference does under numpy < 2); pyloudnorm's own
    `normalize.loudness` would promote to float64 under numpy 2, so only the meter comes from it.
    """
    if signal.shape[0] < int(LOUDNESS_BLOCK_S * SAMPLE_RATE):
        raise InvalidInput(
            f"audio is {signal.shape[0] / SAMPLE_RATE:.2f} s long; "
            f"loudness needs at least {LOUDNESS_BLOCK_S} s"
        )
    meter = pyloudnorm.Meter(SAMPLE_RATE)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loudness = meter.integrated_loudness(signal)
    if not abs(loudness) <= SILENCE_LUFS:  # also catches -inf and NaN
        return signal
    gain = np.float32(10.0 ** ((target_lufs - loudness) / 20.0))
    return signal * gain


def read_track(path: Path) -> np.ndarray:
    """Decode one file to mono 16 kHz float32 [n] (spec 2.1 steps 1-2), not yet normalised."""
    samples, rate = decode_audio(path)
    if not np.isfinite(samples).all():
        raise InvalidInput(f"{path.name}: the audio holds NaN or infinite samples")
    return to_mono_16k(samples, rate)


def _combined_length(lengths: Sequence[int], mode: AudioMode) -> int:
    return sum(lengths) if mode == "sequential" else max(lengths)


def combine_tracks(tracks: Sequence[np.ndarray], mode: AudioMode) -> PreparedAudio:
    """Spec 2.3: one person as is; two persons `parallel` (shorter padded) or `sequential`."""
    if len(tracks) == 1:
        return PreparedAudio(tracks=(tracks[0],), soundtrack=np.clip(tracks[0], -1.0, 1.0))
    first, second = tracks
    padded_s = 0.0
    if mode == "sequential":
        first = np.concatenate([first, np.zeros(second.shape[0], np.float32)])
        second = np.concatenate([np.zeros(tracks[0].shape[0], np.float32), second])
    elif mode == "parallel":
        length = max(first.shape[0], second.shape[0])
        padded_s = abs(first.shape[0] - second.shape[0]) / SAMPLE_RATE
        if padded_s > 0:
            logger.info("parallel tracks differ by %.3f s; the shorter is padded with silence", padded_s)
        first = np.pad(first, (0, length - first.shape[0]))
        second = np.pad(second, (0, length - second.shape[0]))
    else:
        raise InvalidInput(f"audio_mode {mode!r} is not accepted; use 'parallel' or 'sequential'")
    mix = first.astype(np.float64) + second.astype(np.float64)
    soundtrack = np.clip(mix, -1.0, 1.0).astype(np.float32)
    return PreparedAudio(tracks=(first, second), soundtrack=soundtrack, padded_s=padded_s)


def prepare_audio(paths: Sequence[Path], mode: AudioMode, frames_per_clip: int) -> PreparedAudio:
    """Load one or two speech tracks (spec 2.1-2.3); the result must cover one clip (`La > F`, 2.5)."""
    if not 1 <= len(paths) <= MAX_SPEAKERS:
        raise InvalidInput(f"{len(paths)} speakers given; one or two are accepted")
    if mode not in ("parallel", "sequential"):
        raise InvalidInput(f"audio_mode {mode!r} is not accepted; use 'parallel' or 'sequential'")
    signals = [read_track(Path(p)) for p in paths]
    total = _combined_length([s.shape[0] for s in signals], mode)
    if audio_frames(total) <= frames_per_clip:
        raise InvalidInput(
            f"audio is {total / SAMPLE_RATE:.2f} s long; at least "
            f"{(frames_per_clip + 1) / FPS:.2f} s is needed for one {frames_per_clip}-frame clip"
        )
    for path, signal in zip(paths, signals, strict=True):
        if signal.shape[0] < int(LOUDNESS_BLOCK_S * SAMPLE_RATE):
            raise InvalidInput(
                f"{Path(path).name}: audio is {signal.shape[0] / SAMPLE_RATE:.2f} s long; "
                f"each track needs at least {LOUDNESS_BLOCK_S} s"
            )
    return combine_tracks([loudness_normalise(s) for s in signals], mode)


def check_embedding(embedding: torch.Tensor, person: int) -> None:
    """The reference skips (then asserts on) NaN embeddings; we say so."""
    if torch.isnan(embedding).any():
        raise InvalidInput(f"speaker {person}: the audio features contain NaN (damaged audio?)")


def clip_windows(embeddings: Sequence[torch.Tensor], start: int, frames: int) -> torch.Tensor:
    """Spec 2.6: windows for video frames [start, start+frames) -> [P, F, 5, layers, C].

    Indices are clamped to each person's full track, so clips see real neighbours across boundaries.
    """
    offsets = torch.tensor(WINDOW_OFFSETS)
    centres = torch.arange(start, start + frames).unsqueeze(1)
    windows = []
    for emb in embeddings:
        idx = torch.clamp(centres + offsets.unsqueeze(0), min=0, max=emb.shape[0] - 1)  # [F, 5]
        windows.append(emb[idx])  # [F, 5, layers, C]
    return torch.stack(windows)


def reflect_pad(embeddings: Sequence[torch.Tensor], clip_end: int) -> tuple[list[torch.Tensor], list[int]]:
    """Spec 6.6 step 10: before the last clip, extend every track with `La <= clip_end` by its last
    `miss = clip_end - La + 3` frames in reverse order. Returns the tracks and each `miss` (0 if none)."""
    padded: list[torch.Tensor] = []
    misses: list[int] = []
    for emb in embeddings:
        length = emb.shape[0]
        if clip_end >= length:
            miss = clip_end - length + 3
            padded.append(torch.cat([emb, torch.flip(emb[-miss:], dims=[0])], dim=0))
            misses.append(miss)
        else:
            padded.append(emb)
            misses.append(0)
    return padded, misses
