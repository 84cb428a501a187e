"""`multitalk-worker generate` end to end on the tiny model: mp4s read back with a decoder; bad inputs
end with one line on stderr. The one-person generation runs the CLI as a process (`run_cli`); the others
call its `main` in this process (the `cli` fixture: stdout, stderr and exit status as the process gives
them), which saves an interpreter start and the imports, about 10 s a run on a loaded 2-core machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soxr

from multitalk_worker.cli import main
from multitalk_worker.media import probe_mp4, read_frames
from multitalk_worker.pipeline.audio import read_track
from multitalk_worker.timeline import audio_frames
from tests import hostile
from tests.conftest import Cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
AAC_FRAME_S = 1024 / 16000
SPEECH_A_FRAMES = 102  # La of examples/speech_a.wav


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: threads only add overhead
    command = [sys.executable, "-m", "multitalk_worker.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def generate(out: Path, *args: str | Path, cli: Cli = run_cli) -> subprocess.CompletedProcess[str]:
    proc = cli(
        "generate", "--prompt", "people talking", "--weights", "tiny", "--steps", "1", "--out", out, *args
    )
    assert proc.returncode == 0, proc.stderr
    assert "tiny model with random weights" in proc.stdout
    return proc


def check_video(path: Path, frames: int) -> None:
    info = probe_mp4(path)
    assert info.fps == 25.0 and info.frames == frames
    assert info.has_audio and abs(info.audio_duration_s - frames / 25) <= AAC_FRAME_S + 1e-6
    pictures = read_frames(path)
    assert not (pictures == pictures[0]).all()


def decode_samples(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)


def write_encoded(path: Path, samples: np.ndarray, rate: int, codec: str, fmt: str) -> Path:
    layout = "stereo" if samples.shape[0] == 2 else "mono"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        data = samples if fmt == "fltp" else np.round(samples.T.reshape(1, -1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def test_one_person(tmp_path: Path) -> None:
    out = tmp_path / "one.mp4"
    proc = generate(
        out, "--image", EXAMPLES / "person.png", "--audio", EXAMPLES / "speech_a.wav", "--steps", "2"
    )
    assert "2 clip(s)" in proc.stdout
    check_video(out, SPEECH_A_FRAMES - 3)
    stages = [
        line.split("] ", 1)[1].split(":")[0] for line in proc.stderr.splitlines() if line.startswith("[")
    ]
    assert stages == ["load", "audio", "text", "condition", "decode", "condition", "decode", "encode"], (
        proc.stderr
    )
    assert "decode: VAE, clip 2/2" in proc.stderr
    assert "clip 2/2 step 2/2, ETA" in proc.stderr and "with decode" in proc.stderr  # the bar's postfix


HELP_SCRIPT = """
import sys, time
start = time.perf_counter()
from multitalk_worker.cli import main
for argv in (["generate", "--help"], ["generate", "--prompt", "x"]):  # the help, then an argument error
    try:
        main(argv)
    except SystemExit as exit:
        print("exit", exit.code)
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "av", "numpy") if m in sys.modules)
print("heavy", heavy, "seconds", round(time.perf_counter() - start, 2))
"""


def test_help_and_argument_errors_import_no_model_library() -> None:
    """`--help` and a bad command line answer without importing torch, diffusers, transformers, PyAV or numpy
    (measured here under load: about 1 s, against about 20 s with torch)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert "--max-duration S" in done.stdout and "default 42" in done.stdout  # the help was printed
    assert "exit 0" in done.stdout and "exit 2" in done.stdout and "required" in done.stderr
    assert "heavy [] " in done.stdout, done.stdout


def test_version_and_schema(capsys: pytest.CaptureFixture[str]) -> None:
    from multitalk_worker import __version__
    from multitalk_worker.schema import GenerateInput

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"multitalk-worker {__version__}"
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == set(GenerateInput.model_fields)
    assert schema["$defs"]["AdvancedInput"]["properties"]["steps"]["anyOf"][0]["maximum"] == 100


