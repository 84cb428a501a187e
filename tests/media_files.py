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
