"""Write a tiny LongCat-Video-Avatar DiT folder in exactly the published format (spec §2.3, §2.4, §2.11).

    write_longcat_dit(folder, config, seed)   config.json + diffusion_pytorch_model-0000i-of-0000N.safetensors
                                              + diffusion_pytorch_model.safetensors.index.json, bf16 tensors
    write_longcat_folders(root, bundle)       the whole K and B folders of an in-process tiny bundle (§2.2)

The key names and shapes are the spec's table (§2.4), written out here from the config dict alone, not from
our module tree, so a loader or model naming bug cannot cancel itself out. Values are seeded random; every
tensor is stored in bfloat16 as published (a float32 load upcasts them exactly).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from multitalk_worker.pipeline.longcat import LongCatBundle

SHARD_STEM = "diffusion_pytorch_model"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"

# A tiny v1.5-shaped DiT (2 layers, 2 heads): head dim 32 keeps the 3D RoPE's three axes non-trivial.
TINY_15: dict[str, Any] = {
    "_class_name": "LongCatVideoAvatarTransformer3DModel",
    "architectures": ["LongCatVideoAvatarTransformer3DModel"],
    "_diffusers_version": "0.32.0",
    "in_channels": 16, "out_channels": 16, "hidden_size": 64, "depth": 2, "num_heads": 2,
    "caption_channels": 32, "model_max_length": 12, "mlp_ratio": 4, "adaln_tembed_dim": 32,
    "frequency_embedding_size": 256, "patch_size": [1, 2, 2], "enable_flashattn3": False,
    "enable_flashattn2": True, "enable_xformers": False, "enable_bsa": False, "bsa_params": None,
    "cp_split_hw": None, "text_tokens_zero_pad": True, "audio_window": 5, "audio_block": 2,
    "audio_channel": 3, "intermediate_dim": 16, "output_dim": 16, "context_tokens": 4, "vae_scale": 4,
    "audio_prenorm": False, "class_range": 24, "class_interval": 4,
}  # fmt: skip
# v1.0-shaped: other audio features (wav2vec2's 12 x 768 in the real model) and valid-only text keys.
TINY_10: dict[str, Any] = TINY_15 | {"audio_block": 3, "audio_channel": 2, "text_tokens_zero_pad": False}


def _ffn_dim(hidden: int, ratio: int) -> int:
    inner = int(2 * hidden * ratio / 3)
    return 256 * ((inner + 255) // 256)


def key_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every published tensor name and shape for a config dict (spec §2.4: 33 per block + 24 top level)."""
    c, ct, hd = cfg["hidden_size"], cfg["adaln_tembed_dim"], cfg["hidden_size"] // cfg["num_heads"]
    ffn, ca = _ffn_dim(c, cfg["mlp_ratio"]), cfg["output_dim"]
    features = cfg["audio_block"] * cfg["audio_channel"]
    pt, ph, pw = cfg["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj.weight": (c, cfg["in_channels"], pt, ph, pw),
        "x_embedder.proj.bias": (c,),
        "t_embedder.mlp.0.weight": (ct, cfg["frequency_embedding_size"]),
        "t_embedder.mlp.0.bias": (ct,),
        "t_embedder.mlp.2.weight": (ct, ct),
        "t_embedder.mlp.2.bias": (ct,),
        "y_embedder.y_proj.0.weight": (c, cfg["caption_channels"]),
        "y_embedder.y_proj.0.bias": (c,),
        "y_embedder.y_proj.2.weight": (c, c),
        "y_embedder.y_proj.2.bias": (c,),
        "audio_proj.proj1.weight": (cfg["intermediate_dim"], cfg["audio_window"] * features),
        "audio_proj.proj1.bias": (cfg["intermediate_dim"],),
        "audio_proj.proj1_vf.weight": (
            cfg["intermediate_dim"],
            (cfg["audio_window"] + cfg["vae_scale"] - 1) * features,
        ),  # fmt: skip
        "audio_proj.proj1_vf.bias": (cfg["intermediate_dim"],),
        "audio_proj.proj2.weight": (cfg["intermediate_dim"], cfg["intermediate_dim"]),
        "audio_proj.proj2.bias": (cfg["intermediate_dim"],),
        "audio_proj.proj3.weight": (cfg["context_tokens"] * ca, cfg["intermediate_dim"]),
        "audio_proj.proj3.bias": (cfg["context_tokens"] * ca,),
        "audio_proj.norm.weight": (ca,),
        "audio_proj.norm.bias": (ca,),
        "final_layer.linear.weight": (pt * ph * pw * cfg["out_channels"], c),
        "final_layer.linear.bias": (pt * ph * pw * cfg["out_channels"],),
        "final_layer.adaLN_modulation.1.weight": (2 * c, ct),
        "final_layer.adaLN_modulation.1.bias": (2 * c,),
    }
    for n in range(cfg["depth"]):
        b = f"blocks.{n}."
        block = {
            "adaLN_modulation.1.weight": (6 * c, ct), "adaLN_modulation.1.bias": (6 * c,),
            "audio_adaLN_modulation.1.weight": (3 * c, ct), "audio_adaLN_modulation.1.bias": (3 * c,),
            "pre_crs_attn_norm.weight": (c,), "pre_crs_attn_norm.bias": (c,),
            "pre_video_crs_attn_norm.weight": (c,), "pre_video_crs_attn_norm.bias": (c,),
            "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,),
            "attn.q_norm.weight": (hd,), "attn.k_norm.weight": (hd,),
            "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
            "cross_attn.q_linear.weight": (c, c), "cross_attn.q_linear.bias": (c,),
            "cross_attn.kv_linear.weight": (2 * c, c), "cross_attn.kv_linear.bias": (2 * c,),
            "cross_attn.proj.weight": (c, c), "cross_attn.proj.bias": (c,),
            "cross_attn.q_norm.weight": (hd,), "cross_attn.k_norm.weight": (hd,),
            "audio_cross_attn.q_linear.weight": (c, c), "audio_cross_attn.q_linear.bias": (c,),
            "audio_cross_attn.kv_linear.weight": (2 * c, ca), "audio_cross_attn.kv_linear.bias": (2 * c,),
            "audio_cross_attn.proj.weight": (c, c), "audio_cross_attn.proj.bias": (c,),
            "audio_cross_attn.q_norm.weight": (hd,), "audio_cross_attn.k_norm.weight": (hd,),
            "ffn.w1.weight": (ffn, c), "ffn.w3.weight": (ffn, c), "ffn.w2.weight": (c, ffn),
        }  # fmt: skip
        if cfg["audio_prenorm"]:
            block |= {"pre_audio_crs_attn_norm.weight": (ca,), "pre_audio_crs_attn_norm.bias": (ca,)}
        shapes |= {b + k: v for k, v in block.items()}
    return shapes


