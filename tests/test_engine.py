"""Engine options: the fast path and LoRAs reach the networks through the pipeline, the CLI and Settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from multitalk_worker.config import Settings
from multitalk_worker.errors import CheckpointError, InvalidInput
from multitalk_worker.models.runtime import FAST_RUNTIME
from multitalk_worker.pipeline.engine import (
    ENGINES,
    EngineOptions,
    LoraSpec,
    engine_options,
    parse_lora_arg,
    prepare_bundle,
)
from multitalk_worker.service.resident import engine_from_settings
from multitalk_worker.tiny import build_tiny_bundle


def _lora_file(path: Path, bundle_dim: int, rank: int = 2) -> Path:
    """One low-rank update of block 0's self-attention q, in the reference's key format (spec 9.1)."""
    gen = torch.Generator().manual_seed(3)
    key = "diffusion_model.blocks.0.self_attn.q"
    down = torch.randn(rank, bundle_dim, generator=gen)
    up = torch.randn(bundle_dim, rank, generator=gen)
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, str(path))
    return path


def test_parse_lora_arg() -> None:
    assert parse_lora_arg("a/b.safetensors") == LoraSpec(Path("a/b.safetensors"), 1.0)
    assert parse_lora_arg("a/b.safetensors=0.75") == LoraSpec(Path("a/b.safetensors"), 0.75)
    with pytest.raises(InvalidInput, match="must be a number"):
        parse_lora_arg("a.safetensors=high")


def test_engine_names_and_settings() -> None:
    assert engine_options("reference") == EngineOptions()
    assert engine_options("fast").runtime == FAST_RUNTIME and engine_options("fast").compile
    with pytest.raises(InvalidInput, match="accepted: reference, fast"):
        engine_options("turbo")
    settings = Settings.from_env({"MULTITALK_ENGINE": "fast", "MULTITALK_LORAS": "x.safetensors=0.5, y.st"})
    options = engine_from_settings(settings)
    assert options.runtime == ENGINES["fast"].runtime
    assert options.loras == (LoraSpec(Path("x.safetensors"), 0.5), LoraSpec(Path("y.st"), 1.0))


def test_prepare_bundle_merges_lora_in_place(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(seed=0)
    before = bundle.dit.blocks[0].self_attn.q.weight.detach().clone()
    other = bundle.dit.blocks[1].self_attn.q.weight.detach().clone()
    lora = _lora_file(tmp_path / "lora.safetensors", bundle.config.dit.dim)
    prepare_bundle(bundle, EngineOptions(loras=(LoraSpec(lora, 0.5),)), torch.device("cpu"))
    after = bundle.dit.blocks[0].self_attn.q.weight
    assert not torch.equal(before, after)
    assert torch.equal(other, bundle.dit.blocks[1].self_attn.q.weight)


def test_prepare_bundle_rejects_missing_lora_and_cpu_fp8(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(seed=0)
    with pytest.raises(CheckpointError, match="not found"):
        prepare_bundle(
            bundle, EngineOptions(loras=(LoraSpec(tmp_path / "missing.safetensors"),)), torch.device("cpu")
        )
    with pytest.raises(InvalidInput, match="CUDA"):
        prepare_bundle(bundle, EngineOptions(fp8=True), torch.device("cpu"))
