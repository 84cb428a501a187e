"""Frames + soundtrack -> H.264/AAC mp4 in one PyAV pass, and reading a video back by decoding it.

The reference encodes twice (imageio CRF 25, then ffmpeg CRF 23 while muxing, spec 7); one pass at
libx264's default CRF 23 gives the same final settings without the intermediate loss. The soundtrack is
cut to the video's length (N / fps seconds) as the reference's `ffmpeg -t` + `-shortest` do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from multitalk_worker.errors import OutputInvalid
from multitalk_worker.timeline import FPS

logger = logging.getLogger(__name__)

VIDEO_CRF = 23


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int
    duration_s: float  # frames / fps
    audio_duration_s: float  # decoded samples / sample rate (0 without audio)
    has_audio: bool


def _add_video_stream(
    container: av.container.OutputContainer, width: int, height: int, fps: int, crf: int
) -> av.VideoStream:
    stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf)})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    return stream


def _encode_audio(container: av.container.OutputContainer, audio: np.ndarray, sample_rate: int) -> None:
    stream = container.add_stream("aac", rate=sample_rate)
    stream.layout = "mono"
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(audio, np.float32)[None], format="fltp", layout="mono"
    )
    frame.sample_rate, frame.pts, frame.time_base = sample_rate, 0, Fraction(1, sample_rate)
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_mp4(
    path: Path,
    frames: np.ndarray,
    audio: np.ndarray,
    sample_rate: int,
    fps: int = FPS,
    crf: int = VIDEO_CRF,
) -> None:
    """Write uint8 frames [N, H, W, 3] and a mono float soundtrack to `path` (H.264 yuv420p + AAC).

    The soundtrack is trimmed to N / fps seconds; H and W must be even (yuv420p). `crf`: H.264 quality,
    0 (lossless: decoding gives back exactly the yuv420p pictures) to 51.
    """
    if not 0 <= crf <= 51:
        raise OutputInvalid(f"crf {crf} is out of range; accepted: 0 (lossless) to 51")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise OutputInvalid(f"frames must be uint8 [N>0, H, W, 3]; got {frames.dtype} {tuple(frames.shape)}")
    count, height, width = frames.shape[:3]
    if height % 2 or width % 2:
        raise OutputInvalid(f"frame size {width}x{height} must be even for yuv420p")
    audio = np.clip(audio[: round(count * sample_rate / fps)], -1.0, 1.0)
    try:
        with av.open(str(path), mode="w", format="mp4") as container:
            video = _add_video_stream(container, width, height, fps, crf)
            if audio.size > 0:  # both streams exist before the first packet is muxed
                _encode_audio(container, audio, sample_rate)
            for frame in frames:
                for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in video.encode(None):
                container.mux(packet)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise OutputInvalid(f"could not write {Path(path).name}: {exc}") from exc
    logger.info("wrote %s: %d frames at %d fps, %.2f s of audio", path, count, fps, audio.size / sample_rate)


def probe_video(path: Path) -> VideoInfo:
    """Decode every frame and audio sample of `path` and report what is really there."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise OutputInvalid(f"{Path(path).name}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            width, height = stream.codec_context.width, stream.codec_context.height
            count = sum(1 for _ in container.decode(stream))
        audio_s, has_audio = _decoded_audio_seconds(path)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise OutputInvalid(f"{Path(path).name}: not a decodable video ({exc})") from exc
    if count == 0 or fps <= 0:
        raise OutputInvalid(f"{Path(path).name}: no decodable video frames")
    return VideoInfo(count, fps, width, height, count / fps, audio_s, has_audio)


def _decoded_audio_seconds(path: Path) -> tuple[float, bool]:
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return 0.0, False
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.codec_context.sample_rate, True


def read_frames(path: Path) -> np.ndarray:
    """All video frames of `path` as uint8 [N, H, W, 3] RGB."""
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise OutputInvalid(f"{Path(path).name}: not a decodable video ({exc})") from exc
    if not frames:
        raise OutputInvalid(f"{Path(path).name}: no decodable video frames")
    return np.stack(frames)
