"""The conditioning source of an InfiniteTalk job: an image, or a video read forward on the 25 fps timeline.

The clip loop asks for source frames by index on the output's 25 fps timeline (0, 72, 144, ... for the
reference frames, spec 4.4), in non-decreasing order. A video is decoded forward only, with PyAV (any
container and codec FFmpeg decodes, AV1 included through libdav1d, decoded directly: no transcode step as in
the reference, spec 4.5), holding the current frame and at most one frame ahead: memory does not grow with the
video's length, and nothing past the last index asked is decoded (beyond that one frame of look-ahead).

Two ways to map a timeline index `n` to a source frame (`FpsMode`):

* `resample` (default): the source frame shown at time `n / 25` s, by presentation timestamp: the last
  frame whose timestamp, counted from the first frame's, is <= n / 25. This is correct for any frame rate,
  variable frame rate and a start offset. It is a deliberate deviation from the reference: the reference
  never reads the source's frame rate and uses index `n` as the n-th source frame (spec 4.4), so on a 30 fps
  source its reference frames advance at 25/30 of real time and the scene lags behind the dubbed audio
  (after 60 s of output the reference is at source time 50 s); a 50 fps source runs twice as fast.
* `reference`: `n` is the n-th decoded frame, exactly as the reference reads frame indices with decord. Use
  it for parity with the reference on 25 fps sources, where both modes pick the same frames.

A source's length (`VideoInfo.source_frames`, `duration_s`) is what decodes, not what the container declares:
a browser's MediaRecorder WebM declares no duration, and a stream-copy cut (`ffmpeg -ss 0.9 -c copy`) keeps
the frames before the cut behind an edit list, declared in the frame count but never shown. For MP4/MOV and
Matroska/WebM the count is read from the packets without decoding (one packet a frame; packets the edit list
hides are flagged discard, as the decoder drops them): one pass over the file's packets, no decoding (see
`count_length`). Other containers (AVI, MPEG-TS/PS, Ogg), whose packets need not be whole frames, are decoded
to count, up to the length a caller asks (the worker's limit) and no further.

Past the source's end, the last frame is returned (held), as the reference does, and `held_from` records the
first timeline index that was past the end so the result can say so. Rotation metadata (the display matrix)
is applied: `size` and every frame are as displayed. An image is a one-frame source that is never "past the
end": a still is meant to be used for every clip.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, cast

import av
import numpy as np
from av.container import InputContainer
from av.error import FFmpegError
from av.sidedata.sidedata import SideDataContainer
from PIL import Image

from multitalk_worker.errors import InputTooLarge, InvalidInput, VideoDecodeFailed
from multitalk_worker.pipeline.image import load_image
from multitalk_worker.pipeline.request import DEFAULT_BACKGROUND, ImageOrientation
from multitalk_worker.timeline import FPS

logger = logging.getLogger(__name__)

FpsMode = Literal["resample", "reference"]
CountMethod = Literal["demux", "decode"]
# FFmpeg demuxers whose packets are whole coded frames, the edit list applied as discard flags (count_length).
PACKET_EXACT_FORMATS = frozenset({"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm"})
FPS_MODES: tuple[FpsMode, ...] = ("resample", "reference")
# Largest declared frame (width x height) a source video may have: 4096x2160 (DCI 4K). A frame is decoded
# and converted to RGB at full size before any resize, so this bounds the memory of one decoded frame.
MAX_VIDEO_PIXELS = 4096 * 2160
ACCEPTED = (
    "accepted: a video file FFmpeg decodes (mp4, mov, mkv, webm, avi, ... with H.264, H.265, VP9, AV1, ...) "
    "with at least one decodable frame"
)
_ERRORS = (FFmpegError, OSError, ValueError, EOFError)
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


class SourceFrames(Protocol):
    """What the clip loop reads: frames by 25 fps timeline index, asked in non-decreasing order."""

    still: bool  # every index gives the same frame (an image): frame 0, prepared once, serves every clip

    @property
    def size(self) -> tuple[int, int]: ...  # (height, width) of frame 0, rotation applied

    def frame(self, index: int) -> Image.Image: ...  # RGB; past the end: the last frame (held)

    @property
    def held_from(self) -> int | None: ...  # first index asked past the end; None if none so far

    def close(self) -> None: ...


@dataclass(frozen=True)
class VideoInfo:
    """A video's rate, its length as it decodes, and its first frame's displayed size."""

    source_fps: float  # the stream's average (else guessed) frame rate; else frames / duration
    source_frames: int  # frames that decode (the edit list applied); see `count_length`
    duration_s: float  # first frame's start to the last frame's end, as decoded
    width: int  # displayed width of frame 0 (rotation applied)
    height: int  # displayed height of frame 0 (rotation applied)
    rotation: int  # counter-clockwise degrees applied to the coded picture: 0, 90, 180 or 270
    codec: str  # FFmpeg decoder name, e.g. "h264", "libdav1d"
    timeline_frames: int  # frames of the 25 fps timeline the source covers before it is held
    counted_by: CountMethod = "demux"  # how the length was found: packets read, or frames decoded
    declared_frames: int = 0  # the container's own count (0: none declared)
    declared_duration_s: float = 0.0  # the container's own duration (0: none declared)
    complete: bool = True  # False: counting stopped past `max_seconds`; the source is at least this long


@dataclass(frozen=True)
class Length:
    """A video stream's length as it decodes: whole frames, and the span from the first frame's start to
    the last frame's end."""

    frames: int
    duration: Fraction
    counted_by: CountMethod
    complete: bool  # False: counting stopped past the caller's `max_seconds`


