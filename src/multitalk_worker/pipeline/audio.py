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

Cost follows the job (docs/api.md): a stream's sample rate and channel count are checked before any frame
is decoded, each chunk is downmixed as it is decoded, and decoding stops at an `AudioBudget`: a capped job
decodes only the start its clips use (the rest of the track is never read), an uncapped one is refused as
soon as it runs past the longest video. A cut track is loudness-normalised over what was decoded.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
import pyloudnorm
import soxr
import torch

from multitalk_worker.errors import AudioDecodeFailed, DurationTooLong, InvalidInput
from multitalk_worker.pipeline.request import AudioMode
from multitalk_worker.timeline import FPS, SAMPLE_RATE, audio_frames

logger = logging.getLogger(__name__)

TARGET_LUFS = -23.0
SILENCE_LUFS = 100.0  # |loudness| above this counts as silence: no gain (spec 2.1)
LOUDNESS_BLOCK_S = 0.4  # pyloudnorm's gating block; shorter signals cannot be measured
WINDOW_OFFSETS = (-2, -1, 0, 1, 2)  # audio frames around each video frame (spec 2.6)
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv")
MAX_SPEAKERS = 2
MIN_SAMPLE_RATE = 8_000  # telephone speech; lower is no recording (a 1 Hz header: 16000x upsampling)
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8  # 7.1


@dataclass(frozen=True)
class AudioBudget:
    """How much of each track a job may decode. `cut`: a longer track is cut to `seconds` (a capped job
    uses its start); otherwise a longer track is refused with DurationTooLong while decoding."""

    seconds: float
    cut: bool


@dataclass(frozen=True)
class StreamInfo:
    """What a container says about its first audio stream, read without decoding."""

    rate: int
    channels: int
    declared_s: float | None


@dataclass(frozen=True)
class DecodedTrack:
    mono: np.ndarray  # float32 [n], channel mean, at `rate`
    rate: int
    cut: bool  # the stream held more than the budget; `mono` is its start


@dataclass(frozen=True)
class PreparedAudio:
    """Per-person signals (equal length, 16 kHz float32) and the soundtrack to mux."""

    tracks: tuple[np.ndarray, ...]
    soundtrack: np.ndarray  # float32 mono, person sum clipped to [-1, 1]
    padded_s: float = 0.0  # seconds of silence appended to the shorter `parallel` track
    track_s: tuple[float, ...] = ()  # seconds of each input track that were decoded (after any cut)
    cut: bool = False  # a track was longer than the job's budget; its start was used

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


def stream_info(container: av.container.InputContainer, name: str) -> StreamInfo:
    """Rate, channels and declared length of the first audio stream; refuses values out of range."""
    if not container.streams.audio:
        raise AudioDecodeFailed(f"{name}: no audio stream found")
    stream = container.streams.audio[0]
    rate, channels = int(stream.codec_context.sample_rate or 0), int(stream.codec_context.channels or 0)
    check_stream(rate, channels, name)
    declared = None
    if stream.duration is not None and stream.time_base is not None:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        declared = container.duration / av.time_base
    return StreamInfo(rate, channels, declared)


