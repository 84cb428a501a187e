"""Frames + soundtrack -> H.264/AAC mp4 in one PyAV pass, streamed clip by clip, and reading a video back.

The reference encodes twice (imageio CRF 25, then ffmpeg CRF 23 while muxing, spec 7); one pass at
libx264's default CRF 23 gives the same final settings without the intermediate loss. The soundtrack is
cut to the video's length (N / fps seconds) as the reference's `ffmpeg -t` + `-shortest` do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
from av.container import OutputContainer
from av.error import FFmpegError

from multitalk_worker.config import VIDEO_CRF
from multitalk_worker.errors import OutputInvalid
from multitalk_worker.timeline import FPS

# The same frames must give the same bytes (a resumed job's video equals an uninterrupted run's, and
# segments.py encodes clip by clip). Measured on this project's 2-core CI-like VM, 200 encodes each of one
# tiny clip (81 frames, 64x48, crf 18, one thread): x264's defaults gave 3 different files; with its
# assembly off, or with the macroblock tree off, all 200 were the same. The tree is switched off (files
# 8-19% larger at the same crf on that clip) and the assembly kept (speed); one thread, as frame threads
# were not proven deterministic here.
X264_DETERMINISTIC = {"threads": "1", "x264-params": "mbtree=0"}


def x264_options(crf: int) -> dict[str, str]:
    """libx264's options for every video this project writes: `crf` and a deterministic encoder."""
    return {"crf": str(crf), **X264_DETERMINISTIC}


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mp4Info:
    frames: int
    fps: float
    width: int
    height: int
    duration_s: float  # frames / fps
    audio_duration_s: float  # decoded samples / sample rate (0 without audio)
    has_audio: bool


