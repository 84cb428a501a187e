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

Memory follows the track, held once: each decoded frame is downmixed and resampled (soxr as a stream) into
one 16 kHz buffer, the loudness meter streams (loudness.py), the gain is applied in place, and a soundtrack
with nothing to clip is the track itself. With the wav2vec2 CNN in slices (models/audio_encoder.py), a
10-minute dub peaks within a few per cent of a 1-minute one (bench/bench_memory.py, bench/RESULTS.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
import soxr
import torch

from multitalk_worker.errors import AudioDecodeFailed, DurationTooLong, InvalidInput
from multitalk_worker.pipeline.loudness import BLOCK_S as LOUDNESS_BLOCK_S  # shorter cannot be measured
from multitalk_worker.pipeline.loudness import integrated_loudness
from multitalk_worker.pipeline.request import AudioMode
from multitalk_worker.timeline import FPS, SAMPLE_RATE, audio_frames, check_length

logger = logging.getLogger(__name__)

TARGET_LUFS = -23.0
SILENCE_LUFS = 100.0  # |loudness| above this counts as silence: no gain (spec 2.1)
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
    samples: np.ndarray  # float32 [n], channel mean, at 16 kHz
    rate: int  # the stream's own sample rate
    cut: bool  # the stream held more than the budget; `samples` is its start


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
    """check_length's answer for a track whose decoding stopped at the budget: it lasts more than that."""
    return DurationTooLong(
        f"{name} lasts more than {seconds:.1f} s; videos are at most that long. "
        f"Set max_duration_s (<= {seconds:.1f}) to make a video of its first part, or send shorter audio"
    )


def _downmix(frame: av.AudioFrame, name: str) -> np.ndarray:
    """One decoded frame as float32 mono (channel mean, as librosa's to_mono); refuses NaN/inf."""
    planar = _to_float_planar(frame)
    if not np.isfinite(planar).all():
        raise InvalidInput(f"{name}: the audio holds NaN or infinite samples")
    return np.mean(planar, axis=0, dtype=np.float32) if planar.shape[0] > 1 else planar[0]


class _Track16k:
    """Mono chunks at the stream's rate in, one 16 kHz float32 track out, the track held once.

    soxr "HQ" runs as a stream (`ResampleStream`: the same samples as one `soxr.resample` call over the
    whole track, tests/test_audio.py), and the output goes into a buffer allocated at the expected length
    (pages never written cost no memory) that grows, with one copy, only past it. The length is librosa's,
    `ceil(n * 16000 / rate)`: the stream's end is padded with zeros or cut to it.
    """

    def __init__(self, rate: int, expected_s: float) -> None:
        self.rate, self.taken, self.size = rate, 0, 0
        self.stream = None
        if rate != SAMPLE_RATE:
            self.stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self.buffer = np.empty(math.ceil(expected_s * SAMPLE_RATE) + SAMPLE_RATE, np.float32)

    def add(self, mono: np.ndarray, limit: float = math.inf) -> bool:
        """Take `mono` while at most `limit` samples (at the stream's rate) are taken in all; True when
        `mono` held more than that (the rest is dropped)."""
        over = mono.shape[0] > limit - self.taken
        if over:
            mono = mono[: max(0, int(limit - self.taken))]
        self.taken += mono.shape[0]
        self._append(mono if self.stream is None else self.stream.resample_chunk(mono))
        return over

    def finish(self) -> np.ndarray:
        if self.stream is not None:
            self._append(self.stream.resample_chunk(np.zeros(0, np.float32), last=True))
        length = math.ceil(self.taken * SAMPLE_RATE / self.rate)
        if self.size < length:
            self._append(np.zeros(length - self.size, np.float32))
        return self.buffer[:length]

    def _append(self, samples: np.ndarray) -> None:
        end = self.size + samples.shape[0]
        if end > self.buffer.shape[0]:
            grown = np.empty(max(end, 2 * self.buffer.shape[0]), np.float32)
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : end] = samples
        self.size = end