def random_tensors(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded bf16 values: norm weights near 1, biases and matrices scaled by 1/√fan-in."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in key_shapes(cfg).items():
        value = torch.randn(shape, generator=gen)
        if "norm" in key and key.endswith("weight") and len(shape) == 1:
            value = 1.0 + 0.1 * value
        elif len(shape) > 1:
            value = value / (torch.tensor(shape[1:]).prod().float().sqrt())
        else:
            value = 0.1 * value
        out[key] = value.to(torch.bfloat16)
    return out


def write_longcat_dit(
    folder: Path,
    cfg: dict[str, Any],
    seed: int,
    *,
    shards: int = 2,
    tensors: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """config.json, the shards and their index under `folder`; returns the tensors written."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(cfg, seed) if tensors is None else tensors
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    keys = list(tensors)
    per_shard = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"{SHARD_STEM}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return tensors


INT8_STEM = "quantized_model"
INT8_INDEX = "quantized_model.safetensors.index.json"


def int8_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The INT8 file's tensors from bf16 ones (spec §2.6): every 2-D `.weight` (a linear) except
    `final_layer.linear` as `weight_int8` = clamp(round(w / s), −128, 127), `weight_scale` s =
    max|w_row| (≥ 1e-8) / 127 in float32; its bias and every other tensor as stored (bf16)."""
    out = {}
    for key, value in tensors.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and value.ndim == 2 and "final_layer.linear" not in key:
            w = value.float()
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            out[f"{name}.weight_int8"] = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
            out[f"{name}.weight_scale"] = scale
        else:
            out[key] = value
    return out


def write_longcat_int8(folder: Path, cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """`base_model_int8/` as published: config.json, quantization_config.json, one shard and its index."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = int8_tensors(random_tensors(cfg, seed))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    quant = {"quantization_method": "int8_per_channel_symmetric", "skip_patterns": ["final_layer.linear"]}
    (folder / "quantization_config.json").write_text(json.dumps(quant, indent=2) + "\n")
    name = f"{INT8_STEM}-00001-of-00001.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(tensors, name)}
    (folder / INT8_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return tensors


LORA_FILE = "lora/dmd_lora.safetensors"
LORA_HYPHEN = "___lorahyphen___"
# module path -> parts its lora_up is split in (0: one `lora_up.weight`), as the DMD file may carry them
TINY_LORA_TARGETS = {
    "blocks.0.attn.qkv": 3,
    "blocks.1.cross_attn.kv_linear": 2,
    "blocks.0.ffn.w1": 0,
    "blocks.1.audio_cross_attn.q_linear": 0,
    "blocks.1.adaLN_modulation.1": 0,
}


def write_dmd_lora(
    path: Path, cfg: dict[str, Any], seed: int, *, rank: int = 8, alpha_scale: float = 0.375
) -> dict[str, torch.Tensor]:
    """A LoRA in the reference's key grammar (spec §2.7), float32 as published, with split ups."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = key_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for target, parts in TINY_LORA_TARGETS.items():
        out, inp = shapes[f"{target}.weight"]
        name = "lora" + LORA_HYPHEN + target.replace(".", LORA_HYPHEN)
        n = max(parts, 1)
        tensors[f"{name}.lora_down.weight"] = torch.randn(n * rank, inp, generator=gen) / inp**0.5
        ups = {f"{name}.lora_up.blocks.{i}.weight": (out // n, rank) for i in range(parts)} or {
            f"{name}.lora_up.weight": (out, rank)
        }
        tensors |= {k: 0.5 * torch.randn(s, generator=gen) / rank**0.5 for k, s in ups.items()}
        tensors[f"{name}.alpha_scale"] = torch.tensor(alpha_scale)
    save_file(tensors, str(path))
    return tensors


# ------------------------------------------------------------- whole model folders (K and B, spec §2.1, §2.2)

BASE_FOLDER = "LongCat-Video"  # the published base repository, beside the model folder (spec §2.1)
MODEL_FOLDERS = {"longcat-avatar": "LongCat-Video-Avatar-1.5", "longcat-avatar-1.0": "LongCat-Video-Avatar"}
DIT_FOLDERS = {"longcat-avatar": ("base_model",), "longcat-avatar-1.0": ("avatar_single", "avatar_multi")}
TEXT_SHARDS = 2


def round_to(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round a float32 module's parameters to `dtype`'s values in place (still float32), so that a file
    written in `dtype`, as published, loads back to exactly these values."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(param.to(dtype).float())


def dit_config(model: str) -> dict[str, Any]:
    """The tiny in-process DiT's config in the published config.json's key set (TINY_15's keys)."""
    from multitalk_worker.tiny_longcat import TINY_DIT

    return TINY_15 | TINY_DIT[model]


def write_base_folder(base: Path, bundle: LongCatBundle) -> Path:
    """B (`LongCat-Video/`): tokenizer/, text_encoder/ (2 float32 shards + index, `shared.weight` stored
    once, as transformers saves it), vae/ (float32), from `bundle`'s own networks."""
    from tests.tiny import _plain, write_index, write_sharded

    text = _plain(bundle.text_encoder.state_dict(), torch.float32)
    text.pop("encoder.embed_tokens.weight")  # tied to shared.weight; saved once
    weight_map = write_sharded(base / "text_encoder", text, "model", TEXT_SHARDS)
    write_index(base / "text_encoder" / "model.safetensors.index.json", weight_map, text)
    bundle.text_encoder.config.save_pretrained(base / "text_encoder")
    bundle.tokenizer.save_pretrained(base / "tokenizer")
    (base / "vae").mkdir(parents=True)
    vae_file = base / "vae" / "diffusion_pytorch_model.safetensors"
    save_file(_plain(bundle.vae.state_dict(), torch.float32), str(vae_file), metadata={"format": "pt"})
    bundle.vae.save_config(base / "vae")
    return base


def write_longcat_folders(
    root: Path,
    bundle: LongCatBundle,
    *,
    multi: dict[str, torch.Tensor] | None = None,
    lora: dict[str, torch.Tensor] | None = None,
) -> Path:
    """`root/LongCat-Video/` (tokenizer, text_encoder, vae) and the model folder K of `bundle.model` in the
    published names and formats, from the bundle's own tensors; returns K. The DiT is written in bf16 and
    Whisper in fp16 as published (round the bundle first: `round_to`), umT5, the VAE and wav2vec2 in float32.
    1.0: `avatar_single/` is the bundle's DiT, `avatar_multi/` the tensors `multi` (default: the bundle's).
    1.5: `lora/dmd_lora.safetensors` holds `lora` when given."""
    from tests.tiny import _plain, wav2vec_file_state

    write_base_folder(root / BASE_FOLDER, bundle)
    k = root / MODEL_FOLDERS[bundle.model]
    k.mkdir(parents=True)
    (k / "config.json").write_text(json.dumps({"model_name": MODEL_FOLDERS[bundle.model]}) + "\n")
    own = {name: t.to(torch.bfloat16) for name, t in _plain(bundle.dit.state_dict()).items()}
    for i, folder in enumerate(DIT_FOLDERS[bundle.model]):
        tensors = multi if i == 1 and multi is not None else own
        write_longcat_dit(k / folder, dit_config(bundle.model), 0, tensors=tensors)
    encoder = bundle.audio_encoder
    assert isinstance(encoder, PreTrainedModel)
    if bundle.model == "longcat-avatar":
        from transformers import WhisperFeatureExtractor

        from multitalk_worker.tiny_longcat import TINY_WHISPER

        folder = k / "whisper-large-v3"
        folder.mkdir()
        state = {f"model.encoder.{n}": t.to(torch.float16) for n, t in _plain(encoder.state_dict()).items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        encoder.config.save_pretrained(folder)
        WhisperFeatureExtractor(feature_size=TINY_WHISPER["num_mel_bins"]).save_pretrained(folder)
        if lora is not None:
            (k / "lora").mkdir()
            save_file({n: t.contiguous() for n, t in lora.items()}, str(k / LORA_FILE))
    else:
        from transformers import Wav2Vec2FeatureExtractor

        folder = k / "chinese-wav2vec2-base"
        folder.mkdir()
        torch.save(
            wav2vec_file_state(_plain(encoder.state_dict(), torch.float32)), folder / "pytorch_model.bin"
        )
        encoder.config.save_pretrained(folder)
        Wav2Vec2FeatureExtractor().save_pretrained(folder)
    return k
