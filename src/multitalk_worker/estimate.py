"""Estimated GPU time of a job, from measured seconds per DiT pass (bench/RESULTS.md).

A job of `clips` clips with `steps` denoising steps of `passes` DiT passes each (3, or 2 when the text
scale is 1) costs about `clips × (steps × passes × pass_s + clip_s)`, where `clip_s` is the rest of a clip's
GPU work (conditioning, VAE decode, colour match, 8-bit frames). Warm runs only: a first job that compiles
(the fast engine) takes longer, and loading the model is not counted. No measurement for the GPU, engine and
resolution: no estimate, and the reason says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PassTiming:
    gpu: str  # matched as a substring of torch.cuda.get_device_name()
    engine: str  # "reference", "fast", "fast+fp8"
    resolution: str
    pass_s: float
    clip_s: float
    source: str


# Each row: one warm 81-frame clip end to end through MultiTalkPipeline, fast preset (4 steps x 2 passes).
# pass_s = DiT sampling / 8; clip_s = condition + VAE decode + colour + frames of the same run.
PASS_TIMINGS: tuple[PassTiming, ...] = (
    PassTiming(
        "H100", "fast", "480p", 25.76 / 8, 1.17 + 1.91 + 0.04 + 0.08, "bench/RESULTS.md run H4 (576x704)"
    ),
    PassTiming(
        "H100", "fast+fp8", "480p", 22.05 / 8, 1.17 + 1.93 + 0.04, "bench/RESULTS.md run H3 (576x704)"
    ),
    # run F predates the GPU colour correction; its CPU colour stage (9.78 s) is left out
    PassTiming("H100", "reference", "480p", 38.26 / 8, 4.01 + 3.84, "bench/RESULTS.md run F (576x704)"),
    PassTiming(
        "H100",
        "reference",
        "720p",
        118.28 / 8,
        5.32 + 7.65 + 0.1 + 0.18,
        "bench/RESULTS.md run H6 (896x1024)",
    ),
)


def engine_key(engine: str, fp8: bool) -> str:
    return f"{engine}+fp8" if fp8 else engine


def find_timing(gpu_name: str | None, engine: str, resolution: str) -> PassTiming | None:
    if gpu_name is None:
        return None
    for row in PASS_TIMINGS:
        if row.gpu in gpu_name and row.engine == engine and row.resolution == resolution:
            return row
    return None


def estimate_gpu_s(
    *, gpu_name: str | None, engine: str, resolution: str, clips: int, steps: int, passes: int
) -> dict[str, Any]:
    """`{"gpu_s", "gpu", "engine", "pass_s", "source"}`, or `{"gpu_s": None, "reason"}`."""
    row = find_timing(gpu_name, engine, resolution)
    if row is None:
        measured = ", ".join(sorted({f"{r.gpu} {r.engine} {r.resolution}" for r in PASS_TIMINGS}))
        where = gpu_name or "no CUDA device"
        return {
            "gpu_s": None,
            "reason": f"not measured for {where}, {engine}, {resolution} (measured: {measured})",
        }
    total = clips * (steps * passes * row.pass_s + row.clip_s)
    return {
        "gpu_s": round(total, 1),
        "gpu": row.gpu,
        "engine": row.engine,
        "pass_s": round(row.pass_s, 3),
        "source": row.source,
    }
