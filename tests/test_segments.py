"""segments.py: clips as H.264 segments, assembled into one mp4 that decodes to the same frames and soundtrack
as the segments, the same bytes however the writing was split across processes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from multitalk_worker.errors import OutputInvalid
from multitalk_worker.media import probe_mp4, read_frames
from multitalk_worker.pipeline.request import VideoSpec
from multitalk_worker.segments import (
    SOUNDTRACK_NAME,
    SPEC_NAME,
    ClipSegments,
    assemble_part,
    load_spec,
    segment_count,
    segment_path,
)

FPS, RATE = 25, 16_000
CLIPS = ((0, 81), (81, 153), (153, 180))


def moving(count: int) -> np.ndarray:
    """A gradient that moves one pixel a frame: compressible, every frame different."""
    x = np.arange(64)[None, None, :] + np.arange(count)[:, None, None]
    y = np.arange(48)[None, :, None] * 3
    gray = ((x * 4 + y) % 256).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


FRAMES = moving(180)
AUDIO = np.sin(np.arange(180 * RATE // FPS) * 2 * np.pi * 440 / RATE).astype(np.float32) * 0.3


def spec() -> VideoSpec:
    return VideoSpec(64, 48, len(FRAMES), FPS, AUDIO, RATE)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_assembled_video_has_every_frame_and_the_soundtrack(tmp_path: Path) -> None:
    sink = ClipSegments(tmp_path / "seg", crf=0)
    sink.open(spec())
    for first, last in CLIPS:
        sink.write(FRAMES[first:last])
    assert sink.frame_counts == [81, 72, 27]
    assert sink.assemble(tmp_path / "out.mp4") == 180
    info = probe_mp4(tmp_path / "out.mp4")
    assert (info.frames, info.width, info.height, info.fps) == (180, 64, 48, 25.0)
    assert info.has_audio and abs(info.audio_duration_s - 7.2) < 0.07
    decoded = read_frames(tmp_path / "out.mp4")
    # crf 0 is lossless in yuv420p: a gray picture comes back within the RGB<->YUV rounding
    assert np.abs(decoded.astype(int) - FRAMES.astype(int)).max() <= 2


def test_a_sink_reopened_on_its_folder_writes_the_same_bytes(tmp_path: Path) -> None:
    whole = ClipSegments(tmp_path / "a")
    whole.open(spec())
    for first, last in CLIPS:
        whole.write(FRAMES[first:last])
    whole.assemble(tmp_path / "a.mp4")

    first = ClipSegments(tmp_path / "b")
    first.open(spec())
    first.write(FRAMES[0:81])
    first.write(FRAMES[81:153])
    first.write(FRAMES[153:180])  # written after the last checkpoint: made again on resume
    resumed = ClipSegments(tmp_path / "b")  # another process, after the first was killed
    assert resumed.frame_counts == [81, 72, 27]
    resumed.keep(2)
    assert resumed.frames_written == 153 and not segment_path(tmp_path / "b", 2).exists()
    resumed.write(FRAMES[153:180])  # not opened again: the spec and soundtrack come from the folder
    resumed.assemble(tmp_path / "b.mp4")
    assert sha(tmp_path / "a.mp4") == sha(tmp_path / "b.mp4")


def test_the_part_so_far_is_a_playable_video_with_its_audio(tmp_path: Path) -> None:
    sink = ClipSegments(tmp_path / "seg")
    sink.open(spec())
    sink.write(FRAMES[0:81])
    sink.write(FRAMES[81:153])
    assert sink.assemble(tmp_path / "part.mp4", segments=1) == 81
    info = probe_mp4(tmp_path / "part.mp4")
    assert info.frames == 81 and abs(info.audio_duration_s - 81 / FPS) < 0.07


def test_bad_frames_and_missing_segments_are_refused(tmp_path: Path) -> None:
    sink = ClipSegments(tmp_path / "seg")
    with pytest.raises(OutputInvalid, match="not opened"):
        sink.write(FRAMES[:3])
    sink.open(spec())
    with pytest.raises(OutputInvalid, match="uint8"):
        sink.write(FRAMES[:3].astype(np.float32))
    with pytest.raises(OutputInvalid, match="no segments"):
        sink.assemble(tmp_path / "out.mp4")
    with pytest.raises(OutputInvalid, match="2 segments expected"):
        sink.keep(2)
    with pytest.raises(OutputInvalid, match="crf"):
        ClipSegments(tmp_path / "x", crf=52)


def test_the_part_so_far_from_the_folder_alone(tmp_path: Path) -> None:
    """Another process (the local API's /video) assembles the finished segments with their soundtrack from
    what the sink left in its folder: the same bytes the writing sink assembles."""
    sink = ClipSegments(tmp_path / "seg")
    sink.open(spec())
    assert segment_count(tmp_path / "seg") == 0 and segment_count(tmp_path / "none") == 0
    sink.write(FRAMES[0:81])
    sink.write(FRAMES[81:153])
    assert segment_count(tmp_path / "seg") == 2
    assert assemble_part(tmp_path / "seg", tmp_path / "part.mp4") == (2, 153)
    sink.assemble(tmp_path / "own.mp4")
    assert sha(tmp_path / "part.mp4") == sha(tmp_path / "own.mp4")
    info = probe_mp4(tmp_path / "part.mp4")
    assert info.frames == 153 and info.has_audio and abs(info.audio_duration_s - 153 / FPS) < 0.07
    loaded = load_spec(tmp_path / "seg")
    assert (loaded.width, loaded.height, loaded.frames, loaded.fps, loaded.sample_rate) == (
        64,
        48,
        180,
        FPS,
        RATE,
    )
    assert np.array_equal(loaded.audio, AUDIO)


def test_a_damaged_or_missing_spec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputInvalid, match="never opened"):
        assemble_part(tmp_path / "seg", tmp_path / "part.mp4")
    sink = ClipSegments(tmp_path / "seg")
    sink.open(spec())
    sink.write(FRAMES[0:81])
    (tmp_path / "seg" / SOUNDTRACK_NAME).write_bytes(b"\0" * 8)
    with pytest.raises(OutputInvalid, match="2 samples"):
        assemble_part(tmp_path / "seg", tmp_path / "part.mp4")
    (tmp_path / "seg" / SPEC_NAME).write_text("{")
    with pytest.raises(OutputInvalid, match="no readable video spec"):
        load_spec(tmp_path / "seg")
