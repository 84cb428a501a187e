"""Media files the tests write with PyAV: videos whose frame i shows the number i, an audio-only file."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

BASE, DIGITS, LEVEL0, STEP = 16, 4, 16, 14  # frame i: 4 base-16 digits as grey levels 16, 30, ..., 226


def number_picture(number: int, size: int = 64) -> np.ndarray:
    """uint8 [size, size, 3]: a 2x2 grid of uniform grey blocks, one base-16 digit of `number` each."""
    picture = np.empty((size, size, 3), np.uint8)
    half = size // 2
    for digit in range(DIGITS):
        value = number // BASE**digit % BASE
        row, col = divmod(digit, 2)
        picture[row * half : (row + 1) * half, col * half : (col + 1) * half] = LEVEL0 + STEP * value
    return picture


def read_number(image: Image.Image) -> int:
    """Inverse of `number_picture` on a decoded frame: the centre of each block, to the nearest level."""
    pixels = np.asarray(image.convert("L"), np.float64)
    half, margin = pixels.shape[0] // 2, pixels.shape[0] // 8
    number = 0
    for digit in range(DIGITS):
        top, left = (half * i + margin for i in divmod(digit, 2))
        block = pixels[top : top + half - 2 * margin, left : left + half - 2 * margin]
        value = (block.mean() - LEVEL0) / STEP
        assert abs(value - round(value)) < 0.3, f"digit {digit} reads {value:.2f}: not a clean level"
        number += int(round(value)) * BASE**digit
    return number


def write_video(
    path: Path,
    count: int,
    rate: int = 25,
    *,
    codec: str = "libx264",
    times_ms: Sequence[int] | None = None,
    pictures: Sequence[np.ndarray] | None = None,
    rotation: float | None = None,
    hflip: bool = False,
) -> Path:
    """`count` frames of `number_picture(i)` (or `pictures`) at `rate` fps, or at explicit times in ms."""
    options = {"preset": "ultrafast", "crf": "0"} if codec == "libx264" else {}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        first = pictures[0] if pictures is not None else number_picture(0)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        if times_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip)
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(
                pictures[i] if pictures is not None else number_picture(i), format="rgb24"
            )
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def audio_only_file(path: Path, fmt: str, *, empty_video: bool = False) -> Path:
    """A second of silence as AAC, with (`empty_video`) a video track that never gets a packet."""
    with av.open(str(path), "w", format=fmt) as container:
        if empty_video:
            video = container.add_stream("libx264", rate=25)
            video.width = video.height = 64
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*audio.encode(frame), *audio.encode(None)]:
            container.mux(packet)
    return path


def browser_webm(path: Path, count: int, rate: int = 30) -> Path:
    """A WebM written as a browser's MediaRecorder writes one: a live stream (no duration, no cues, sizes
    unknown), millisecond timestamps and no declared frame rate (so no track default duration)."""
    with av.open(str(path), "w", format="webm", options={"live": "1"}) as container:
        stream = container.add_stream("libvpx")
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.codec_context.framerate = Fraction(0, 1)  # MediaRecorder declares none
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(number_picture(i), format="rgb24")
            frame.pts, frame.time_base = round(i * 1000 / rate), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def stream_copy_cut(source: Path, path: Path, start_s: Fraction) -> Path:
    """What `ffmpeg -ss START -i SOURCE -c copy PATH` writes: every packet copied (no re-encode, so the cut
    starts at the keyframe before START), timestamps moved back by START; the MP4 muxer then writes an edit
    list that hides the frames before START while the sample table still holds them."""
    with av.open(str(source)) as inp, av.open(str(path), "w") as out:
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        shift = int(start_s / stream.time_base)
        for packet in inp.demux(stream):
            if packet.dts is None:
                continue  # the demuxer's flush packet
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = copy
            out.mux(packet)
    return path


# ----------------------------------------------------------------------------- photos as people send them

PHOTO_SIZE = (600, 400)  # stored width x height of `exif_photo`: landscape


def exif_photo(path: Path, orientation: int = 6) -> Path:
    """A JPEG as a phone writes it: the sensor's landscape pixels (600x400, a white block in the stored
    top-left corner on grey) and an EXIF Orientation tag saying how to turn them (6: 90 degrees clockwise,
    so a viewer shows a 400x600 portrait with the block top-right)."""
    picture = np.full((PHOTO_SIZE[1], PHOTO_SIZE[0], 3), 90, np.uint8)
    picture[:100, :150] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    Image.fromarray(picture).save(path, "JPEG", quality=95, exif=exif)
    return path


def grey16_png(path: Path, size: tuple[int, int] = (64, 48)) -> tuple[Path, float]:
    """A 16-bit grayscale PNG (a horizontal ramp over the full 0..65535 range); returns the path and its
    mean on the 8-bit scale (value / 257)."""
    ramp = np.linspace(8000, 60000, size[0])[None, :].repeat(size[1], axis=0).astype(np.uint16)
    Image.fromarray(ramp).save(path)  # Pillow writes mode I;16 as a 16-bit grey PNG
    return path, float(ramp.mean() / 257)


def cutout_png(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    """An RGBA cut-out: a mid-grey disc, opaque, on fully transparent pixels that store black."""
    yy, xx = np.mgrid[: size[1], : size[0]]
    disc = (xx - size[0] / 2) ** 2 + (yy - size[1] / 2) ** 2 < (min(size) / 4) ** 2
    rgba = np.zeros((size[1], size[0], 4), np.uint8)
    rgba[disc] = (128, 128, 128, 255)
    Image.fromarray(rgba, "RGBA").save(path)
    return path