def test_two_people_sequential_from_mp3_and_stereo_44k(tmp_path: Path, cli: Cli) -> None:
    """Also the longer-than-one-clip case: three clips."""
    speech_a = decode_samples(EXAMPLES / "speech_a.wav").astype(np.float32) / 32768
    mp3 = write_encoded(tmp_path / "a.mp3", np.repeat(speech_a, 2, axis=0), 16000, "libmp3lame", "fltp")
    speech_b = decode_samples(EXAMPLES / "speech_b.wav")[0].astype(np.float32) / 32768
    b44 = soxr.resample(speech_b, 16000, 44100)
    stereo = write_encoded(tmp_path / "b.wav", np.stack([b44, 0.5 * b44]), 44100, "pcm_s16le", "s16")
    out = tmp_path / "sequential.mp4"
    proc = generate(
        out,
        "--image", EXAMPLES / "two_people.png",
        "--audio", mp3, "--audio", stereo, "--audio-mode", "sequential",
        cli=cli,
    )  # fmt: skip
    assert "3 clip(s)" in proc.stdout
    samples = read_track(mp3).shape[0] + read_track(stereo).shape[0]
    check_video(out, audio_frames(samples) - 3)


def test_bad_audio_bytes_end_with_one_line(tmp_path: Path, cli: Cli) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(os.urandom(4000))
    proc = cli(
        "generate", "--image", EXAMPLES / "person.png", "--audio", garbage, "--prompt", "x",
        "--weights", "tiny", "--out", tmp_path / "x.mp4",
    )  # fmt: skip
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error [AUDIO_DECODE_FAILED]: garbage.wav"), proc.stderr
    assert not (tmp_path / "x.mp4").exists()


def _short_wav(tmp_path: Path) -> Path:
    tone = (0.3 * np.sin(np.arange(4800) / 5)).astype(np.float32)[None]
    return write_encoded(tmp_path / "short.wav", tone, 16000, "pcm_s16le", "s16")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("short", "error [INVALID_INPUT]: audio is 0.30 s long; at least 3.28 s is needed"),
        ("image", "error [IMAGE_DECODE_FAILED]: bad.png: not a readable image"),
        (
            "overlap",
            "error [INVALID_INPUT]: the regions of the two speakers overlap ([0, 0, 0.6, 1] and [0.5,",
        ),
        ("three", "error [INVALID_INPUT]: --audio: List should have at most 2 items after validation, not 3"),
        ("region", "error [INVALID_INPUT]: --region 'middle' is not accepted"),
        ("missing", "error [INVALID_INPUT]: --audio "),
        ("huge", "error [INVALID_INPUT]: huge.png: 12000x12000 is 144.0 megapixels; images of at most 50"),
        ("1 Hz", "error [INVALID_INPUT]: one_hertz.wav: sample rate 1 Hz is not accepted; use 8000-192000"),
        (
            "long",
            "error [DURATION_TOO_LONG]: long.flac lasts more than 40.2 s; videos are at most that long. "
            "Set --max-duration",
        ),
    ],
)
def test_bad_inputs_exit_non_zero_with_one_line(tmp_path: Path, cli: Cli, case: str, message: str) -> None:
    speech, image = EXAMPLES / "speech_a.wav", EXAMPLES / "two_people.png"
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not an image at all")
    inputs = {
        "short": ["--image", image, "--audio", _short_wav(tmp_path)],
        "image": ["--image", bad_image, "--audio", speech],
        "overlap": ["--image", image, "--audio", speech, "--region", "0,0,0.6,1", "--audio", speech,
                    "--region", "0.5,0,1,1"],
        "three": ["--image", image, "--audio", speech, "--audio", speech, "--audio", speech],
        "region": ["--image", image, "--audio", speech, "--region", "middle", "--audio", speech,
                   "--region", "right"],
        "missing": ["--image", image, "--audio", tmp_path / "nowhere.wav"],
        "huge": lambda: ["--image", hostile.huge_png(tmp_path / "huge.png"), "--audio", speech],
        "1 Hz": lambda: ["--image", image, "--audio", hostile.wav_header(tmp_path / "one_hertz.wav", rate=1)],
        "long": lambda: ["--image", image, "--audio", hostile.flac_surround_silence(tmp_path / "long.flac")],
    }[case]  # fmt: skip
    inputs = inputs() if callable(inputs) else inputs
    args = [
        "generate",
        "--prompt",
        "x",
        "--weights",
        "tiny",
        "--out",
        str(tmp_path / "x.mp4"),
        *map(str, inputs),
    ]
    proc = cli(*args)
    assert proc.returncode == 1
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(message), err
    assert case != "missing" or err[0].endswith("nowhere.wav: no such file"), err
    assert not (tmp_path / "x.mp4").exists()
