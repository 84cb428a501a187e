"""The LongCat-Video-Avatar DiT and its published folder layout: strict loading, config reading, the
continuation's cached keys, the state dict's key set (spec §2.4: 33 per block + 24)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitalk_worker.errors import CheckpointError, ModelMissing
from multitalk_worker.models.fp8 import fp8_linear_names
from multitalk_worker.models.longcat.config import LONGCAT_AVATAR_15, LongCatAvatarConfig
from multitalk_worker.models.longcat.transformer import Conditioning, LongCatAvatarTransformer
from multitalk_worker.weights.longcat import INT8_FOLDER, dit_problems, load_dit, verify_dits
from tests.tiny_longcat import INDEX_FILE, TINY_10, TINY_15, key_shapes, write_longcat_dit, write_longcat_int8

FOLDER = "base_model"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_longcat_dit(tmp_path / FOLDER, TINY_15, seed=1)
    return tmp_path


def _first_shard(root: Path) -> Path:
    return sorted((root / FOLDER).glob("diffusion_pytorch_model-*.safetensors"))[0]


def test_the_published_key_set_loads_exactly(folder: Path) -> None:
    model = load_dit(folder, FOLDER, device=torch.device("cpu"), dtype=torch.float32)
    written = load_file(str(_first_shard(folder))) | load_file(
        str(sorted((folder / FOLDER).glob("*.safetensors"))[1])
    )
    state = model.state_dict()
    assert len(state) == 33 * TINY_15["depth"] + 24 == len(key_shapes(TINY_15))
    assert all(torch.equal(state[k], v.float()) for k, v in written.items())


def test_full_size_module_tree_matches_the_published_table() -> None:
    """v1.5 at full size (meta device): 1 608 tensors, 15 852 916 800 parameters (spec §2.4)."""
    with torch.device("meta"):
        model = LongCatAvatarTransformer(LONGCAT_AVATAR_15)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == key_shapes(LONGCAT_AVATAR_15.to_dict())
    assert sum(v.numel() for v in model.state_dict().values()) == 15_852_916_800


@pytest.mark.parametrize(
    ("change", "kind", "key"),
    [
        ("drop", "missing_tensor", "blocks.0.attn.qkv.bias"),
        ("extra", "unexpected_tensor", "blocks.0.attn.extra"),
        ("reshape", "wrong_shape", "blocks.0.attn.qkv.bias"),
    ],
)
def test_every_key_problem_is_named_by_file_and_key(folder: Path, change: str, kind: str, key: str) -> None:
    shard = _first_shard(folder)
    tensors = load_file(str(shard))
    index_path = folder / FOLDER / INDEX_FILE
    index = json.loads(index_path.read_text())
    if change == "drop":
        del tensors[key]
        del index["weight_map"][key]
    elif change == "extra":
        tensors[key] = torch.zeros(3)
        index["weight_map"][key] = shard.name
    else:
        tensors[key] = torch.zeros(5)
    save_file(tensors, str(shard))
    index_path.write_text(json.dumps(index))
    problems = dit_problems(folder, FOLDER).problems
    assert [(p.kind, p.key) for p in problems] == [(kind, key)]
    assert FOLDER in problems[0].file
    with pytest.raises(CheckpointError) as err:
        load_dit(folder, FOLDER, device=torch.device("cpu"))
    assert key in str(err.value.key) + str(err.value)


def test_a_missing_shard_and_config_are_named(folder: Path) -> None:
    _first_shard(folder).unlink()
    problems = dit_problems(folder, FOLDER).problems
    assert problems[0].kind == "missing_file" and problems[0].file.endswith("00001-of-00002.safetensors")
    (folder / FOLDER / "config.json").unlink()
    with pytest.raises(ModelMissing, match="config.json"):
        load_dit(folder, FOLDER, device=torch.device("cpu"))


def test_config_reads_the_published_keys_and_refuses_unknown_ones(tmp_path: Path) -> None:
    assert LongCatAvatarConfig.from_dict(TINY_10).audio_block == 3
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_15 | {"num_experts": 8}))
    with pytest.raises(CheckpointError, match="num_experts"):
        LongCatAvatarConfig.from_json(path)
    assert LONGCAT_AVATAR_15.ffn_dim == 11008


def test_cached_keys_give_the_uncached_continuation() -> None:
    """The continuation with the cache pass's keys equals one call over all latents (spec §3.7; the
    reference's own probe: 7.2e-7)."""
    cfg = LongCatAvatarConfig.from_dict(TINY_15)
    torch.manual_seed(0)
    model = LongCatAvatarTransformer(cfg).eval()
    cond = Conditioning(num_cond_latents=5, num_ref_latents=1, ref_img_index=6, mask_frame_range=1)
    clean, noisy = torch.randn(1, 16, 5, 4, 4), torch.randn(1, 16, 4, 4, 4)
    text, audio = torch.randn(1, 12, 32), torch.randn(1, 29, 5, 2, 3)
    t = torch.tensor([[0.0] * 5 + [700.0] * 4])
    with torch.no_grad():
        cache = model.clean_cache(clean, torch.zeros_like(text), audio, cond=cond)
        cached = model(noisy, t[:, 5:], text, None, audio, cond=cond, kv_cache=cache)
        whole = model(torch.cat([clean, noisy], dim=2), t, text, None, audio, cond=cond)
    torch.testing.assert_close(cached, whole[:, :, 5:], rtol=0, atol=2e-6)


