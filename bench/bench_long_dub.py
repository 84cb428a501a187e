"""A long InfiniteTalk dub through `TalkingVideoPipeline` with checkpoints after every clip (issue #22's GPU
measurement): full-size networks, random weights, one GPU.

    python bench/bench_long_dub.py --out DIR [--seconds 61] [--preset fast] [--engine fast]
    python bench/bench_long_dub.py --out DIR --tiny --seconds 12      # the CPU smoke test of the wiring

The source is a video made here (examples/person.png panned by one pixel a frame, 25 fps, as long as the
audio), the speech examples/speech_a.wav repeated to `--seconds`. Every clip is checkpointed as a worker
does (pipeline/checkpoint.py: its H.264 segment, then the loop's state), and the segments are assembled into
the final mp4 at the end. Per clip it records the wall time (from one clip's `condition` event to the next),
the GPU peak (torch.cuda.max_memory_allocated, reset per clip), the host peak (VmHWM, reset per clip through
/proc/self/clear_refs) and the checkpoint's cost (state seconds and bytes; the segment's encode seconds and
bytes). Writes DIR/results.json and prints a summary last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import random_bundle  # noqa: E402

from multitalk_worker.media import probe_mp4  # noqa: E402
from multitalk_worker.models.configs import CONFIGS, TINY  # noqa: E402
from multitalk_worker.pipeline.audio import decode_audio  # noqa: E402
from multitalk_worker.pipeline.checkpoint import ClipCheckpoint  # noqa: E402
from multitalk_worker.pipeline.engine import engine_options  # noqa: E402
from multitalk_worker.pipeline.pipeline import TalkingVideoPipeline  # noqa: E402
from multitalk_worker.pipeline.presets import apply_preset  # noqa: E402
from multitalk_worker.pipeline.request import GenerationRequest, Progress, SamplingParams, Speaker  # noqa: E402
from multitalk_worker.tiny import build_tiny_bundle  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def host_peak_mib(reset: bool) -> float:
    """This process's peak resident memory (VmHWM) in MiB; `reset` starts a new peak from now."""
    status = Path("/proc/self/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return peak


def write_source(path: Path, seconds: float, side: int) -> Path:
    picture = np.asarray(Image.open(EXAMPLES / "person.png").convert("RGB").resize((side + 64, side)))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast", "crf": "18"})
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        for index in range(int(seconds * 25)):
            shift = index % 64
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(picture[:, shift : shift + side]), "rgb24"
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_speech(path: Path, seconds: float) -> Path:
    """examples/speech_a.wav repeated to `seconds`, as 16 kHz mono PCM in a WAV."""
    channels, rate = decode_audio(EXAMPLES / "speech_a.wav")
    speech = channels.mean(axis=0)
    assert rate == 16_000, rate
    repeats = int(np.ceil(seconds * 16_000 / speech.size))
    track = np.tile(speech, repeats)[: int(seconds * 16_000)]
    pcm = (np.clip(track, -1, 1) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=16_000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = 16_000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


class ClipMeter:
    """Progress hook: at each clip's `condition` event, closes the previous clip's row."""

    def __init__(self, checkpoint: ClipCheckpoint, cuda: bool, log: Path) -> None:
        self.checkpoint, self.cuda, self.log = checkpoint, cuda, log
        self.rows: list[dict[str, float]] = []
        self._clip = 0
        self._at = time.perf_counter()
        self._save_s = self._encode_s = 0.0

    def __call__(self, event: Progress) -> None:
        if event.stage == "condition" and event.chunk != self._clip:
            self.close_clip()
            self._clip = event.chunk

    def close_clip(self) -> None:
        now = time.perf_counter()
        if self._clip:
            if self.cuda:
                torch.cuda.synchronize()
            segments = self.checkpoint.sink.paths()
            self.rows.append(
                {
                    "clip": self._clip,
                    "seconds": round(now - self._at, 3),
                    "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else 0.0,
                    "host_peak_mib": round(host_peak_mib(reset=True), 1),
                    "state_s": round(self.checkpoint.save_s - self._save_s, 4),
                    "state_bytes": self.checkpoint.saved_bytes,
                    "segment_encode_s": round(self.checkpoint.sink.encode_s - self._encode_s, 4),
                    "segment_bytes": segments[-1].stat().st_size if segments else 0,
                }
            )
            with self.log.open("a") as handle:  # as it goes: a run stopped at its time limit keeps its rows
                handle.write(json.dumps(self.rows[-1]) + "\n")
            print(json.dumps(self.rows[-1]), flush=True)
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
        self._at, self._save_s, self._encode_s = now, self.checkpoint.save_s, self.checkpoint.sink.encode_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=61.0)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--engine", default="fast", choices=["reference", "fast"])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (wiring only)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = not args.tiny
    device = "cuda" if cuda else "cpu"
    start = time.perf_counter()
    if args.tiny:
        bundle = build_tiny_bundle(0, device="cpu", dtype=torch.float32, config=TINY, model="infinitetalk")
    else:
        bundle = replace(random_bundle(device, CONFIGS["14b-480p"]), model="infinitetalk", adapter="single")
    engine = engine_options(args.engine)
    if not cuda:
        engine = replace(engine, compile=False)
    pipeline = TalkingVideoPipeline(bundle, engine=engine, device=torch.device(device))
    ready_s = time.perf_counter() - start
    resolution = "tiny" if args.tiny else "480p"
    source = write_source(args.out / "source.mp4", args.seconds, 64 if args.tiny else 640)
    speech = write_speech(args.out / "speech.wav", args.seconds)
    request = GenerationRequest(
        model="infinitetalk",
        video=source,
        speakers=(Speaker(speech),),
        prompt="A person talks to the camera in a bright studio",
        resolution=resolution,
        sampling=apply_preset(args.preset, resolution, SamplingParams(seed=42)),
    )
    checkpoint = ClipCheckpoint(args.out / "checkpoint", "bench")
    meter = ClipMeter(checkpoint, cuda, args.out / "clips.jsonl")
    print(f"ready in {ready_s:.1f} s", flush=True)
    host_peak_mib(reset=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tick = time.perf_counter()
    result = pipeline(request, progress=meter, checkpoint=checkpoint)
    meter.close_clip()
    generate_s = time.perf_counter() - tick
    tick = time.perf_counter()
    checkpoint.sink.assemble(args.out / "dub.mp4")
    assemble_s = time.perf_counter() - tick
    info = probe_mp4(args.out / "dub.mp4")
    rows = meter.rows
    results = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "engine": args.engine,
        "ready_s": round(ready_s, 1),
        "generate_s": round(generate_s, 1),
        "assemble_s": round(assemble_s, 2),
        "clips": len(rows),
        "frames": info.frames,
        "video_s": info.duration_s,
        "stages_s": {k: round(v, 2) for k, v in result.timings.items()},
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    later = rows[1:] or rows
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}))
    print(f"first clip: {rows[0]}\nlast clip: {rows[-1]}")
    print(
        f"clips 2..n: {np.mean([r['seconds'] for r in later]):.2f} s a clip; checkpoint state "
        f"{np.mean([r['state_s'] for r in rows]) * 1000:.1f} ms and "
        f"{rows[-1]['state_bytes'] / 2**20:.2f} MiB a clip; "
        f"segment encode {np.mean([r['segment_encode_s'] for r in rows]):.3f} s and "
        f"{np.mean([r['segment_bytes'] for r in rows]) / 2**20:.2f} MiB a clip"
    )


if __name__ == "__main__":
    main()
