"""`multitalk-worker generate --model infinitetalk` end to end on the tiny model: a dub of a 30 fps video,
image-to-video beyond two clips, two speakers on the multi adapter; bad `--video` files end with one line.
Every mp4 is read back with a decoder. The CLI runs in this process (the `cli` fixture: stdout, stderr and
the exit status as a process gives them, without its start: about 10 s a run on a 2-core machine);
tests/test_cli.py runs it as a process."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multitalk_worker.media import probe_mp4, read_frames
from tests.conftest import Cli
from tests.media_files import audio_only_file, write_video
from tests.test_cli import AAC_FRAME_S, EXAMPLES, SPEECH_A_FRAMES


def _speech(path: Path, seconds: float) -> Path:
    """`seconds` of the example speech (speech_a, then speech_b), 16 kHz mono."""
    chunks = []
    for name in ("speech_a.wav", "speech_b.wav", "speech_a.wav"):
        with wave.open(str(EXAMPLES / name)) as src:
            params = src.getparams()
            chunks.append(src.readframes(src.getnframes()))
    data = b"".join(chunks)[: int(seconds * params.framerate) * params.sampwidth * params.nchannels]
    with wave.open(str(path), "wb") as out:
        out.setparams(params)
        out.writeframes(data)
    return path


def _generate(cli: Cli, out: Path, *args: str | Path) -> str:
    proc = cli(
        "generate", "--model", "infinitetalk", "--prompt", "a person talking", "--weights", "tiny",
        "--steps", "1", "--out", out, *args,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tiny model with random weights" in proc.stdout
    return proc.stdout


def _check(path: Path, frames: int) -> np.ndarray:
    info = probe_mp4(path)
    assert info.fps == 25.0 and info.frames == frames
    assert info.has_audio and abs(info.audio_duration_s - frames / 25) <= AAC_FRAME_S + 1e-6
    pictures = read_frames(path)
    assert not (pictures == pictures[0]).all()
    return pictures


def _moving_person(count: int) -> list[np.ndarray]:
    """The example person, 64x64, panning one pixel a frame (colour correction needs a textured source)."""
    person = np.asarray(Image.open(EXAMPLES / "person.png").convert("RGB").resize((64, 64)))
    return [np.roll(person, i, axis=1) for i in range(count)]


def test_dub_a_30_fps_video(cli: Cli, tmp_path: Path) -> None:
    pictures = _moving_person(150)  # 5 s at 30 fps: shorter than the speech, so its last frame is held
    source = write_video(tmp_path / "source.mp4", 150, 30, pictures=pictures)
    audio = _speech(tmp_path / "speech.wav", 6.5)  # La = 162 -> 3 clips
    out = tmp_path / "dub.mp4"
    _generate(cli, out, "--video", source, "--audio", audio)
    _check(out, 162)
    assert probe_mp4(out).width == 48  # the tiny bucket of a square source


def test_image_to_video_longer_than_two_clips(cli: Cli, tmp_path: Path) -> None:
    audio = _speech(tmp_path / "speech.wav", 7.0)  # La = 175 -> 3 clips of 81, 72, 72 frames
    out = tmp_path / "i2v.mp4"
    stdout = _generate(cli, out, "--image", EXAMPLES / "person.png", "--audio", audio)
    _check(out, 175)
    assert "3 clip(s)" in stdout


def test_two_speakers_on_the_multi_adapter(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "two.mp4"
    stdout = _generate(
        cli, out, "--image", EXAMPLES / "two_people.png", "--audio", EXAMPLES / "speech_a.wav",
        "--audio", EXAMPLES / "speech_b.wav", "--region", "left", "--region", "right",
    )  # fmt: skip
    _check(out, SPEECH_A_FRAMES)
    assert "adapter multi" in stdout


@pytest.mark.parametrize("kind", ["garbage", "audio_only", "zero_frames"])
def test_bad_videos_end_with_one_line(cli: Cli, tmp_path: Path, kind: str) -> None:
    if kind == "garbage":
        video = tmp_path / "garbage.mp4"
        video.write_bytes(b"\x00\x01not a video" * 50)
    else:
        video = audio_only_file(tmp_path / f"{kind}.mkv", "matroska", empty_video=kind == "zero_frames")
    out = tmp_path / "out.mp4"
    proc = cli(
        "generate", "--model", "infinitetalk", "--prompt", "p", "--weights", "tiny", "--steps", "1",
        "--video", video, "--audio", EXAMPLES / "speech_a.wav", "--out", out,
    )  # fmt: skip
    assert proc.returncode == 1 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [VIDEO_DECODE_FAILED]: "), proc.stderr