def test_bad_inputs_are_named() -> None:
    model = LongCatAvatarTransformer(LongCatAvatarConfig.from_dict(TINY_15))
    latent, text = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 12, 32)
    with pytest.raises(ValueError, match="audio has 5 frames"):
        model(latent, torch.tensor([1.0]), text, None, torch.randn(1, 5, 5, 2, 3))
    with pytest.raises(ValueError, match="needs a clean reference latent"):
        model(
            latent,
            torch.tensor([1.0]),
            text,
            None,
            torch.randn(2, 9, 5, 2, 3),
            person_masks=torch.ones(3, 32, 32),
        )


def test_int8_folder_loads_its_stored_dtypes_and_matches_the_dequantized_weights(tmp_path: Path) -> None:
    """base_model_int8/: int8 weights and float32 scales kept as stored; in float32 the forward equals a
    float model whose linears carry q·s (the reference's QuantizedLinear in a float32 run)."""
    stored = write_longcat_int8(tmp_path / INT8_FOLDER, TINY_15, seed=2)
    assert not dit_problems(tmp_path, INT8_FOLDER).problems
    model = load_dit(tmp_path, INT8_FOLDER, device=torch.device("cpu"), dtype=torch.float32)
    state = model.state_dict()
    assert state["blocks.0.attn.qkv.weight_int8"].dtype == torch.int8
    assert state["blocks.0.attn.qkv.weight_scale"].dtype == torch.float32
    assert state["x_embedder.proj.weight"].dtype == torch.float32
    float_model = LongCatAvatarTransformer(LongCatAvatarConfig.from_dict(TINY_15)).eval()
    dequantized = {}
    for key, value in stored.items():
        if key.endswith(".weight_int8"):
            name = key.removesuffix(".weight_int8")
            dequantized[f"{name}.weight"] = value.float() * stored[f"{name}.weight_scale"][:, None]
        elif not key.endswith(".weight_scale"):
            dequantized[key] = value.float()
    float_model.load_state_dict(dequantized, strict=True)
    latent, text, audio = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 12, 32), torch.randn(1, 9, 5, 2, 3)
    t = torch.tensor([[0.0, 600.0, 600.0]])
    cond = Conditioning(num_cond_latents=1)
    with torch.no_grad():
        got = model(latent, t, text, None, audio, cond=cond)
        want = float_model(latent, t, text, None, audio, cond=cond)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_blocks_trace_as_one_graph_each() -> None:
    """The fast engine compiles `model.blocks` one by one (models/runtime.compile_blocks): each LongCat block
    must trace without a graph break, routing and cached keys included (dynamo's eager backend: the graph
    capture is what is checked, not a kernel)."""
    cfg = LongCatAvatarConfig.from_dict(TINY_15)
    torch.manual_seed(0)
    model = LongCatAvatarTransformer(cfg).eval()
    cond = Conditioning(num_cond_latents=5, num_ref_latents=1, ref_img_index=6, mask_frame_range=1)
    clean, noisy = torch.randn(1, 16, 5, 4, 4), torch.randn(1, 16, 4, 4, 4)
    text, audio = torch.randn(1, 12, 32), torch.randn(2, 29, 5, 2, 3)
    masks = torch.zeros(3, 32, 32)
    masks[0, :, :12], masks[1, :, 20:] = 1, 1
    masks[2] = 1 - masks[0] - masks[1]
    t = torch.tensor([700.0])
    with torch.no_grad():
        cache = model.clean_cache(clean, text, audio, cond=cond)
        want = model(noisy, t, text, None, audio, cond=cond, person_masks=masks, kv_cache=cache)
        for block in model.blocks:
            block.compile(backend="eager", fullgraph=True, dynamic=False)
        got = model(noisy, t, text, None, audio, cond=cond, person_masks=masks, kv_cache=cache)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fp8_tier_keeps_the_float32_adaln_linears() -> None:
    """The fp8 tier converts the bf16 linears of every block (attention projections, FFN) and leaves the
    adaLN modulations, which run in float32 on float32 weights (blocks.linear_fp32), as they are."""
    with torch.device("meta"):
        model = LongCatAvatarTransformer(LongCatAvatarConfig.from_dict(TINY_15))
    names = fp8_linear_names(model)
    per_block = {name.split(".", 2)[2] for name in names}
    assert per_block == {
        "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
        "audio_cross_attn.q_linear", "audio_cross_attn.kv_linear", "audio_cross_attn.proj",
        "ffn.w1", "ffn.w2", "ffn.w3",
    }  # fmt: skip
    assert len(names) == 11 * len(model.blocks)
    everything = fp8_linear_names(model, keep=())
    assert sorted(set(everything) - set(names)) == [
        f"blocks.{i}.{kind}.1"
        for i in range(len(model.blocks))
        for kind in ("adaLN_modulation", "audio_adaLN_modulation")
    ]


def test_verify_checks_the_required_folders_and_a_present_int8_one(folder: Path) -> None:
    assert [(c.folder, c.problems) for c in verify_dits(folder, "1.5")] == [(FOLDER, [])]
    write_longcat_int8(folder / INT8_FOLDER, TINY_15, seed=2)
    assert [c.folder for c in verify_dits(folder, "1.5")] == [FOLDER, INT8_FOLDER]
    missing = verify_dits(folder, "1.0")
    assert [(c.folder, c.problems[0].kind) for c in missing] == [
        ("avatar_single", "missing_file"),
        ("avatar_multi", "missing_file"),
    ]