class Mp4Writer:
    """Frames in, chunk by chunk, to an H.264 yuv420p + AAC mp4; memory does not grow with the video.

    The soundtrack (mono float, known up front) is encoded alongside: after each `write`, the samples up to
    the written frames' end are muxed, so the muxer interleaves the two streams as they arrive and nothing
    waits for `close`. At `close` the soundtrack is cut at N / fps seconds (N = frames written), as the
    reference's `ffmpeg -t` + `-shortest` do; a shorter soundtrack is kept whole. H and W must be even
    (yuv420p). `crf`: H.264 quality, 0 (lossless: decoding gives back exactly the yuv420p pictures) to 51.
    On an exception inside `with`, the incomplete file is removed.
    """

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        *,
        audio: np.ndarray,
        sample_rate: int,
        fps: int = FPS,
        crf: int = VIDEO_CRF,
    ) -> None:
        if not 0 <= crf <= 51:
            raise OutputInvalid(f"crf {crf} is out of range; accepted: 0 (lossless) to 51")
        if height % 2 or width % 2 or height <= 0 or width <= 0:
            raise OutputInvalid(f"frame size {width}x{height} must be positive and even for yuv420p")
        if audio.ndim != 1:
            raise OutputInvalid(f"the soundtrack must be mono samples [n]; got shape {tuple(audio.shape)}")
        self.path, self.width, self.height, self.fps = Path(path), width, height, fps
        self._audio, self._sample_rate = audio, sample_rate
        self._frames = self._samples = 0
        self._closed = False
        try:
            self._container = av.open(str(path), mode="w", format="mp4")
        except (FFmpegError, OSError, ValueError) as exc:
            raise OutputInvalid(f"could not write {self.path.name}: {exc}") from exc
        try:  # both streams exist before the first packet is muxed
            self._video = self._container.add_stream("libx264", rate=fps, options=x264_options(crf))
            self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
            self._sound = self.add_audio(self._container, sample_rate) if audio.size > 0 else None
        except (FFmpegError, OSError, ValueError) as exc:
            self.abort()
            raise OutputInvalid(f"could not write {self.path.name}: {exc}") from exc

    @staticmethod
    def add_audio(container: OutputContainer, sample_rate: int) -> av.AudioStream:
        """The soundtrack's AAC mono stream in `container` (segments.py's assembly adds the same)."""
        stream = container.add_stream("aac", rate=sample_rate)
        stream.layout = "mono"
        return stream

    @staticmethod
    def encode_audio(
        container: OutputContainer,
        stream: av.AudioStream,
        audio: np.ndarray,
        sent: int,
        end: int,
    ) -> int:
        """Encode and mux `audio`'s samples [sent, end) (clamped to [-1, 1]); the encoder keeps the rest of a
        1024-sample frame. Returns the samples sent so far."""
        end = min(end, audio.size)
        if end <= sent:
            return sent
        span = np.clip(np.asarray(audio[sent:end], np.float32), -1.0, 1.0)
        frame = av.AudioFrame.from_ndarray(span[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = stream.rate, sent
        frame.time_base = Fraction(1, stream.rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        return end

    @property
    def frames_written(self) -> int:
        return self._frames

    def write(self, frames: np.ndarray) -> None:
        """Encode uint8 frames [n, H, W, 3] (RGB) and mux the soundtrack up to their end."""
        if self._closed:
            raise OutputInvalid(f"{self.path.name} is already closed")
        expected = (self.height, self.width, 3)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != expected:
            raise OutputInvalid(
                f"frames must be uint8 [n, {self.height}, {self.width}, 3]; got {frames.dtype} "
                f"{tuple(frames.shape)}"
            )
        try:
            for index, frame in enumerate(frames, start=self._frames):
                self._mux(self._video.encode(video_frame(frame, index, self.fps)))
            self._frames += len(frames)
            self._write_audio(round(self._frames * self._sample_rate / self.fps))
        except (FFmpegError, OSError, ValueError) as exc:
            raise OutputInvalid(f"could not write {self.path.name}: {exc}") from exc

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _write_audio(self, end: int) -> None:
        if self._sound is not None:
            self._samples = self.encode_audio(self._container, self._sound, self._audio, self._samples, end)

    def close(self) -> int:
        """Flush both encoders and finish the file; returns the number of frames written."""
        if self._closed:
            return self._frames
        if self._frames == 0:
            self.abort()
            raise OutputInvalid(f"{self.path.name}: no frames were written; a video needs at least one")
        try:
            self._mux(self._video.encode(None))
            if self._sound is not None:
                self._mux(self._sound.encode(None))
            self._closed = True
            self._container.close()
        except (FFmpegError, OSError, ValueError) as exc:
            self.abort()
            raise OutputInvalid(f"could not write {self.path.name}: {exc}") from exc
        logger.info(
            "wrote %s: %d frames at %d fps, %.2f s of audio",
            self.path,
            self._frames,
            self.fps,
            self._samples / self._sample_rate,
        )
        return self._frames

    def abort(self) -> None:
        """Close without finishing and remove the incomplete file."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except (FFmpegError, OSError, ValueError) as exc:
                logger.warning("closing the incomplete %s: %s", self.path.name, exc)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def video_frame(frame: np.ndarray, index: int, fps: int) -> av.VideoFrame:
    """The encoder's picture for uint8 RGB `frame`, stamped as frame `index` at `fps` (explicitly, not
    left for the encoder to guess)."""
    picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
    picture.pts, picture.time_base = index, Fraction(1, fps)
    return picture


def write_mp4(
    path: Path,
    frames: np.ndarray,
    audio: np.ndarray,
    sample_rate: int,
    fps: int = FPS,
    crf: int = VIDEO_CRF,
) -> None:
    """Write uint8 frames [N, H, W, 3] and a mono float soundtrack to `path` in one go (`Mp4Writer`)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise OutputInvalid(f"frames must be uint8 [N>0, H, W, 3]; got {frames.dtype} {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    with Mp4Writer(path, width, height, audio=audio, sample_rate=sample_rate, fps=fps, crf=crf) as writer:
        writer.write(frames)


def probe_mp4(path: Path) -> Mp4Info:
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
    except (FFmpegError, OSError, ValueError) as exc:
        raise OutputInvalid(f"{Path(path).name}: not a decodable video ({exc})") from exc
    if count == 0 or fps <= 0:
        raise OutputInvalid(f"{Path(path).name}: no decodable video frames")
    return Mp4Info(count, fps, width, height, count / fps, audio_s, has_audio)


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
    except (FFmpegError, OSError, ValueError) as exc:
        raise OutputInvalid(f"{Path(path).name}: not a decodable video ({exc})") from exc
    if not frames:
        raise OutputInvalid(f"{Path(path).name}: no decodable video frames")
    return np.stack(frames)
