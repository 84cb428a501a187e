from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from multitalk_worker.errors import CheckpointError
from multitalk_worker.weights.lora import merge_lora, merge_lora_file, parse_lora
from tests.test_transformer import CFG, _model


def _lora_file(path: Path, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA in the original (Kijai / lightx2v) layout: low-rank pairs, alphas, a diff_b and a diff."""
    g = torch.Generator().manual_seed(seed)
    dim, ffn = CFG.dim, CFG.ffn_dim
    tensors = {}
    for block in range(CFG.num_layers):
        p = f"diffusion_model.blocks.{block}."
        tensors[p + "self_attn.q.lora_down.weight"] = torch.randn(rank, dim, generator=g)
        tensors[p + "self_attn.q.lora_up.weight"] = torch.randn(dim, rank, generator=g)
        tensors[p + "self_attn.q.alpha"] = torch.tensor(float(rank))
        tensors[p + "ffn.0.lora_down.weight"] = torch.randn(rank, dim, generator=g)
        tensors[p + "ffn.0.lora_up.weight"] = torch.randn(ffn, rank, generator=g)
        tensors[p + "ffn.0.diff_b"] = torch.randn(ffn, generator=g)
        tensors[p + "norm3.diff"] = torch.randn(dim, generator=g)
    tensors["diffusion_model.patch_embedding.lora_down.weight"] = torch.randn(rank, 36, 1, 2, 2, generator=g)
    tensors["diffusion_model.patch_embedding.lora_up.weight"] = torch.randn(dim, rank, 1, 1, 1, generator=g)
    tensors["lora_unet_other.weight"] = torch.randn(3)  # another format: ignored
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(path))
    return tensors


def test_merge_lora_file_adds_scaled_updates_in_bf16(tmp_path: Path) -> None:
    raw = _lora_file(tmp_path / "lora.safetensors")
    model = _model().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = merge_lora_file(model, tmp_path / "lora.safetensors", scale=1.2)
    # per block: q, ffn.0 weight, ffn.0 bias, norm3 weight; plus the patch embedding
    assert result.applied == 4 * CFG.num_layers + 1
    assert result.ignored_keys == CFG.num_layers + 1  # alphas + the foreign key
    after = model.state_dict()
    bf = torch.bfloat16
    for n in range(CFG.num_layers):
        p = f"diffusion_model.blocks.{n}."
        up, down = (
            raw[p + "self_attn.q.lora_up.weight"].to(bf),
            raw[p + "self_attn.q.lora_down.weight"].to(bf),
        )
        expected = before[f"blocks.{n}.self_attn.q.weight"] + ((up @ down) * 1.2).to(bf)
        torch.testing.assert_close(after[f"blocks.{n}.self_attn.q.weight"], expected, rtol=0, atol=0)
        bias = before[f"blocks.{n}.ffn.0.bias"] + (raw[p + "ffn.0.diff_b"].to(bf) * 1.2).to(bf)
        torch.testing.assert_close(after[f"blocks.{n}.ffn.0.bias"], bias, rtol=0, atol=0)
        norm = before[f"blocks.{n}.norm3.weight"] + (raw[p + "norm3.diff"].to(bf) * 1.2).to(bf)
        torch.testing.assert_close(after[f"blocks.{n}.norm3.weight"], norm, rtol=0, atol=0)
        # untouched parameters stay bit-identical
        torch.testing.assert_close(
            after[f"blocks.{n}.self_attn.k.weight"], before[f"blocks.{n}.self_attn.k.weight"], rtol=0, atol=0
        )
    assert after["patch_embedding.weight"].shape == (CFG.dim, 36, 1, 2, 2)
    assert not torch.equal(after["patch_embedding.weight"], before["patch_embedding.weight"])


def test_lora_scale_zero_changes_nothing_and_model_still_runs(tmp_path: Path) -> None:
    _lora_file(tmp_path / "lora.safetensors")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora_file(model, tmp_path / "lora.safetensors", scale=0.0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_lora_errors_name_the_key(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(CheckpointError, match="blocks.0.self_attn.q.lora_down.weight"):
        parse_lora({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, CFG.dim)})
    with pytest.raises(CheckpointError, match="blocks.9.ffn.0.bias"):
        merge_lora(model, {"diffusion_model.blocks.9.ffn.0.diff_b": torch.ones(CFG.ffn_dim)}, scale=1.0)
    with pytest.raises(CheckpointError, match="does not fit"):
        merge_lora(model, {"diffusion_model.blocks.0.ffn.0.diff_b": torch.ones(3)}, scale=1.0)
    with pytest.raises(CheckpointError, match="not found"):
        merge_lora_file(model, tmp_path / "missing.safetensors", scale=1.0)
