"""The encoded mp4 checked against what the pipeline meant to write, and its digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

from multitalk_worker.errors import OutputInvalid
from multitalk_worker.media import Mp4Info, probe_mp4
from multitalk_worker.pipeline.request import GenerationResult

AUDIO_TOLERANCE_S = (
    0.1  # AAC frames are 64 ms at 16 kHz; the soundtrack may end within one of the video's end
)


def verify_video(path: Path, result: GenerationResult) -> Mp4Info:
    """Decode our own mp4 and check frame count, size, fps, duration and soundtrack against what we meant."""
    info = probe_mp4(path)
    count, (height, width) = result.frame_count, result.size
    expected_s = count / result.fps
    problems = []
    if info.frames != count:
        problems.append(f"{info.frames} frames decoded, {count} written")
    if (info.width, info.height) != (width, height):
        problems.append(f"size {info.width}x{info.height}, expected {width}x{height}")
    if abs(info.fps - result.fps) > 1e-3:
        problems.append(f"{info.fps:g} fps, expected {result.fps}")
    if abs(info.duration_s - expected_s) > 1e-6:
        problems.append(f"duration {info.duration_s:.3f} s, expected {expected_s:.3f} s")
    wants_audio = result.audio.size > 0
    if wants_audio and not info.has_audio:
        problems.append("no audio stream")
    if wants_audio and info.has_audio and abs(info.audio_duration_s - expected_s) > AUDIO_TOLERANCE_S:
        problems.append(f"audio lasts {info.audio_duration_s:.3f} s, video {expected_s:.3f} s")
    if problems:
        raise OutputInvalid("the encoded video failed its check: " + "; ".join(problems), stage="verify")
    return info


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