class ImageSource:
    """An image as a one-frame source: every index gives the image, never held past the end. `close()`
    drops the full-size image (prepare_inputs does, once frame 0 is prepared: no clip reads it again).
    `report`: how the file was read (pipeline/image.py `LoadedImage.report`)."""

    still = True

    def __init__(self, image: Image.Image, report: dict[str, object] | None = None) -> None:
        self._image: Image.Image | None = image if image.mode == "RGB" else image.convert("RGB")  # no copy
        self._size = (self._image.height, self._image.width)
        self.report = report or {}

    @property
    def size(self) -> tuple[int, int]:
        return self._size

    def frame(self, index: int) -> Image.Image:
        if index < 0:
            raise ValueError(f"frame index {index} is negative")
        if self._image is None:
            raise RuntimeError("the image source is closed; its frame 0 was prepared already")
        return self._image

    @property
    def held_from(self) -> int | None:
        return None

    def close(self) -> None:
        self._image = None


@dataclass(frozen=True)
class _Decoded:
    """One decoded frame: its decode-order index and its time from the first frame (in seconds)."""

    frame: av.VideoFrame
    index: int
    time: Fraction
    duration: Fraction


def _fail(path: Path, what: str) -> VideoDecodeFailed:
    return VideoDecodeFailed(f"{path.name}: {what}; {ACCEPTED}")


def _rotation(frame: av.VideoFrame, path: Path) -> int:
    """Counter-clockwise degrees of the display matrix; mirrored or oblique matrices are refused."""
    # av 18's frame.pyi types `side_data` as one SideData; it is the frame's container of them
    for data in cast(SideDataContainer, frame.side_data):
        if data.type.name == "DISPLAYMATRIX":
            a, b, _, c, d = np.frombuffer(bytes(data), dtype="<i4")[:5].astype(np.int64)
            if a * d - b * c < 0:
                raise InvalidInput(
                    f"{path.name}: its display matrix mirrors the picture; accepted: rotation metadata by a "
                    "multiple of 90 degrees without mirroring (re-encode the video without the flip)"
                )
    degrees = int(round(frame.rotation)) % 360
    if degrees not in (0, 90, 180, 270):
        raise InvalidInput(
            f"{path.name}: its rotation metadata is {degrees} degrees; accepted: multiples of 90 degrees"
        )
    return degrees


