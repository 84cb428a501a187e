"""mp4 writing (H.264 + AAC, one pass, audio cut to the video) and reading back by decoding (spec 7)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from multitalk_worker.errors import OutputInvalid
from multitalk_worker.media import probe_video, read_frames, write_mp4

AAC_FRAME_S = 1024 / 16000  # decoded AAC may run up to one frame past the cut


def moving_frames(count: int, height: int = 32, width: int = 48) -> np.ndarray:
    """A smooth gradient moving one step per frame (compresses well, every frame different)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [((x * 4 + y * 2 + 6 * i) % 256).astype(np.uint8) for i in range(count)]
    return np.stack([np.stack([f, 255 - f, np.full_like(f, 128)], axis=-1) for f in frames])


def test_write_and_probe_round_trip(tmp_path: Path) -> None:
    frames = moving_frames(50)
    audio = (0.3 * np.sin(np.arange(48000) / 9)).astype(np.float32)  # 3 s: longer than the 2 s video
    path = tmp_path / "out.mp4"
    write_mp4(path, frames, audio, 16000)
    info = probe_video(path)
    assert (info.frames, info.fps, info.width, info.height) == (50, 25.0, 48, 32)
    assert info.duration_s == pytest.approx(2.0)
    assert info.has_audio and 2.0 - 1e-6 <= info.audio_duration_s <= 2.0 + AAC_FRAME_S
    decoded = read_frames(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 8  # lossy, but the same pictures
    assert not (decoded == decoded[0]).all()


def test_shorter_audio_is_kept_whole(tmp_path: Path) -> None:
    path = tmp_path / "short_audio.mp4"
    write_mp4(path, moving_frames(50), np.zeros(8000, np.float32), 16000)
    info = probe_video(path)
    assert info.frames == 50 and info.audio_duration_s == pytest.approx(0.5, abs=AAC_FRAME_S)


def test_bad_frames_and_files_raise_output_invalid(tmp_path: Path) -> None:
    audio = np.zeros(16000, np.float32)
    with pytest.raises(OutputInvalid, match="uint8"):
        write_mp4(tmp_path / "a.mp4", moving_frames(3).astype(np.float32), audio, 16000)
    with pytest.raises(OutputInvalid, match="even"):
        write_mp4(tmp_path / "b.mp4", moving_frames(3, 31, 48), audio, 16000)
    with pytest.raises(OutputInvalid, match="could not write"):
        write_mp4(tmp_path / "missing" / "c.mp4", moving_frames(3), audio, 16000)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01" * 500)
    with pytest.raises(OutputInvalid, match="garbage.mp4"):
        probe_video(garbage)
    with pytest.raises(OutputInvalid):
        read_frames(garbage)


def test_crf_0_is_lossless_and_out_of_range_crf_is_refused(tmp_path: Path) -> None:
    """crf 0 decodes to exactly the yuv420p pictures of the frames (the two-process tests compare videos
    this way: at the default crf, x264 gave 2-6 different bitstreams for the same 48x64 frames in 40
    encodes on a busy CPU, which no tolerance on the frames could separate from a wrong result)."""
    frames = moving_frames(20, 64, 48)
    write_mp4(tmp_path / "lossless.mp4", frames, np.zeros(20 * 640, np.float32), 16000, crf=0)
    write_mp4(tmp_path / "default.mp4", frames, np.zeros(20 * 640, np.float32), 16000)
    expected = [
        av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray() for f in frames
    ]
    for name, exact in (("lossless.mp4", True), ("default.mp4", False)):
        with av.open(str(tmp_path / name)) as container:
            decoded = [f.to_ndarray() for f in container.decode(video=0)]
        assert len(decoded) == 20
        assert all(np.array_equal(d, e) for d, e in zip(decoded, expected, strict=True)) is exact, name
    with pytest.raises(OutputInvalid, match="crf 52 is out of range"):
        write_mp4(tmp_path / "bad.mp4", frames, np.zeros(20 * 640, np.float32), 16000, crf=52)
