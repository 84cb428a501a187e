"""Sequence parallelism (models/sequence_parallel.py): the tiny DiT split over 2 CPU processes (gloo) gives
the single-process prediction, in float32 (tight) and bfloat16 (stated tolerance)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multitalk_worker.models.configs import TINY, DiTConfig
from multitalk_worker.models.runtime import REFERENCE_RUNTIME, DiTRuntime
from multitalk_worker.models.sequence_parallel import SequenceParallel, SequenceShard
from multitalk_worker.models.transformer import MultiTalkTransformer

CFG = TINY.dit
THREE_HEADS = replace(CFG, dim=36, num_heads=3, ref_map_head_groups=3)  # splits over 3 processes
ONE_HEAD = replace(CFG, num_heads=1, ref_map_head_groups=1)  # does not split over 2
SHORTCUTS = DiTRuntime(fp32_rope=True, fused_reference_map=True)  # the fast path's formulations


@dataclass(frozen=True)
class Case:
    """One forward: batch, persons, latent grid (frames, h, w), model dtype and config, the number of
    processes and the runtime."""

    batch: int
    persons: int
    frames: int
    height: int
    width: int
    dtype: torch.dtype = torch.float32
    world_size: int = 2
    config: DiTConfig = CFG
    runtime: DiTRuntime = REFERENCE_RUNTIME


CASES: dict[str, Case] = {
    # S = 3·5 = 15 tokens per frame, L = 45: the shards (23 + 22 and one padding token) split frame 1
    "two_persons_partial_frames": Case(batch=2, persons=2, frames=3, height=6, width=10),
    # L = 64: two whole frames per rank
    "one_person_whole_frames": Case(batch=1, persons=1, frames=4, height=8, width=8),
    # one frame of 15 tokens over two shards of 8: the reference-map keys come from both ranks
    "two_persons_frame0_spans_ranks": Case(batch=1, persons=2, frames=1, height=6, width=10),
    "two_persons_bf16": Case(batch=1, persons=2, frames=3, height=6, width=10, dtype=torch.bfloat16),
    "two_persons_shortcuts": Case(batch=1, persons=2, frames=3, height=6, width=10, runtime=SHORTCUTS),
    # 3 processes, L = 4 in shards of 2: the last rank holds only padding
    "three_ranks_one_empty": Case(
        batch=1, persons=2, frames=1, height=4, width=4, world_size=3, config=THREE_HEADS
    ),
}
FP32_TOLERANCE = 5e-6  # max |Δ| / max |reference|: float32 rounding of kernels on other shapes
BF16_TOLERANCE = 1e-2  # max |Δ| / max |reference|: about two bf16 steps (2^-8 = 3.9e-3 each)


def _model(case: Case) -> MultiTalkTransformer:
    torch.manual_seed(0)
    model = MultiTalkTransformer(case.config).eval()
    with torch.no_grad():  # non-trivial norm weights, as in test_transformer
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model.to(case.dtype)


def _inputs(case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    b, t, h, w, config = case.batch, case.frames, case.height, case.width, case.config
    masks = torch.zeros(3, h, w)
    masks[0, 2:, : w // 2] = 1  # person 1 left, person 2 right, below two background rows
    masks[1, 2:, w // 2 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    audio_shape = (b, case.persons, 4 * (t - 1) + 1, 5, config.audio_layers, config.audio_channels)
    return {
        "latent": torch.randn(b, 16, t, h, w, generator=g),
        "timestep": torch.rand(b, generator=g) * 1000,
        "context": torch.randn(b, 5, config.text_dim, generator=g),
        "clip_fea": torch.randn(b, 3, config.image_dim, generator=g),
        "y": torch.randn(b, 20, t, h, w, generator=g),
        "audio": torch.randn(audio_shape, generator=g),
        "person_masks": masks,
    }


def _forward(case: Case, parallel: SequenceParallel | None) -> torch.Tensor:
    with torch.no_grad():
        return _model(case)(**_inputs(case), runtime=case.runtime, sequence_parallel=parallel)


def _run_rank(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    """One process of the group: its cases with sequence parallelism, results saved for the parent."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=rendezvous, rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        parallel = SequenceParallel.from_group(dist.group.WORLD)
        results: dict[str, object] = {
            name: _forward(case, parallel) for name, case in CASES.items() if case.world_size == world_size
        }
        try:
            _forward(replace(CASES["one_person_whole_frames"], config=ONE_HEAD), parallel)
        except ValueError as exc:
            results["heads_error"] = str(exc)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def group_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, object]]]:
    """Run each process group once; world size -> per-rank results. The forkserver, with torch
    preloaded, starts the processes in ~2 s (spawn: ~8 s on 2 cores)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "multitalk_worker.models.transformer", _run_rank.__module__])
    results = {}
    for world_size in sorted({case.world_size for case in CASES.values()}):
        root = tmp_path_factory.mktemp(f"sequence_parallel_{world_size}")
        mp.start_processes(
            _run_rank,
            args=(world_size, f"file://{root / 'rendezvous'}", str(root)),
            nprocs=world_size,
            start_method="forkserver",
        )
        results[world_size] = [torch.load(root / f"rank{r}.pt") for r in range(world_size)]
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_sequence_parallel_matches_single_process(name: str, group_results: dict[int, list[dict]]) -> None:
    case = CASES[name]
    expected = _forward(case, None)
    tolerance = FP32_TOLERANCE if case.dtype == torch.float32 else BF16_TOLERANCE
    scale = expected.abs().max().item()
    ranks = group_results[case.world_size]
    for rank, results in enumerate(ranks):
        got = results[name]
        assert got.shape == expected.shape and got.dtype == torch.float32
        error = (got - expected).abs().max().item() / scale
        assert error <= tolerance, f"rank {rank}: relative max error {error:.3g} > {tolerance}"
        assert torch.equal(got, ranks[0][name])  # every rank holds the same prediction, bit for bit


def test_sequence_parallel_rejects_heads_that_do_not_split(group_results: dict[int, list[dict]]) -> None:
    for results in group_results[2]:
        assert "1 attention heads" in results["heads_error"]
        assert "accepted process counts: [1]" in results["heads_error"]


def test_sequence_shard_layout() -> None:
    """Shard arithmetic without a group: equal shards, real tokens first, padding only at the end."""
    no_group = None  # the layout needs ranks only; collectives are tested above
    ranks = [SequenceParallel(group=no_group, rank=r, world_size=3) for r in range(3)]  # type: ignore[arg-type]
    shards = [SequenceShard(parallel=rank, length=10, frame_tokens=4) for rank in ranks]
    assert [(s.start, s.shard_length, s.valid) for s in shards] == [(0, 4, 4), (4, 4, 4), (8, 4, 2)]
    x = torch.arange(10.0)[None]
    parts = [s.scatter(x, dim=1) for s in shards]
    assert torch.equal(torch.cat(parts, dim=1)[:, :10], x)
    assert torch.equal(parts[2], torch.tensor([[8.0, 9.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="rank 3 is not in a group of 3"):
        SequenceParallel(group=no_group, rank=3, world_size=3)  # type: ignore[arg-type]
