"""Peak host memory of a tiny-model InfiniteTalk dub against the audio's length (flat-memory check).

    python bench/bench_memory.py [--seconds 60 600] [--steps 1]

For each length, a fresh process runs `multitalk-worker generate --model infinitetalk --weights tiny
--video SRC --audio SPEECH` (the example speech tiled to that length, a 30 fps source video of 20 s, so its
last frame is held for the rest) and reports its peak resident memory (VmHWM: the process's own high-water
mark; ru_maxrss would carry a parent's). The frames stream to the encoder clip by clip, so what may still
grow with the length is only what is proportional to the audio itself (the 16 kHz soundtrack, its loudness
pass and the wav2vec features). Prints one line per length and the ratio of the last to the first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import av
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
RUN = """
import sys
from pathlib import Path
from multitalk_worker.cli import main
status = main(sys.argv[1:])
print("PEAK_KB", Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0], status)
"""


def write_speech(path: Path, seconds: float) -> Path:
    with wave.open(str(EXAMPLES / "speech_a.wav")) as src:
        params, data = src.getparams(), src.readframes(src.getnframes())
    need = int(seconds * params.framerate) * params.sampwidth * params.nchannels
    with wave.open(str(path), "wb") as out:
        out.setparams(params)
        out.writeframes((data * (need // len(data) + 1))[:need])
    return path


def write_source(path: Path, seconds: float, rate: int = 30) -> Path:
    person = np.asarray(Image.open(EXAMPLES / "person.png").convert("RGB").resize((64, 64)))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"preset": "ultrafast"})
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * rate)):
            frame = av.VideoFrame.from_ndarray(np.roll(person, i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def peak_of(seconds: float, work: Path, source: Path, steps: int) -> tuple[int, float]:
    speech = write_speech(work / f"speech_{seconds:g}.wav", seconds)
    out = work / f"dub_{seconds:g}.mp4"
    args = [
        "generate", "--model", "infinitetalk", "--weights", "tiny", "--prompt", "a person talking",
        "--video", str(source), "--audio", str(speech), "--steps", str(steps), "--out", str(out),
        "--max-duration", str(seconds),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    line = [row for row in done.stdout.splitlines() if row.startswith("PEAK_KB")]
    if done.returncode != 0 or not line or line[-1].split()[2] != "0":
        raise SystemExit(f"the {seconds:g} s run failed:\n{done.stdout}\n{done.stderr}")
    return int(line[-1].split()[1]), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, nargs="+", default=[60.0, 600.0])
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        source = write_source(work / "source.mp4", 20.0)
        peaks = []
        for seconds in args.seconds:
            peak_kb, elapsed = peak_of(seconds, work, source, args.steps)
            peaks.append(peak_kb)
            print(f"{seconds:7.1f} s of audio: peak RSS {peak_kb / 1024:8.1f} MiB, {elapsed:6.1f} s wall")
        print(f"last / first: {peaks[-1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