def _decode_mono(path: Path, resampler: av.AudioResampler | None, budget: AudioBudget | None) -> DecodedTrack:
    cut = False
    with av.open(str(path)) as container:
        info = stream_info(container, path.name)
        if budget is not None and not budget.cut:
            # the declared length (an estimate for some mp3s: 1 s slack), before decoding any of it
            check_length(budget.seconds, media_s=info.declared_s, what=path.name, slack_s=1.0)
        rate = SAMPLE_RATE if resampler is not None else info.rate
        limit = math.inf if budget is None else math.ceil(budget.seconds * rate)
        expected = [s for s in (info.declared_s, None if budget is None else budget.seconds) if s is not None]
        track = _Track16k(rate, min(expected) + 1.0 if expected else 60.0)
        for frame in container.decode(container.streams.audio[0]):
            for part in resampler.resample(frame) if resampler is not None else [frame]:
                cut = track.add(_downmix(part, path.name), limit) or cut
            if cut:
                break
        if resampler is not None and not cut:
            for part in resampler.resample(None):  # FFmpeg's resampler holds a few samples back
                track.add(_downmix(part, path.name), limit)
    if cut and budget is not None and not budget.cut:
        raise _refuse_long(path.name, budget.seconds)
    return DecodedTrack(track.finish(), info.rate, cut)


def decode_track(path: Path, budget: AudioBudget | None = None) -> DecodedTrack:
    """Decode the first audio stream of `path` to float32 mono at 16 kHz (spec 2.1 steps 1-2), within
    `budget`.

    Audio files: the channel mean at the stream's rate, then soxr HQ to 16 kHz (librosa's default). Video
    files (by extension) are converted like the reference's ffmpeg call: 16 kHz, stereo, s16, then the mean.
    Memory: the 16 kHz mono track plus one frame, never the whole file's channels or its native rate.
    """
    is_video = path.suffix.lower() in VIDEO_EXTENSIONS
    resampler = av.AudioResampler(format="s16", layout="stereo", rate=SAMPLE_RATE) if is_video else None
    try:
        track = _decode_mono(path, resampler, budget)
    except (AudioDecodeFailed, InvalidInput, DurationTooLong):
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise AudioDecodeFailed(f"{path.name}: not a readable audio or video file ({exc})") from exc
    if track.samples.shape[0] == 0:
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


def loudness_normalise(signal: np.ndarray, target_lufs: float = TARGET_LUFS) -> np.ndarray:
    """Scale `signal` (float32, in place) by a constant gain to `target_lufs` integrated loudness and return
    it; silence (|LUFS| > 100) is left as is.

    The meter is pyloudnorm's, streamed (loudness.py: its value bit for bit, one chunk in memory). The gain
    is applied in float32 (as the reference does under numpy < 2); pyloudnorm's own `normalize.loudness`
    would promote to float64 under numpy 2.
    """
    if signal.shape[0] < int(LOUDNESS_BLOCK_S * SAMPLE_RATE):
        raise InvalidInput(
            f"audio is {signal.shape[0] / SAMPLE_RATE:.2f} s long; "
            f"loudness needs at least {LOUDNESS_BLOCK_S} s"
        )
    level = integrated_loudness(signal, SAMPLE_RATE)
    if abs(level) <= SILENCE_LUFS:  # not -inf, not NaN
        signal *= np.float32(10.0 ** ((target_lufs - level) / 20.0))
    return signal


def read_track(path: Path, budget: AudioBudget | None = None) -> np.ndarray:
    """Decode one file to mono 16 kHz float32 [n] (spec 2.1 steps 1-2) within `budget`, not normalised."""
    return decode_track(path, budget).samples


def _combined_length(lengths: Sequence[int], mode: AudioMode) -> int:
    return sum(lengths) if mode == "sequential" else max(lengths)


def _clipped(track: np.ndarray) -> np.ndarray:
    """The track clipped to [-1, 1]: the track itself when nothing is out of range (no second copy)."""
    if track.shape[0] == 0 or (track.max() <= 1.0 and track.min() >= -1.0):
        return track
    return np.clip(track, -1.0, 1.0)


def combine_tracks(tracks: Sequence[np.ndarray], mode: AudioMode) -> PreparedAudio:
    """Spec 2.3: one person as is; two persons `parallel` (shorter padded) or `sequential`."""
    if len(tracks) == 1:
        return PreparedAudio(tracks=(tracks[0],), soundtrack=_clipped(tracks[0]))
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
    mix = np.add(first, second)  # float32, correctly rounded: the float64 sum rounded to float32
    soundtrack = np.clip(mix, -1.0, 1.0, out=mix)
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
    signals = [track.samples for track in decoded]
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
