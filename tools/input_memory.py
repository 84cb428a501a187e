"""Peak host memory of jobs by input: what a job's inputs cost before (and, with --full, during) generation.

Each case is one job through `JobService.run` on the tiny model in a child process; after a warm-up job the
child returns the heap's free memory to the system (malloc_trim; glibc's mmap threshold fixed by
MALLOC_MMAP_THRESHOLD_), resets its peak RSS (`/proc/self/clear_refs`) and reports `VmHWM - VmRSS(before)` in
MiB for each case.

    PYTHONPATH=$PWD/src:$PWD .venv/bin/python tools/input_memory.py          # validate_only jobs
    PYTHONPATH=$PWD/src:$PWD .venv/bin/python tools/input_memory.py --full   # + full tiny generations

docs/api.md ("Cost") quotes its output.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
P480 = {"resolution": "480p"}
FAST = {"resolution": "tiny", "advanced": {"steps": 2, "seed": 3}, "prompt": "a person talks"}


@dataclass(frozen=True)
class Case:
    name: str
    image: str
    audio: str
    max_duration_s: float | None = 0.2
    validate_only: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def job(self) -> dict[str, Any]:
        job: dict[str, Any] = {**FAST, "image": self.image, "speakers": [{"audio": self.audio}]}
        if self.max_duration_s is not None:
            job["max_duration_s"] = self.max_duration_s
        return {**job, "validate_only": self.validate_only, **self.extra}


def write_inputs(folder: Path, *, large_images: bool = False) -> None:
    """The amplification inputs of issue 11 and the reference points, written once into `folder`."""
    from PIL import Image

    from tests import hostile

    hostile.long_mp3(folder / "ten_minutes.mp3")
    hostile.short_wav(folder / "five_seconds.wav")
    hostile.flac_surround_silence(folder / "surround.flac")
    hostile.wav_header(folder / "one_hertz.wav", rate=1)
    hostile.huge_png(folder / "huge.png")
    (folder / "person.png").write_bytes((REPO / "examples" / "person.png").read_bytes())
    if large_images:
        for side in (2000, 6000):
            Image.new("RGB", (side, side), (90, 120, 150)).save(
                folder / f"square_{side}.png", compress_level=1
            )
        for seconds in (10, 30):
            hostile._encode(
                folder / f"stereo48k_{seconds}.wav", "pcm_s16le", 48_000, "stereo", seconds, "s16", tone=True
            )


def amplification_cases() -> list[Case]:
    """The inputs the issue lists, each as a job that must stay cheap."""
    return [
        Case("5 s wav, cap 0.2 s", "person.png", "five_seconds.wav"),
        Case("10 min mp3, cap 0.2 s", "person.png", "ten_minutes.mp3"),
        Case("180 s 96 kHz 5.1 FLAC, no declared length, cap 0.2 s", "person.png", "surround.flac"),
        Case("180 s 96 kHz 5.1 FLAC, no declared length, uncapped", "person.png", "surround.flac", None),
        Case("WAV declaring 1 Hz", "person.png", "one_hertz.wav"),
        Case("12000x12000 PNG", "huge.png", "five_seconds.wav"),
    ]


def scaling_cases() -> list[Case]:
    """Reference points for the per-second and per-megapixel figures."""
    wide = {"resolution": "480p"}
    return [
        Case("48 kHz stereo wav 10 s, uncapped", "person.png", "stereo48k_10.wav", None),
        Case("48 kHz stereo wav 30 s, uncapped", "person.png", "stereo48k_30.wav", None),
        Case("2000x2000 PNG (4 MP), 480p", "square_2000.png", "five_seconds.wav", extra=wide),
        Case("6000x6000 PNG (36 MP), 480p", "square_6000.png", "five_seconds.wav", extra=wide),
    ]


def full_cases() -> list[Case]:
    return [
        Case("full job: 5 s wav, cap 0.2 s", "person.png", "five_seconds.wav", validate_only=False),
        Case("full job: 10 min mp3, cap 0.2 s", "person.png", "ten_minutes.mp3", validate_only=False),
    ]


def measure(folder: Path, cases: list[Case]) -> list[dict[str, Any]]:
    """Run `cases` in one child process (inputs under `folder`, the volume root): one result per case."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "MULTITALK_WEIGHTS": "tiny",
        "MULTITALK_VOLUME_ROOT": str(folder),
        "MULTITALK_WORK_DIR": str(folder / "work"),
    }
    payload = json.dumps([{"name": case.name, "job": case.job()} for case in cases])
    command = [sys.executable, __file__, "--child"]
    out = subprocess.run(command, input=payload, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"measuring child failed:\n{out.stderr[-4000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child() -> None:
    """A warm-up job (imports, codecs, the tiny model when a case generates), then each case, its peak RSS
    increase printed as one JSON line. Before each case the heap's free memory goes back to the system
    (malloc_trim), so no case reuses pages an earlier one freed and each is counted whole."""
    from multitalk_worker.config import settings_from_process
    from multitalk_worker.service import JobService

    libc = ctypes.CDLL("libc.so.6")
    worker = JobService(settings_from_process())
    cases = json.loads(sys.stdin.read())
    full = any(not case["job"]["validate_only"] for case in cases)
    warm = cases[0]["job"] | {"image": "person.png", "speakers": [{"audio": "five_seconds.wav"}]}
    worker.run({"id": "warm", "input": warm | {"max_duration_s": 0.2, "validate_only": not full}})
    for case in cases:
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS
        before = _status_mib("VmRSS")
        outcome = worker.run({"id": "case", "input": case["job"]})
        peak = _status_mib("VmHWM") - before
        result = outcome.error["code"] if outcome.error else "ok"
        print(json.dumps({"name": case["name"], "peak_mib": round(peak, 1), "result": result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also time full tiny generations")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child()
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_inputs(folder, large_images=True)
        cases = amplification_cases() + scaling_cases() + (full_cases() if args.full else [])
        for row in measure(folder, cases):
            print(f"{row['peak_mib']:8.1f} MiB  {row['result']:<18} {row['name']}")


if __name__ == "__main__":
    main()
