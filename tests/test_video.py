"""Source frames of an InfiniteTalk job (pipeline/video.py): frame picking on the 25 fps timeline, rotation,
AV1, typed errors and flat memory, on videos written here with PyAV whose frame i shows the number i."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from multitalk_worker.errors import ImageDecodeFailed, InputTooLarge, InvalidInput, VideoDecodeFailed
from multitalk_worker.pipeline.video import (
    ImageSource,
    VideoSource,
    open_source,
    probe_video,
)
from tests.media_files import (
    audio_only_file,
    browser_webm,
    number_picture,
    read_number,
    stream_copy_cut,
    write_video,
)
from tests.memory import run_for_peaks


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "25fps_400": write_video(root / "a.mp4", 400, 25),
        "30fps_100": write_video(root / "b.mp4", 100, 30),
    }


def test_frames_encode_their_numbers(videos: dict[str, Path]) -> None:
    with av.open(str(videos["25fps_400"])) as container:
        numbers = [read_number(f.to_image()) for f in container.decode(video=0)]
    assert numbers == list(range(400))


def test_reference_mode_reads_frame_indices_and_holds_the_last(videos: dict[str, Path]) -> None:
    with VideoSource(videos["25fps_400"], fps_mode="reference") as source:
        assert source.size == (64, 64)
        picked = [read_number(source.frame(72 * k)) for k in range(7)]  # 0 .. 432
        assert picked == [0, 72, 144, 216, 288, 360, 399]
        assert source.held_from == 432
    with VideoSource(videos["30fps_100"], fps_mode="reference") as source:
        picked = [read_number(source.frame(72 * k)) for k in range(4)]
        assert picked == [0, 72, 99, 99]  # the reference's index reading: it drifts on 30 fps (module doc)
        assert source.held_from == 144


def test_resample_mode_picks_by_time_on_30_fps(videos: dict[str, Path]) -> None:
    info = probe_video(videos["30fps_100"])
    assert (info.source_fps, info.source_frames, info.codec) == (30.0, 100, "h264")
    assert info.duration_s == pytest.approx(100 / 30) and info.timeline_frames == 84  # ceil(100 / 30 * 25)
    with VideoSource(videos["30fps_100"]) as source:
        picked = [read_number(source.frame(n)) for n in range(84)]
        assert picked == [n * 30 // 25 for n in range(84)]  # the frame shown at n / 25 s
        assert source.held_from is None
        assert read_number(source.frame(84)) == 99 and source.held_from == 84
        assert read_number(source.frame(500)) == 99 and source.held_from == 84


def test_both_modes_agree_on_a_25_fps_source(videos: dict[str, Path]) -> None:
    with (
        VideoSource(videos["25fps_400"]) as by_time,
        VideoSource(videos["25fps_400"], fps_mode="reference") as by_index,
    ):
        for n in range(0, 420, 3):
            assert read_number(by_time.frame(n)) == read_number(by_index.frame(n)) == min(n, 399)
        assert by_time.held_from == by_index.held_from == 402  # first index asked >= 400


def test_resample_follows_timestamps_of_variable_rate_and_offset_start(tmp_path: Path) -> None:
    gaps = [40, 40, 120, 10, 30, 200, 40, 60, 15, 25] * 4
    times = [500 + sum(gaps[:i]) for i in range(len(gaps))]  # starts at 0.5 s: counted from frame 0
    path = write_video(tmp_path / "vfr.mp4", len(times), times_ms=times)
    with VideoSource(path) as source:
        for n in range(0, 100):
            expected = max(j for j, t in enumerate(times) if t - times[0] <= n * 40)
            assert read_number(source.frame(n)) == expected, n


def test_decodes_only_as_far_as_asked(videos: dict[str, Path]) -> None:
    with VideoSource(videos["25fps_400"], fps_mode="reference") as source:
        source.frame(0)
        assert source.decoded_frames == 1
        source.frame(72)
        assert source.decoded_frames == 73
    with VideoSource(videos["25fps_400"]) as source:
        source.frame(72)
        assert source.decoded_frames == 74  # one frame of look-ahead: the next frame's timestamp
        source.frame(72)
        with pytest.raises(ValueError, match="must not decrease"):
            source.frame(71)


def marked_picture(height: int, width: int) -> np.ndarray:
    picture = np.zeros((height, width, 3), np.uint8)
    picture[: height // 2, : width // 4] = 255  # a white block in the coded top-left corner
    return picture


@pytest.mark.parametrize(
    ("degrees", "corner"),
    [(90, "bottom-left"), (180, "bottom-right"), (-90, "top-right"), (0, "top-left")],
)
def test_rotation_metadata_is_applied(tmp_path: Path, degrees: int, corner: str) -> None:
    """`degrees` counter-clockwise: the coded top-left corner lands where a player shows it."""
    path = write_video(tmp_path / "r.mp4", 3, pictures=[marked_picture(32, 64)] * 3, rotation=degrees)
    info = probe_video(path)
    assert info.rotation == degrees % 360
    turned = degrees % 180 != 0
    assert (info.height, info.width) == ((64, 32) if turned else (32, 64))
    with VideoSource(path) as source:
        assert source.size == (info.height, info.width)
        pixels = np.asarray(source.frame(0).convert("L"))
    assert pixels.shape == source.size
    h, w = pixels.shape
    corners = {
        "top-left": pixels[: h // 8, : w // 8],
        "top-right": pixels[: h // 8, -w // 8 :],
        "bottom-left": pixels[-h // 8 :, : w // 8],
        "bottom-right": pixels[-h // 8 :, -w // 8 :],
    }
    assert {name for name, block in corners.items() if block.mean() > 200} == {corner}


def test_mirrored_display_matrix_is_refused(tmp_path: Path) -> None:
    path = write_video(tmp_path / "m.mp4", 2, pictures=[marked_picture(32, 64)] * 2, rotation=0, hflip=True)
    with pytest.raises(InvalidInput, match="mirrors the picture"):
        probe_video(path)


def test_av1_is_decoded_directly(tmp_path: Path) -> None:
    decoders = {"libdav1d", "libaom-av1"} & av.codecs_available
    encoders = [name for name in ("libsvtav1", "libaom-av1") if _can_encode(name)]
    if not decoders or not encoders:
        pytest.skip(f"this PyAV build has no AV1 decoder ({sorted(decoders)}) or encoder ({encoders})")
    path = write_video(tmp_path / "av1.mkv", 30, 25, codec=encoders[0])
    info = probe_video(path)
    assert info.codec in decoders and info.timeline_frames == 30
    with VideoSource(path, fps_mode="reference") as source:
        assert [read_number(source.frame(n)) for n in (0, 13, 29)] == [0, 13, 29]


def _can_encode(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        return False
    return True


def test_image_is_a_one_frame_source_never_held(tmp_path: Path) -> None:
    path = tmp_path / "still.png"
    Image.fromarray(number_picture(1234)[:48]).save(path)
    source = open_source(path, kind="image")
    assert isinstance(source, ImageSource) and source.size == (48, 64)
    assert all(source.frame(n) is source.frame(0) for n in (0, 72, 10_000))
    assert source.held_from is None and source.still
    rgb = Image.new("RGB", (8, 6))
    assert ImageSource(rgb).frame(0) is rgb  # an RGB picture is not copied (36 MP: 108 MB)
    source.close()  # prepare_inputs does, once frame 0 is prepared: the full-size picture is dropped
    assert source.size == (48, 64)
    with pytest.raises(RuntimeError, match="closed"):
        source.frame(72)
    garbage = tmp_path / "bad.png"
    garbage.write_bytes(b"not a png")
    with pytest.raises(ImageDecodeFailed):
        open_source(garbage, kind="image")


def test_bad_videos_raise_typed_errors(tmp_path: Path, videos: dict[str, Path]) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01" * 500)
    whole = videos["30fps_100"].read_bytes()
    truncated = tmp_path / "truncated.mp4"  # mp4 with its index (moov) at the end, cut in half
    truncated.write_bytes(whole[: len(whole) // 2])
    cases = [
        (garbage, "not a readable video container"),
        (audio_only_file(tmp_path / "speech.m4a", "mp4"), "has no video stream"),
        (audio_only_file(tmp_path / "zero.mkv", "matroska", empty_video=True), "no decodable frame"),
        (truncated, "not a readable video container"),
        (tmp_path / "missing.mp4", "not a readable video container"),
    ]
    for path, message in cases:
        for read in (probe_video, VideoSource, lambda p: open_source(p, kind="video")):
            with pytest.raises(VideoDecodeFailed, match=message) as caught:
                read(path)
            assert caught.value.code == "VIDEO_DECODE_FAILED" and caught.value.stage == "input"
            assert "accepted:" in caught.value.message and not caught.value.retryable


def _faststart(path: Path, count: int) -> bytes:
    """An mp4 with its index (moov) before the media data, as streaming files are written."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast", "crf": "0"})
        stream.width = stream.height = 64
        for i in range(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(number_picture(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path.read_bytes()


def test_first_frame_that_does_not_decode(tmp_path: Path) -> None:
    """The index is there, the media data cut right after its header: no picture decodes."""
    path = tmp_path / "cut.mp4"
    data = _faststart(path, 10)
    path.write_bytes(data[: data.find(b"mdat") + 20])
    with pytest.raises(VideoDecodeFailed, match="first frame does not decode"):
        probe_video(path)


def test_a_stream_cut_midway_ends_there_and_is_held(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "half.mp4"
    data = _faststart(path, 100)
    path.write_bytes(data[: len(data) // 2])
    with VideoSource(path, fps_mode="reference") as source:
        assert read_number(source.frame(10)) == 10
        last = read_number(source.frame(99))
        assert 10 < last < 99 and source.held_from == 99
    assert f"decoding stopped after {last + 1} frames" in caplog.text


def test_frame_size_is_refused_before_decoding(videos: dict[str, Path]) -> None:
    with pytest.raises(InputTooLarge, match="declares 64x64 frames") as caught:
        VideoSource(videos["30fps_100"], max_pixels=64 * 63)
    assert caught.value.stage == "input"
    assert probe_video(videos["30fps_100"], max_pixels=64 * 64).width == 64
    with pytest.raises(InvalidInput, match="fps mode"):
        VideoSource(videos["30fps_100"], fps_mode="nearest")  # type: ignore[arg-type]


PEAK_RSS = """
import sys
from fractions import Fraction
from pathlib import Path
from multitalk_worker.pipeline.video import VideoSource
def read(mode, frames):
    with VideoSource(Path(sys.argv[1]), fps_mode=mode) as source:
        for n in range(0, frames, 72):
            source.frame(n)
        assert source.held_from is None and source.decoded_frames >= frames - 72
read("resample", 300)
short = peak_kb()
read("resample", 3000)
read("reference", 3000)
print(short, peak_kb())
"""


def test_memory_does_not_grow_with_the_video(tmp_path: Path) -> None:
    """Every 72nd frame of 3000 frames (2 min), in either mode, costs the same peak RSS as of 300 (12 s):
    decoded frames are dropped as the reader moves on. Holding the long video's decoded frames would add
    3000 x 64 x 64 x 1.5 B = 18 MB."""
    long = write_video(tmp_path / "long.mp4", 3000, 25)
    short_kb, long_kb = run_for_peaks(PEAK_RSS, str(long))
    assert long_kb - short_kb < 4096, (short_kb, long_kb)


def decoded_frames(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        return [read_number(frame.to_image()) for frame in container.decode(video=0)]


def test_a_browser_webm_reports_what_decodes(tmp_path: Path) -> None:
    """MediaRecorder declares no duration: the length comes from the packets (90 frames, 3.0 s)."""
    path = browser_webm(tmp_path / "rec.webm", 90, 30)
    info = probe_video(path)
    assert (info.declared_frames, info.declared_duration_s) == (0, 0.0)  # what the container says
    assert (info.source_frames, info.duration_s, info.counted_by) == (90, pytest.approx(3.0), "demux")
    assert len(decoded_frames(path)) == 90
    assert info.source_fps == pytest.approx(30.0) and info.timeline_frames == 75
    with VideoSource(path) as source:
        assert source.info == info
        assert read_number(source.frame(74)) == 74 * 30 // 25 and source.held_from is None


def test_a_stream_copy_cut_reports_the_frames_its_edit_list_shows(tmp_path: Path) -> None:
    """`-ss 0.9 -c copy` of 90 frames at 30 fps: 90 samples in the file, 63 shown (the decoder drops 27)."""
    source = write_video(tmp_path / "src.mp4", 90, 30)
    path = stream_copy_cut(source, tmp_path / "cut.mp4", Fraction(9, 10))
    info = probe_video(path)
    assert info.declared_frames == 90  # what the container says
    shown = decoded_frames(path)
    assert shown == list(range(27, 90))
    assert (info.source_frames, info.duration_s, info.counted_by) == (63, pytest.approx(2.1), "demux")
    assert info.timeline_frames == 53  # ceil(2.1 * 25)
    with VideoSource(path) as source:
        assert read_number(source.frame(0)) == 27 and read_number(source.frame(52)) == 27 + 52 * 30 // 25


def test_other_containers_are_counted_by_decoding_up_to_the_limit(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.avi", 50, 25)
    info = probe_video(path)
    assert (info.source_frames, info.duration_s, info.counted_by, info.complete) == (50, 2.0, "decode", True)
    capped = probe_video(path, max_seconds=1.0)  # stops at the first frame past 1 s + one frame
    assert not capped.complete and capped.duration_s > 1.0 and capped.source_frames < 50
