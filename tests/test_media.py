"""mp4 writing (H.264 + AAC, one pass, audio cut to the video) and reading back by decoding (spec 7)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from multitalk_worker.errors import OutputInvalid
from multitalk_worker.media import Mp4Writer, probe_mp4, read_frames, write_mp4
from tests.memory import run_for_peaks

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
    info = probe_mp4(path)
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
    info = probe_mp4(path)
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
        probe_mp4(garbage)
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


def yuv420(frames: np.ndarray) -> list[np.ndarray]:
    return [
        av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray() for f in frames
    ]


def decoded_audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])


def test_writer_streams_chunks_into_the_same_video_as_one_write(tmp_path: Path) -> None:
    """Clip-sized chunks in, lossless: exactly the yuv420p pictures, and the audio a one-go write gives."""
    frames = moving_frames(190, 32, 48)
    audio = (0.3 * np.sin(np.arange(8 * 16000) / 9)).astype(np.float32)  # 8 s: longer than the 7.6 s video
    with Mp4Writer(tmp_path / "chunks.mp4", 48, 32, audio=audio, sample_rate=16000, crf=0) as writer:
        for start, stop in ((0, 81), (81, 82), (82, 153), (153, 190)):  # clips of 81, 1, 71 and 37 frames
            writer.write(frames[start:stop])
        assert writer.frames_written == 190
    write_mp4(tmp_path / "whole.mp4", frames, audio, 16000, crf=0)
    info = probe_mp4(tmp_path / "chunks.mp4")
    assert (info.frames, info.fps, info.width, info.height) == (190, 25.0, 48, 32)
    assert 7.6 - 1e-6 <= info.audio_duration_s <= 7.6 + AAC_FRAME_S
    with av.open(str(tmp_path / "chunks.mp4")) as container:
        decoded = [f.to_ndarray() for f in container.decode(video=0)]
    assert all(np.array_equal(d, e) for d, e in zip(decoded, yuv420(frames), strict=True))
    chunked, whole = decoded_audio(tmp_path / "chunks.mp4"), decoded_audio(tmp_path / "whole.mp4")
    assert chunked.shape == whole.shape and np.array_equal(chunked, whole)
    assert 0.25 < np.abs(chunked).max() < 0.35  # the sine's sound, not silence


def test_writer_refuses_bad_chunks_and_leaves_no_partial_file(tmp_path: Path) -> None:
    audio = np.zeros(16000, np.float32)
    path = tmp_path / "a.mp4"
    writer = Mp4Writer(path, 48, 32, audio=audio, sample_rate=16000)
    with pytest.raises(OutputInvalid, match=r"uint8 \[n, 32, 48, 3\]"):
        writer.write(moving_frames(2, 32, 50))
    with pytest.raises(OutputInvalid, match="no frames were written"):
        writer.close()
    assert not path.exists()
    with (
        pytest.raises(RuntimeError, match="clip failed"),
        Mp4Writer(path, 48, 32, audio=audio, sample_rate=16000) as w,
    ):
        w.write(moving_frames(3, 32, 48))
        raise RuntimeError("clip failed")
    assert not path.exists()
    with pytest.raises(OutputInvalid, match="even"):
        Mp4Writer(path, 47, 32, audio=audio, sample_rate=16000)
    with pytest.raises(OutputInvalid, match="mono"):
        Mp4Writer(path, 48, 32, audio=audio.reshape(2, -1), sample_rate=16000)
    assert not path.exists()


PEAK_RSS = """
import sys
from pathlib import Path
import numpy as np
from multitalk_worker.media import Mp4Writer
frames, longest = int(sys.argv[1]), 800
audio = (0.3 * np.sin(np.arange(longest * 640, dtype=np.float32) / 9)).astype(np.float32)  # the same in both
y, x = np.mgrid[0:64, 0:64]
base = peak_kb()
with Mp4Writer(Path(sys.argv[2]), 64, 64, audio=audio, sample_rate=16000) as writer:
    for start in range(0, frames, 72):
        stop = min(frames, start + 72)
        grey = [((x * 4 + y * 2 + 6 * i) % 256).astype(np.uint8) for i in range(start, stop)]
        writer.write(np.repeat(np.stack(grey)[..., None], 3, axis=-1))
print(base, peak_kb())
"""


def test_writer_memory_is_flat_in_the_length(tmp_path: Path) -> None:
    """Peak RSS writing 800 frames in 72-frame chunks is that of 80 frames, within 10%, and what the writer
    adds to the process (peak minus the RSS before it opens) differs by less than 3 MB. Keeping the long
    video's frames would add 800 x 64 x 64 x 3 B = 9.8 MB."""
    bases, peaks = {}, {}
    for frames in (80, 800):
        bases[frames], peaks[frames] = run_for_peaks(PEAK_RSS, str(frames), str(tmp_path / f"{frames}.mp4"))
        assert probe_mp4(tmp_path / f"{frames}.mp4").frames == frames
    assert peaks[800] <= 1.1 * peaks[80], peaks
    assert (peaks[800] - bases[800]) - (peaks[80] - bases[80]) < 3 * 1024, (bases, peaks)
