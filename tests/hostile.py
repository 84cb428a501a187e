"""Inputs that cost far more to decode than to send (issue 11's amplification cases), written with PyAV.

Each is a real file in its real format; none is a stand-in: a 10-minute mp3, 180 s of 96 kHz 5.1 silence as
FLAC whose header declares no length, a WAV whose header declares a 1 Hz rate, and a 12000x12000 PNG.
"""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def _encode(path: Path, codec: str, rate: int, layout: str, seconds: float, fmt: str, tone: bool) -> Path:
    """`seconds` of silence (or a quiet 250 Hz tone) encoded one frame at a time (the same frame's samples
    each time: 250 Hz fits a 16 kHz frame of 1152 samples... nearly; a test signal, not music)."""
    channels = av.AudioLayout(layout).nb_channels
    with av.open(str(path), "w", format=_FORMATS.get(codec), options=_OPTIONS.get(codec, {})) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        frame_size = stream.codec_context.frame_size or 4096
        t = np.arange(frame_size) / rate
        signal = 0.1 * np.sin(2 * np.pi * 250 * t) if tone else np.zeros(frame_size)
        data = np.repeat(signal[None].astype(np.float32), channels, axis=0)
        if fmt == "s16":
            data = (data * 32767).astype(np.int16).T.reshape(1, -1)
        elif fmt == "s32":
            data = (data * (2**31 - 1)).astype(np.int32).T.reshape(1, -1)
        data = np.ascontiguousarray(data)
        for pts in range(0, int(seconds * rate), frame_size):
            frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


_FORMATS = {"libmp3lame": "mp3", "flac": "flac", "pcm_s16le": "wav"}
_OPTIONS = {"libmp3lame": {"write_xing": "0", "id3v2_version": "0"}}  # a bare CBR stream of frames


def long_mp3(path: Path, seconds: float = 600.0) -> Path:
    """A 16 kHz mono CBR mp3, 10 minutes by default: 10 s encoded, its frames repeated (an mp3 stream is a
    sequence of self-contained frames; FFmpeg reads the length off the file size, as for any CBR mp3)."""
    piece = _encode(path, "libmp3lame", 16_000, "mono", 10.0, "fltp", tone=True).read_bytes()
    path.write_bytes(piece * round(seconds / 10.0))
    return path


def short_wav(path: Path, seconds: float = 5.0) -> Path:
    return _encode(path, "pcm_s16le", 16_000, "mono", seconds, "s16", tone=True)


def flac_surround_silence(path: Path, seconds: float = 180.0) -> Path:
    """96 kHz 5.1 silence as FLAC (tens of KB), its STREAMINFO's total-samples field zeroed: "unknown", so
    the container declares no length and only decoding finds it."""
    _encode(path, "flac", 96_000, "5.1", seconds, "s32", tone=False)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # the first metadata block is STREAMINFO
    packed = int.from_bytes(data[18:26], "big")  # rate(20) channels(3) bits(5) total samples(36)
    data[18:26] = (packed & ~((1 << 36) - 1)).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def wav_header(path: Path, rate: int, channels: int = 1, data: bytes = bytes(1200)) -> Path:
    """A PCM WAV whose header declares `rate` and `channels` (1 Hz: 1200 bytes "last" 10 minutes)."""
    block = channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, 16)
    body = b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def huge_png(path: Path, side: int = 12_000) -> Path:
    """A `side` x `side` greyscale PNG of one colour (about 140 KB for 12000)."""
    Image.new("L", (side, side), 128).save(path)
    return path
