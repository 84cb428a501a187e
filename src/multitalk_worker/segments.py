"""A video made clip by clip as H.264 segments on disk, assembled into one mp4 with its soundtrack.

Each clip's final frames are encoded as a segment of their own (`NNNNN.mp4`, video only, a fresh libx264
encoder at the job's CRF, so each starts with a keyframe and depends on no other). `assemble` remuxes the
segments' packets, without re-encoding, into one mp4 and encodes the soundtrack alongside, cut at the
frames' end as `Mp4Writer` does. Because a segment never depends on what came before it, a job resumed
after clip k (pipeline/checkpoint.py) writes the same bytes as one that never stopped, and the part made so
far can be assembled at any time (the local API's `/jobs/{id}/video` while a job runs).

libx264 emits B-frames, so each segment's decode timestamps start two frames before 0; shifted by the
frames before it, they still rise across segments (the last packet of a segment of n frames is decoded at
n − 3, the next segment's first at n − 2), so the muxer takes them as they are.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import av
import numpy as np
from av.error import FFmpegError

from multitalk_worker.errors import OutputInvalid
from multitalk_worker.media import VIDEO_CRF, Mp4Writer, video_frame, x264_options
from multitalk_worker.pipeline.request import VideoSpec

logger = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".mp4"
SOUNDTRACK_NAME = "soundtrack.f32"  # the job's soundtrack, raw float32 mono, written when the sink opens
SPEC_NAME = "spec.json"  # the video's size, length, fps and sample rate, written after the soundtrack


def segment_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}{SEGMENT_SUFFIX}"


def encode_segment(path: Path, frames: np.ndarray, fps: int, crf: int) -> None:
    """uint8 frames [n, H, W, 3] -> a video-only H.264 mp4 at `path`, written to a temporary name first and
    renamed, so that `path` exists only when complete."""
    height, width = frames.shape[1:3]
    partial = path.with_suffix(".partial")
    try:
        with av.open(str(partial), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps, options=x264_options(crf))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for index, frame in enumerate(frames):
                container.mux(stream.encode(video_frame(frame, index, fps)))
            container.mux(stream.encode(None))
    except (FFmpegError, OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise OutputInvalid(f"could not write segment {path.name}: {exc}") from exc
    os.replace(partial, path)


class ClipSegments:
    """The pipeline's `FrameSink` into segment files in `folder`: one segment per `write` (one clip).
    Segments already in the folder (a resumed job's) are kept and counted; `write` adds the next one.
    `encode_s`: the seconds spent encoding in this process."""

    def __init__(self, folder: Path, crf: int = VIDEO_CRF) -> None:
        if not 0 <= crf <= 51:
            raise OutputInvalid(f"crf {crf} is out of range; accepted: 0 (lossless) to 51")
        self.folder, self.crf = Path(folder), crf
        self.folder.mkdir(parents=True, exist_ok=True)
        # a folder that a sink opened before (a resumed job's, or another process's) has its spec on disk
        self.spec: VideoSpec | None = load_spec(self.folder) if (self.folder / SPEC_NAME).exists() else None
        self.encode_s = 0.0
        self.frame_counts: list[int] = [_segment_frames(p) for p in self.paths()]

    def paths(self) -> list[Path]:
        """The complete segments, in order."""
        found = sorted(self.folder.glob(f"*{SEGMENT_SUFFIX}"))
        return [p for i, p in enumerate(found) if p == segment_path(self.folder, i)]

    @property
    def frames_written(self) -> int:
        return sum(self.frame_counts)

    def keep(self, count: int) -> None:
        """Keep the first `count` segments and delete any after them (a clip encoded after the last
        checkpoint was saved is made again)."""
        for path in self.paths()[count:]:
            path.unlink()
        for stray in self.folder.glob("*.partial"):
            stray.unlink()
        if len(self.paths()) < count:
            raise OutputInvalid(f"{self.folder}: {count} segments expected, {len(self.paths())} found")
        self.frame_counts = self.frame_counts[:count]

    def open(self, spec: VideoSpec) -> None:
        """Take the video's spec and keep it, soundtrack included, in the folder (`save_spec`), so that any
        process can assemble the finished segments with their audio (`assemble_part`)."""
        if spec.height % 2 or spec.width % 2:
            raise OutputInvalid(f"frame size {spec.width}x{spec.height} must be even for yuv420p")
        save_spec(self.folder, spec)
        self.spec = spec

    def write(self, frames: np.ndarray) -> None:
        spec = self._spec()
        expected = (spec.height, spec.width, 3)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != expected or not len(frames):
            raise OutputInvalid(
                f"frames must be uint8 [n>0, {spec.height}, {spec.width}, 3]; got {frames.shape}"
            )
        start = time.perf_counter()
        encode_segment(segment_path(self.folder, len(self.frame_counts)), frames, spec.fps, self.crf)
        self.frame_counts.append(len(frames))
        self.encode_s += time.perf_counter() - start

    def assemble(self, path: Path, segments: int | None = None) -> int:
        """Write the first `segments` segments (default: all) and the soundtrack up to their end as one mp4
        at `path`; returns its frame count."""
        spec = self._spec()
        start = time.perf_counter()
        frames = assemble(path, self.paths()[:segments], spec.audio, spec.sample_rate, spec.fps)
        self.encode_s += time.perf_counter() - start
        return frames

    def _spec(self) -> VideoSpec:
        if self.spec is None:
            raise OutputInvalid("the segment sink was not opened")
        return self.spec


def save_spec(folder: Path, spec: VideoSpec) -> None:
    """Write `spec` to `folder`: the soundtrack as raw float32 (`soundtrack.f32`), then the rest as
    `spec.json`; each under a temporary name, renamed when complete, the json last, so that a folder with
    a `spec.json` always has its whole soundtrack."""
    audio = np.ascontiguousarray(spec.audio, dtype="<f4")
    fields = {
        "width": spec.width,
        "height": spec.height,
        "frames": spec.frames,
        "fps": spec.fps,
        "sample_rate": spec.sample_rate,
        "samples": int(audio.size),
    }
    _write_atomic(folder / SOUNDTRACK_NAME, audio.tobytes())
    _write_atomic(folder / SPEC_NAME, json.dumps(fields).encode())


def load_spec(folder: Path) -> VideoSpec:
    """The spec `save_spec` wrote to `folder`; `OutputInvalid` when it is missing or damaged."""
    try:
        fields = json.loads((Path(folder) / SPEC_NAME).read_text())
        audio = np.fromfile(Path(folder) / SOUNDTRACK_NAME, dtype="<f4")
        spec = VideoSpec(
            int(fields["width"]),
            int(fields["height"]),
            int(fields["frames"]),
            int(fields["fps"]),
            audio.astype(np.float32),
            int(fields["sample_rate"]),
        )
        samples = int(fields["samples"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputInvalid(
            f"{folder}: no readable video spec ({SPEC_NAME}, {SOUNDTRACK_NAME}): {exc}"
        ) from exc
    if audio.size != samples:
        raise OutputInvalid(f"{folder}: soundtrack has {audio.size} samples, {SPEC_NAME} says {samples}")
    return spec


def assemble_part(folder: Path, path: Path, segments: int | None = None) -> tuple[int, int]:
    """The part made so far from a segment folder alone (any process, while the job runs): the first
    `segments` complete segments (default: all) and the soundtrack up to their end, as one mp4 at `path`.
    Returns (segments, frames)."""
    sink = ClipSegments(folder)
    if sink.spec is None:
        raise OutputInvalid(f"{folder}: no {SPEC_NAME}; the segment sink was never opened there")
    count = len(sink.frame_counts) if segments is None else min(segments, len(sink.frame_counts))
    return count, sink.assemble(path, count)


def segment_count(folder: Path) -> int:
    """How many complete segments `folder` holds (0 when it does not exist); cheap: names only."""
    if not Path(folder).is_dir():
        return 0
    found = sorted(Path(folder).glob(f"*{SEGMENT_SUFFIX}"))
    return sum(1 for i, p in enumerate(found) if p == segment_path(Path(folder), i))


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def assemble(path: Path, segments: list[Path], audio: np.ndarray, sample_rate: int, fps: int) -> int:
    """Remux the H.264 packets of `segments` (in order, timestamps shifted by the frames before each) into
    one mp4 at `path` with the soundtrack encoded alongside (`Mp4Writer`'s audio: cut at N / fps seconds).
    Returns the frame count. The file is written under a temporary name and renamed when complete."""
    if not segments:
        raise OutputInvalid(f"{path.name}: no segments to assemble; a video needs at least one frame")
    partial = path.with_name(path.name + ".partial")
    try:
        frames = _remux(partial, segments, audio, sample_rate, fps)
    except (FFmpegError, OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise OutputInvalid(f"could not write {path.name}: {exc}") from exc
    os.replace(partial, path)
    logger.info("assembled %s: %d frames from %d segments", path, frames, len(segments))
    return frames


def _remux(path: Path, segments: list[Path], audio: np.ndarray, sample_rate: int, fps: int) -> int:
    with av.open(str(segments[0])) as first, av.open(str(path), mode="w", format="mp4") as out:
        video = out.add_stream_from_template(first.streams.video[0])
        sound = Mp4Writer.add_audio(out, sample_rate) if audio.size else None
        frames, sent = 0, 0
        for segment in segments:
            with av.open(str(segment)) as source:
                stream = source.streams.video[0]
                if stream.time_base is None:
                    raise ValueError(f"segment {segment.name} has no time base")
                ticks_per_frame = 1 / (stream.time_base * fps)  # exact: time bases are 1/(k*fps)
                offset = int(frames * ticks_per_frame)
                count = 0
                for packet in source.demux(stream):
                    if packet.dts is None or packet.pts is None:  # the demuxer's end-of-stream marker
                        continue
                    packet.pts, packet.dts = packet.pts + offset, packet.dts + offset
                    packet.stream = video
                    out.mux(packet)
                    count += 1
                frames += count
            if sound is not None:
                sent = Mp4Writer.encode_audio(out, sound, audio, sent, round(frames * sample_rate / fps))
        if sound is not None:
            out.mux(sound.encode(None))
    return frames


def _segment_frames(path: Path) -> int:
    """The frame count of a segment we wrote (its packets: one per frame)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.dts is not None)
