"""The DMD LoRA merge (weights/longcat_lora.py, spec §2.7): the key grammar, strictness, the merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from multitalk_worker.errors import CheckpointError
from multitalk_worker.models.longcat.config import LongCatAvatarConfig
from multitalk_worker.models.longcat.transformer import LongCatAvatarTransformer
from multitalk_worker.weights.longcat import INT8_FOLDER, load_dit
from multitalk_worker.weights.longcat_lora import merge_lora, module_path, parse_lora
from tests.tiny_longcat import TINY_15, TINY_LORA_TARGETS, write_dmd_lora, write_longcat_int8

QKV = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
GONE = "lora___lorahyphen___blocks___lorahyphen___9___lorahyphen___ffn"  # no block 9 in the tiny DiT


@pytest.fixture
def lora(tmp_path: Path) -> dict[str, torch.Tensor]:
    return write_dmd_lora(tmp_path / "lora.safetensors", TINY_15, seed=4)


def _model() -> LongCatAvatarTransformer:
    torch.manual_seed(0)
    return LongCatAvatarTransformer(LongCatAvatarConfig.from_dict(TINY_15))


def test_module_names_and_split_ups(lora: dict[str, torch.Tensor]) -> None:
    assert module_path(QKV) == "blocks.0.attn.qkv"
    modules = {m.target: m for m in parse_lora(lora, file="lora")}
    assert set(modules) == set(TINY_LORA_TARGETS)
    assert len(modules["blocks.0.attn.qkv"].ups) == 3 and modules["blocks.0.attn.qkv"].alpha_scale == 0.375


def test_merge_adds_scaled_block_deltas(lora: dict[str, torch.Tensor]) -> None:
    model = _model()
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    assert merge_lora(model, lora) == len(TINY_LORA_TARGETS)
    down = lora[f"{QKV}.lora_down.weight"]
    ups = [lora[f"{QKV}.lora_up.blocks.{i}.weight"] for i in range(3)]
    rows = [ups[i] @ down[8 * i : 8 * (i + 1)] for i in range(3)]  # rank 8, q / k / v rows
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, before + 0.375 * torch.cat(rows))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(f"{QKV}.alpha_scale"), "missing alpha_scale"),
        (lambda t: t.pop(f"{QKV}.lora_up.blocks.1.weight"), "blocks 0..n-1"),
        (lambda t: t.update({"lora_unet_x.lora_down.weight": torch.zeros(1)}), "not a LongCat LoRA key"),
        (lambda t: t.update({f"{QKV}.lora_down.weight": torch.zeros(24, 3)}), "do not fit"),
        (
            lambda t: t.update(
                {
                    f"{GONE}.lora_down.weight": torch.zeros(8, 4),
                    f"{GONE}.lora_up.weight": torch.zeros(4, 8),
                    f"{GONE}.alpha_scale": torch.tensor(1.0),
                }
            ),
            "not a module of the DiT",
        ),
    ],
)
def test_bad_files_are_refused_before_any_weight_changes(
    lora: dict[str, torch.Tensor], edit: object, message: str
) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edit(lora)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=message):
        merge_lora(model, lora)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_int8_dit_takes_no_merge(tmp_path: Path, lora: dict[str, torch.Tensor]) -> None:
    write_longcat_int8(tmp_path / INT8_FOLDER, TINY_15, seed=2)
    model = load_dit(tmp_path, INT8_FOLDER, device=torch.device("cpu"), dtype=torch.float32)
    path = tmp_path / "dmd_lora.safetensors"
    save_file(lora, str(path))
    with pytest.raises(CheckpointError, match="Int8Linear"):
        merge_lora(model, path)
