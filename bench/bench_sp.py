"""Speed of one full-size DiT forward split over N GPUs (sequence parallelism), against one GPU.

    torchrun --nproc-per-node 2 bench/bench_sp.py --out DIR [--baseline] [--size 960x960] [--frames 81]
    torchrun --nproc-per-node 1 bench/bench_sp.py --out DIR
    torchrun --nproc-per-node 2 bench/bench_sp.py --out DIR --tiny --baseline   # CPU/gloo smoke run

Every rank builds the full-size DiT on the meta device, materialises it in bf16 on its GPU with random
weights (rank 0's, broadcast; no checkpoint is read) and the same random inputs, then times
`forward(..., sequence_parallel=...)`: median of --reps after --warmup, each timed between a barrier and
a CUDA synchronise. With one process the plain single-GPU forward is timed. With --baseline, rank 0 also
times the single-GPU forward on the same inputs (the other ranks wait) and reports the speed-up and the
relative error of the split prediction (‖sp − single‖ / ‖single‖ of the float32 output). Rank 0 writes
DIR/sp_<N>.json and prints it as the last line. Defaults: 720p 1:1 bucket (960×960 → L = 75 600 tokens),
81 video frames (21 latent frames), two persons (reference map and Label-RoPE on), reference runtime.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from bench import build_dit, dit_inputs  # bench/bench.py: the same model and inputs as the one-GPU bench
from multitalk_worker.models.configs import TINY, WAN_14B_720P, DiTConfig
from multitalk_worker.models.runtime import FAST_RUNTIME, REFERENCE_RUNTIME, DiTRuntime
from multitalk_worker.models.sequence_parallel import SequenceParallel
from multitalk_worker.models.transformer import MultiTalkTransformer

log = logging.getLogger("bench_sp")
RUNTIMES: dict[str, DiTRuntime] = {"reference": REFERENCE_RUNTIME, "fast": FAST_RUNTIME}


@torch.no_grad()
def build_model(config: DiTConfig, device: torch.device) -> MultiTalkTransformer:
    """Full-size DiT in bf16 on `device` with random weights, identical on every rank (rank 0's)."""
    model = build_dit(config, device)
    for p in model.parameters():
        dist.broadcast(p, group_src=0)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, reps: int
) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of `reps` calls after `warmup` calls, and the last output."""
    out = torch.empty(0)
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for sp_<N>.json")
    parser.add_argument("--size", default="960x960", help="pixel bucket HxW (720p: 960x960, 704x1280)")
    parser.add_argument("--frames", type=int, default=81, help="video frames, 4k+1")
    parser.add_argument("--persons", type=int, choices=(1, 2), default=2)
    parser.add_argument("--runtime", choices=sorted(RUNTIMES), default="reference")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--baseline", action="store_true", help="rank 0 also times the single-GPU forward")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU over gloo (smoke run)")
    return parser.parse_args()


@torch.no_grad()
def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(message)s")
    if args.tiny:
        device, config = torch.device("cpu"), TINY.dit
        dist.init_process_group("gloo")
    else:
        device, config = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), WAN_14B_720P.dit
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    parallel = SequenceParallel.from_group(dist.group.WORLD)
    runtime = RUNTIMES[args.runtime]
    size = tuple(int(v) for v in args.size.lower().split("x"))
    started = time.perf_counter()
    model = build_model(config, device)
    latent_frames = 1 + (args.frames - 1) // 4
    inputs = dit_inputs(config, size, latent_frames, 1, args.persons, device)  # type: ignore[arg-type]
    log.info("model and inputs ready in %.1f s", time.perf_counter() - started)
    split = parallel if parallel.world_size > 1 else None

    def forward_split() -> torch.Tensor:
        dist.barrier()
        return model(**inputs, runtime=runtime, sequence_parallel=split)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, out = timed(forward_split, device, args.warmup, args.reps)
    cuda = device.type == "cuda"
    result: dict[str, object] = {
        "world_size": parallel.world_size,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "size": args.size,
        "video_frames": args.frames,
        "tokens": out.shape[2] * out.shape[3] * out.shape[4] // 4,
        "persons": args.persons,
        "runtime": args.runtime,
        "forward_s": round(statistics.median(times), 3),
        "runs_s": [round(t, 3) for t in times],
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
    }
    if args.baseline and parallel.world_size > 1:
        if parallel.rank == 0:
            single_times, single = timed(
                lambda: model(**inputs, runtime=runtime), device, args.warmup, args.reps
            )
            result["single_gpu_forward_s"] = round(statistics.median(single_times), 3)
            result["speedup"] = round(result["single_gpu_forward_s"] / result["forward_s"], 3)  # type: ignore[operator]
            error = (out.double() - single.double()).norm() / single.double().norm()
            result["rel_err_vs_single_gpu"] = f"{error.item():.3e}"
        dist.barrier()
    if parallel.rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"sp_{parallel.world_size}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
