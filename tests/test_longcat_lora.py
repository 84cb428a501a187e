"""The DMD LoRA (weights/longcat_lora.py, models/longcat/lora.py, spec §2.7): the key grammar, strictness,
the run-time branch (tests/test_longcat_load.py checks it inside the pipeline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from multitalk_worker.errors import CheckpointError
from multitalk_worker.models.longcat.config import LongCatAvatarConfig
from multitalk_worker.models.longcat.lora import LoraLinear
from multitalk_worker.models.longcat.transformer import LongCatAvatarTransformer
from multitalk_worker.weights.longcat import INT8_FOLDER, load_dit
from multitalk_worker.weights.longcat_lora import attach_lora, module_path, parse_lora
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


def test_attached_branch_adds_the_scaled_split_deltas_when_on(lora: dict[str, torch.Tensor]) -> None:
    model = _model()
    keys = set(model.state_dict())
    weight = model.get_parameter("blocks.0.attn.qkv.weight")
    switch = attach_lora(model, lora)
    assert len(switch) == len(TINY_LORA_TARGETS) and not switch.enabled
    qkv = model.get_submodule("blocks.0.attn.qkv")
    assert isinstance(qkv, LoraLinear) and qkv.weight is weight  # the same parameters
    assert set(model.state_dict()) == keys
    down = lora[f"{QKV}.lora_down.weight"]
    ups = [lora[f"{QKV}.lora_up.blocks.{i}.weight"] for i in range(3)]
    rows = [ups[i] @ down[8 * i : 8 * (i + 1)] for i in range(3)]  # rank 8, q / k / v rows
    x = torch.randn(3, weight.shape[1])
    assert torch.equal(qkv(x), torch.nn.functional.linear(x, weight, qkv.bias))
    switch.enabled = True
    merged = torch.nn.functional.linear(x, weight + 0.375 * torch.cat(rows), qkv.bias)
    torch.testing.assert_close(qkv(x), merged, rtol=1e-5, atol=1e-5)


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
def test_bad_files_are_refused_before_any_layer_changes(
    lora: dict[str, torch.Tensor], edit: object, message: str
) -> None:
    model = _model()
    edit(lora)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=message):
        attach_lora(model, lora)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_an_int8_dit_takes_no_lora_yet(tmp_path: Path, lora: dict[str, torch.Tensor]) -> None:
    write_longcat_int8(tmp_path / INT8_FOLDER, TINY_15, seed=2)
    model = load_dit(tmp_path, INT8_FOLDER, device=torch.device("cpu"), dtype=torch.float32)
    path = tmp_path / "dmd_lora.safetensors"
    save_file(lora, str(path))
    with pytest.raises(CheckpointError, match="Int8Linear"):
        attach_lora(model, path)