def _displayed(frame: av.VideoFrame, rotation: int) -> Image.Image:
    image = frame.to_image()  # RGB
    return image.transpose(_TRANSPOSE[rotation]) if rotation else image


def _declared(stream: av.VideoStream, container: InputContainer) -> tuple[Fraction, Fraction]:
    """(frame rate, duration in seconds) as declared; 0 where the container declares nothing."""
    rate = Fraction(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration and stream.time_base:
        duration = Fraction(stream.duration) * stream.time_base
    elif container.duration:
        duration = Fraction(container.duration, 1_000_000)  # AV_TIME_BASE
    elif stream.frames and rate:
        duration = stream.frames / rate
    else:
        duration = Fraction(0)
    return rate, duration


def _span(
    start: Fraction | None,
    end: Fraction | None,
    pts: int | None,
    duration: int | None,
    time_base: Fraction | None,
    step: Fraction,
) -> tuple[Fraction | None, Fraction | None]:
    """Widen (start, end) by a frame at `pts` lasting `duration` (else `step`); no pts or time base: no time
    added."""
    if pts is None or time_base is None:
        return start, end
    time = Fraction(pts) * time_base
    frame_end = time + (Fraction(duration) * time_base if duration else step)
    return (time if start is None else min(start, time)), (frame_end if end is None else max(end, frame_end))


def _count_packets(container: InputContainer, stream: av.VideoStream, step: Fraction) -> Length:
    """Frames and span from the packets alone: each non-empty packet not flagged discard is one frame."""
    frames, start, end = 0, None, None
    for packet in container.demux(stream):
        if not packet.size or packet.is_discard:
            continue  # the flush packet; a frame the edit list hides (the decoder drops it too)
        frames += 1
        start, end = _span(start, end, packet.pts, packet.duration, stream.time_base, step)
    span = end - start if start is not None and end is not None else frames * step
    return Length(frames, span, "demux", True)


def _count_decoded(
    container: InputContainer, stream: av.VideoStream, step: Fraction, max_seconds: float | None
) -> Length:
    """Frames and span by decoding, stopping at the first frame that starts past `max_seconds`."""
    frames, start, end = 0, None, None
    try:
        for frame in container.decode(stream):
            frames += 1
            start, end = _span(start, end, frame.pts, frame.duration, stream.time_base, step)
            if (
                max_seconds is not None
                and start is not None
                and end is not None
                and end - start > max_seconds + step
            ):
                return Length(frames, end - start, "decode", False)
    except _ERRORS as exc:  # as `_Opened.next`: a stream that breaks off ends there
        logger.warning("counting frames: decoding stopped after %d frames: %s", frames, exc)
    span = end - start if start is not None and end is not None else frames * step
    return Length(frames, span, "decode", True)


def count_length(path: Path, *, rate: Fraction = Fraction(0), max_seconds: float | None = None) -> Length:
    """The first video stream's length as it decodes (module docstring). `rate` (declared; 0: none) gives a
    frame that states no duration its length, else 1/25 s. Cost: for PACKET_EXACT_FORMATS one read of the
    file's packets, nothing decoded, whatever `max_seconds`; else a decode up to `max_seconds` (None: all)."""
    step = Fraction(1) / rate if rate else Fraction(1, FPS)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        formats = set(container.format.name.split(","))
        if formats & PACKET_EXACT_FORMATS:
            return _count_packets(container, stream, step)
        return _count_decoded(container, stream, step, max_seconds)


class _Opened:
    """An open container positioned after its first decoded frame; the shared start of probe and source."""

    def __init__(self, path: Path, max_pixels: int) -> None:
        self.path = Path(path)
        try:
            self.container = av.open(str(path))
        except _ERRORS as exc:
            raise _fail(self.path, f"not a readable video container ({exc})") from exc
        try:
            self._start(max_pixels)
        except BaseException:
            self.container.close()
            raise

    def _start(self, max_pixels: int) -> None:
        if not self.container.streams.video:
            kinds = sorted({s.type for s in self.container.streams}) or ["no streams"]
            raise _fail(self.path, f"has no video stream (it holds: {', '.join(kinds)})")
        self.stream = self.container.streams.video[0]
        width, height = self.stream.codec_context.width, self.stream.codec_context.height
        self._check_pixels(width, height, max_pixels, "declares")
        self.rate, self.duration = _declared(self.stream, self.container)
        self._frames: Iterator[av.VideoFrame] = self.container.decode(self.stream)
        self._start_pts: int | None = None
        self._last: _Decoded | None = None
        self.decoded = 0
        first = self.next()
        if first is None:
            raise _fail(self.path, "has a video stream but no decodable frame")
        self.first: _Decoded = first
        self._check_pixels(self.first.frame.width, self.first.frame.height, max_pixels, "decodes to")
        self.rotation = _rotation(self.first.frame, self.path)

    def _check_pixels(self, width: int, height: int, max_pixels: int, verb: str) -> None:
        if width * height > max_pixels:
            raise InputTooLarge(
                f"{self.path.name} {verb} {width}x{height} frames ({width * height} pixels); accepted: "
                f"at most {max_pixels} pixels per frame; scale the video down first",
                stage="input",
            )

    def next(self) -> _Decoded | None:
        """The next frame in presentation order, or None at the end (or where the stream breaks off)."""
        try:
            frame = next(self._frames)
        except StopIteration:
            return None
        except _ERRORS as exc:
            if self._last is None:
                raise _fail(self.path, f"its first frame does not decode ({exc})") from exc
            logger.warning("%s: decoding stopped after %d frames: %s", self.path.name, self.decoded, exc)
            return None
        # A frame's display time: its own duration, else one period of the declared rate, else 1/25 s. Only
        # the last frame's matters (it decides where "past the end" starts, hence `held_from`).
        step = Fraction(1) / self.rate if self.rate else Fraction(1, FPS)
        if frame.pts is None or frame.time_base is None:
            time = self._last.time + self._last.duration if self._last else Fraction(0)
        else:
            if self._start_pts is None:
                self._start_pts = frame.pts
            time = Fraction(frame.pts - self._start_pts) * frame.time_base
        duration = Fraction(frame.duration) * frame.time_base if frame.duration and frame.time_base else step
        self._last = _Decoded(frame, self.decoded, time, duration)
        self.decoded += 1
        return self._last

    def info(self, max_seconds: float | None = None) -> VideoInfo:
        """Rate, size and the length as it decodes (`count_length`, on a second handle of the file)."""
        try:
            length = count_length(self.path, rate=self.rate, max_seconds=max_seconds)
        except _ERRORS as exc:
            raise _fail(self.path, f"its frames cannot be counted ({exc})") from exc
        rate = self.rate or (length.frames / length.duration if length.duration else Fraction(0))
        width, height = self.first.frame.width, self.first.frame.height
        if self.rotation in (90, 270):
            width, height = height, width
        return VideoInfo(
            source_fps=float(rate),
            source_frames=length.frames,
            duration_s=float(length.duration),
            width=width,
            height=height,
            rotation=self.rotation,
            codec=self.stream.codec_context.name,
            timeline_frames=math.ceil(length.duration * FPS),
            counted_by=length.counted_by,
            declared_frames=self.stream.frames,
            declared_duration_s=float(self.duration),
            complete=length.complete,
        )


def probe_video(
    path: Path, *, max_pixels: int = MAX_VIDEO_PIXELS, max_seconds: float | None = None
) -> VideoInfo:
    """Open `path`, check it has a video stream of an accepted size, decode its first frame, and count its
    length as it decodes (`count_length`; a decoded count stops past `max_seconds`)."""
    opened = _Opened(Path(path), max_pixels)
    try:
        return opened.info(max_seconds)
    finally:
        opened.container.close()


class VideoSource:
    """A video read forward on the 25 fps timeline (module docstring); holds O(1) decoded frames."""

    still = False

    def __init__(
        self, path: Path, *, fps_mode: FpsMode = "resample", max_pixels: int = MAX_VIDEO_PIXELS
    ) -> None:
        if fps_mode not in FPS_MODES:
            raise InvalidInput(f"fps mode {fps_mode!r} is not accepted; use one of {list(FPS_MODES)}")
        self._opened = _Opened(Path(path), max_pixels)
        self.info = self._opened.info()
        self.fps_mode = fps_mode
        self._current: _Decoded = self._opened.first
        self._ahead: _Decoded | None = None  # resample mode: the frame after `_current`, once decoded
        self._ended = False
        self._asked = -1
        self._image: tuple[int, Image.Image] | None = None  # the last frame returned, by decode index
        self._held_from: int | None = None
        self._closed = False

    @property
    def size(self) -> tuple[int, int]:
        return self.info.height, self.info.width

    @property
    def held_from(self) -> int | None:
        return self._held_from

    @property
    def decoded_frames(self) -> int:
        """Frames decoded so far (the cost of the reads: never more than one past the last frame returned)."""
        return self._opened.decoded

    def frame(self, index: int) -> Image.Image:
        """The displayed RGB frame at timeline index `index` (module docstring for the two modes)."""
        if self._closed:
            raise ValueError("the video source is closed")
        if index < self._asked or index < 0:
            raise ValueError(f"frame {index} asked after frame {self._asked}: indices must not decrease")
        self._asked = index
        held = self._seek_index(index) if self.fps_mode == "reference" else self._seek_time(index)
        if held and self._held_from is None:
            self._held_from = index
            logger.info(
                "%s: timeline frame %d is past the source's end (%d frames decoded); holding its last frame",
                self._opened.path.name,
                index,
                self._opened.decoded,
            )
        return self._to_image(self._current)

    def _advance(self) -> bool:
        """Move `_current` one frame on; False at the end of the source."""
        following = self._ahead or (None if self._ended else self._opened.next())
        self._ahead = None
        if following is None:
            self._ended = True
            return False
        self._current = following
        return True

    def _seek_index(self, index: int) -> bool:
        while self._current.index < index:
            if not self._advance():
                return True
        return False

    def _seek_time(self, index: int) -> bool:
        """Move to the last frame with time <= index / FPS; True when that time is past the source's end."""
        target = Fraction(index, FPS)
        while True:
            if self._ahead is None and not self._ended:
                self._ahead = self._opened.next()
                self._ended = self._ahead is None
            if self._ahead is None or self._ahead.time > target:
                break
            self._advance()
        return self._ended and target >= self._current.time + self._current.duration

    def _to_image(self, decoded: _Decoded) -> Image.Image:
        if self._image is None or self._image[0] != decoded.index:
            self._image = (decoded.index, _displayed(decoded.frame, self._opened.rotation))
        return self._image[1]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ahead = self._image = None
            del self._current  # its decoded frame goes now, not with the source object
            self._opened.container.close()

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_source(
    path: Path,
    *,
    kind: Literal["image", "video"],
    fps_mode: FpsMode = "resample",
    max_pixels: int = MAX_VIDEO_PIXELS,
    orientation: ImageOrientation = "exif",
    background: str = DEFAULT_BACKGROUND,
) -> SourceFrames:
    """The conditioning source of a job: an image (`ImageSource`; `orientation` and `background` as
    `load_image`) or a video (`VideoSource`)."""
    if kind == "image":
        loaded = load_image(path, orientation=orientation, background=background)
        return ImageSource(loaded.image, loaded.report())
    if kind == "video":
        return VideoSource(path, fps_mode=fps_mode, max_pixels=max_pixels)
    raise InvalidInput(f"source kind {kind!r} is not accepted; use 'image' or 'video'")