def check_stream(rate: int, channels: int, name: str) -> None:
    """Refuse a sample rate or channel count outside what speech recordings use (before decoding)."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidInput(
            f"{name}: sample rate {rate} Hz is not accepted; use {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz",
            stage="audio",
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidInput(
            f"{name}: {channels} audio channels are not accepted; use 1-{MAX_CHANNELS}", stage="audio"
        )


def _refuse_long(name: str, seconds: float) -> DurationTooLong:
    return DurationTooLong(
        f"{name}: the audio lasts more than {seconds:.1f} s, longer than the longest video; "
        "set max_duration_s to make a video of its first part, or send shorter audio"
    )


def _downmix(frame: av.AudioFrame, name: str) -> np.ndarray:
    """One decoded frame as float32 mono (channel mean, as librosa's to_mono); refuses NaN/inf."""
    planar = _to_float_planar(frame)
    if not np.isfinite(planar).all():
        raise InvalidInput(f"{name}: the audio holds NaN or infinite samples")
    return np.mean(planar, axis=0, dtype=np.float32) if planar.shape[0] > 1 else planar[0]


def _decode_mono(path: Path, resampler: av.AudioResampler | None, budget: AudioBudget | None) -> DecodedTrack:
    chunks: list[np.ndarray] = []
    total, cut = 0, False
    with av.open(str(path)) as container:
        info = stream_info(container, path.name)
        if budget is not None and not budget.cut and (info.declared_s or 0.0) > budget.seconds + 1.0:
            raise _refuse_long(path.name, budget.seconds)  # declared (an estimate for some mp3s: 1 s slack)
        rate = SAMPLE_RATE if resampler is not None else info.rate
        limit = math.inf if budget is None else math.ceil(budget.seconds * rate)
        for frame in container.decode(container.streams.audio[0]):
            for part in resampler.resample(frame) if resampler is not None else [frame]:
                chunks.append(_downmix(part, path.name))
                total += chunks[-1].shape[0]
            if total > limit:
                cut = True
                break
        if resampler is not None and not cut:
            chunks.extend(_downmix(part, path.name) for part in resampler.resample(None))
    if cut and budget is not None and not budget.cut:
        raise _refuse_long(path.name, budget.seconds)
    mono = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return DecodedTrack(mono[: int(min(limit, mono.shape[0]))], rate, cut)


def decode_track(path: Path, budget: AudioBudget | None = None) -> DecodedTrack:
    """Decode the first audio stream of `path` to float32 mono at its own rate, within `budget`.

    Video files (by extension) are converted like the reference's ffmpeg call: 16 kHz, stereo, s16. Memory:
    the mono track plus one frame, never the whole file's channels.
    """
    is_video = path.suffix.lower() in VIDEO_EXTENSIONS
    resampler = av.AudioResampler(format="s16", layout="stereo", rate=SAMPLE_RATE) if is_video else None
    try:
        track = _decode_mono(path, resampler, budget)
    except (AudioDecodeFailed, InvalidInput, DurationTooLong):
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise AudioDecodeFailed(f"{path.name}: not a readable audio or video file ({exc})") from exc
    if track.mono.shape[0] == 0:
        raise AudioDecodeFailed(f"{path.name}: the audio stream holds no samples")
    return track


def decode_audio(path: Path) -> tuple[np.ndarray, int]:
    """Decode the whole first audio stream of `path` to float32 [channels, samples] and its rate (tests and
    tools; jobs use `decode_track`, which is bounded and downmixes as it goes)."""
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            rate = stream_info(container, path.name).rate
            chunks = [_to_float_planar(f) for f in container.decode(container.streams.audio[0])]
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise AudioDecodeFailed(f"{path.name}: not a readable audio or video file ({exc})") from exc
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise AudioDecodeFailed(f"{path.name}: the audio stream holds no samples")
    return np.concatenate(chunks, axis=1), rate


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Channel mean, then soxr HQ to 16 kHz with librosa's output length `ceil(n * 16000 / rate)`."""
    mono = np.mean(samples, axis=0, dtype=np.float32) if samples.shape[0] > 1 else samples[0]
    return resample_16k(mono, rate)


def resample_16k(mono: np.ndarray, rate: int) -> np.ndarray:
    """soxr HQ (librosa's default) to 16 kHz with librosa's output length `ceil(n * 16000 / rate)`."""
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


def read_track(path: Path, budget: AudioBudget | None = None) -> np.ndarray:
    """Decode one file to mono 16 kHz float32 [n] (spec 2.1 steps 1-2) within `budget`, not normalised."""
    track = decode_track(path, budget)
    return resample_16k(track.mono, track.rate)


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


def prepare_audio(
    paths: Sequence[Path], mode: AudioMode, frames_per_clip: int, budget: AudioBudget | None = None
) -> PreparedAudio:
    """Load one or two speech tracks (spec 2.1-2.3), each within `budget` (None: whole tracks); the
    result must cover one clip (`La > F`, 2.5)."""
    if not 1 <= len(paths) <= MAX_SPEAKERS:
        raise InvalidInput(f"{len(paths)} speakers given; one or two are accepted")
    if mode not in ("parallel", "sequential"):
        raise InvalidInput(f"audio_mode {mode!r} is not accepted; use 'parallel' or 'sequential'")
    decoded = [decode_track(Path(p), budget) for p in paths]
    signals = [resample_16k(track.mono, track.rate) for track in decoded]
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
    combined = combine_tracks([loudness_normalise(s) for s in signals], mode)
    track_s = tuple(s.shape[0] / SAMPLE_RATE for s in signals)
    return replace(combined, track_s=track_s, cut=any(track.cut for track in decoded))


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
