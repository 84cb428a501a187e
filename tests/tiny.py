"""Write the tiny model as checkpoint folders in exactly the real file names, key names and formats.

    write_original(root, bundle)   Wan2.1-I2V-14B-480P + MeiGen-MultiTalk (spec 8.1, 8.2)
    write_diffusers(root, bundle)  Wan2.1-I2V-14B-480P-Diffusers + multitalk.safetensors in the root (8.4)
    write_adapter(root, file, s)   an adapter file such as InfiniteTalk's single/infinitetalk.safetensors
                                   (spec IT 2.3, 2.7: the 8·L + 10 audio keys, float32)
    write_wav2vec(folder, bundle)  TencentGameMate/chinese-wav2vec2-base (8.3)

The tensors are the bundle's own (an adapter file's are the state given), so loading a written folder must
reproduce them exactly. Key
conversions towards the files are written here independently of the loaders (and the Diffusers DiT keys
come from diffusers' own converter), so a loader bug cannot cancel itself out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from safetensors.torch import save_file

from multitalk_worker.weights.loader import ModelBundle

# Each network's dtype in the reference (spec 1.3): what the loaders and the tiny bundle must give.
REFERENCE_PRECISIONS = {
    "dit": torch.bfloat16,
    "text_encoder": torch.bfloat16,
    "image_encoder": torch.float16,
    "vae": torch.float32,
    "audio_encoder": torch.float32,
}
WAN_SHARDS = 7
DIFFUSERS_TRANSFORMER_SHARDS = 3
DIFFUSERS_TEXT_SHARDS = 2
WAV2VEC_DIR = "chinese-wav2vec2-base"
# the published adapter files (spec MT 8.2, IT 2.7), written out here independently of the registry
MULTITALK_FILE = "multitalk.safetensors"
INFINITETALK_FILES = {"single": "single/infinitetalk.safetensors", "multi": "multi/infinitetalk.safetensors"}
Index = Literal["meigen", "wan", "none"]


def _is_audio(key: str) -> bool:
    return (
        key.startswith("audio_proj.")
        or re.match(r"blocks\.\d+\.(audio_cross_attn|norm_x)\.", key) is not None
    )


def _plain(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU copies (what safetensors and torch.save of a real checkpoint hold)."""
    out = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous().clone()
    return out


def write_sharded(folder: Path, state: dict[str, torch.Tensor], stem: str, shards: int) -> dict[str, str]:
    """Shards `<stem>-0000i-of-0000N.safetensors`; returns the weight_map for the index json."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    weight_map: dict[str, str] = {}
    per_shard = -(-len(keys) // shards)
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    return weight_map


def write_index(path: Path, weight_map: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------- original layout (spec 8.1, 8.2)

_T5_BLOCK_TO_FILE = {
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
}


def t5_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UMT5EncoderModel state -> Wan's `models_t5_umt5-xxl-enc-bf16.pth` keys."""
    out = {
        "token_embedding.weight": state["shared.weight"],
        "norm.weight": state["encoder.final_layer_norm.weight"],
    }
    for key, value in state.items():
        match = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
        if match:
            out[f"blocks.{match.group(1)}.{_T5_BLOCK_TO_FILE[match.group(2)]}"] = value
    return out


def clip_file_state(state: dict[str, torch.Tensor], projection_dim: int) -> dict[str, torch.Tensor]:
    """CLIPVisionModel state -> the open-clip two-tower file: visual.* (fused qkv) + textual.* + log_scale."""
    dim = state["embeddings.class_embedding"].shape[0]
    out = {
        "log_scale": torch.tensor(4.6052),
        "visual.patch_embedding.weight": state["embeddings.patch_embedding.weight"],
        "visual.cls_embedding": state["embeddings.class_embedding"].reshape(1, 1, dim),
        "visual.pos_embedding": state["embeddings.position_embedding.weight"].unsqueeze(0),
        "visual.head": torch.randn(dim, projection_dim, generator=torch.Generator().manual_seed(1)),
    }
    for norm, name in (("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")):
        for param in ("weight", "bias"):
            out[f"visual.{name}.{param}"] = state[f"{norm}.{param}"]
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    renames = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.out_proj": "attn.proj",
        "mlp.fc1": "mlp.0",
        "mlp.fc2": "mlp.2",
    }
    for i in layers:
        src, dst = f"encoder.layers.{i}", f"visual.transformer.{i}"
        for param in ("weight", "bias"):
            qkv = [state[f"{src}.self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"{dst}.attn.to_qkv.{param}"] = torch.cat(qkv, dim=0)
            for hf, wan in renames.items():
                out[f"{dst}.{wan}.{param}"] = state[f"{src}.{hf}.{param}"]
    out.update(_textual_tower(dim))
    return out


def _textual_tower(dim: int) -> dict[str, torch.Tensor]:
    """A one-block XLM-R text tower under the real key names (present in the file, unused by MultiTalk)."""
    g = torch.Generator().manual_seed(2)
    names = {
        "textual.token_embedding.weight": (50, dim),
        "textual.type_embedding.weight": (1, dim),
        "textual.pos_embedding.weight": (20, dim),
        "textual.norm.weight": (dim,),
        "textual.norm.bias": (dim,),
        "textual.blocks.0.attn.q.weight": (dim, dim),
        "textual.blocks.0.attn.o.weight": (dim, dim),
        "textual.blocks.0.norm1.weight": (dim,),
        "textual.blocks.0.ffn.0.weight": (2 * dim, dim),
        "textual.blocks.0.ffn.2.weight": (dim, 2 * dim),
        "textual.head.0.weight": (dim, dim),
    }
    return {k: torch.randn(shape, generator=g) for k, shape in names.items()}


_VAE_RESIDUAL_TO_FILE = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}


def _vae_file_key(key: str) -> str:
    simple = {
        "quant_conv.": "conv1.",
        "post_quant_conv.": "conv2.",
        "encoder.conv_in.": "encoder.conv1.",
        "decoder.conv_in.": "decoder.conv1.",
        "encoder.norm_out.": "encoder.head.0.",
        "decoder.norm_out.": "decoder.head.0.",
        "encoder.conv_out.": "encoder.head.2.",
        "decoder.conv_out.": "decoder.head.2.",
    }
    for prefix, file_prefix in simple.items():
        if key.startswith(prefix):
            return file_prefix + key[len(prefix) :]
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_VAE_RESIDUAL_TO_FILE[m[3]]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{m[1]}.{_VAE_RESIDUAL_TO_FILE.get(m[2], m[2])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.+)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_VAE_RESIDUAL_TO_FILE[m[3]]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.+)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise KeyError(key)


def vae_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKLWan state -> `Wan2.1_VAE.pth` keys; checked against diffusers' own converter."""
    out = {_vae_file_key(k): v for k, v in state.items()}
    back = convert_wan_vae_to_diffusers(dict(out))
    assert set(back) == set(state), "VAE file keys do not convert back to the model keys"
    return out


def tiny_wan_config(bundle: ModelBundle) -> dict[str, object]:
    dit = bundle.config.dit
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": dit.dim,
        "eps": dit.eps,
        "ffn_dim": dit.ffn_dim,
        "freq_dim": dit.freq_dim,
        "in_dim": dit.in_dim,
        "model_type": "i2v",
        "num_heads": dit.num_heads,
        "num_layers": dit.num_layers,
        "out_dim": dit.out_dim,
        "text_len": dit.text_len,
    }


def write_adapter(root: Path, file: str, state: Mapping[str, torch.Tensor]) -> Path:
    """One audio-adapter file as MeiGen publishes it: safetensors, float32, `{"format": "pt"}`."""
    path = root / file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_plain(dict(state), torch.float32), str(path), metadata={"format": "pt"})
    return path


def write_original(
    root: Path,
    bundle: ModelBundle,
    *,
    index: Index = "meigen",
    multitalk: bool = True,
    adapters: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """The Wan folder with MeiGen's files: Wan's seven shards, multitalk.safetensors (the bundle's audio
    layers; left out with `multitalk=False`) and `adapters` (file -> state, e.g. InfiniteTalk's). `index`:
    "meigen" = MeiGen's replacement index (audio keys -> multitalk.safetensors, Wan's kept as `_old`, the
    MultiTalk README's steps), "wan" = Wan's own index, "none" = no index (the shards alone)."""
    root.mkdir(parents=True, exist_ok=True)
    dit = _plain(bundle.dit.state_dict(), torch.float32)
    wan = {k: v for k, v in dit.items() if not _is_audio(k)}
    audio = {k: v for k, v in dit.items() if _is_audio(k)}
    weight_map = write_sharded(root, wan, "diffusion_pytorch_model", WAN_SHARDS)
    if multitalk:
        write_adapter(root, MULTITALK_FILE, audio)
    for file, state in (adapters or {}).items():
        write_adapter(root, file, state)
    path = root / "diffusion_pytorch_model.safetensors.index.json"
    if index == "meigen":
        write_index(root / "diffusion_pytorch_model.safetensors.index.json_old", weight_map, wan)
        write_index(path, {**weight_map, **dict.fromkeys(audio, MULTITALK_FILE)}, dit)
    elif index == "wan":
        write_index(path, weight_map, wan)
    (root / "config.json").write_text(json.dumps(tiny_wan_config(bundle), indent=2))
    text = _plain(bundle.text_encoder.state_dict(), torch.bfloat16)
    torch.save(t5_file_state(text), root / "models_t5_umt5-xxl-enc-bf16.pth")
    clip = _plain(bundle.image_encoder.state_dict(), torch.float32)
    projection = bundle.config.image_encoder.projection_dim
    torch.save(
        _plain(clip_file_state(clip, projection)),
        root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    )
    torch.save(vae_file_state(_plain(bundle.vae.state_dict(), torch.float32)), root / "Wan2.1_VAE.pth")
    bundle.tokenizer.save_pretrained(root / "google" / "umt5-xxl")
    return root


# ---------------------------------------------------------------- Diffusers layout (spec 8.4)


def diffusers_transformer_config(bundle: ModelBundle) -> dict[str, object]:
    dit = bundle.config.dit
    return {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": "0.33.0.dev0",
        "added_kv_proj_dim": dit.dim,
        "attention_head_dim": dit.head_dim,
        "cross_attn_norm": True,
        "eps": dit.eps,
        "ffn_dim": dit.ffn_dim,
        "freq_dim": dit.freq_dim,
        "image_dim": dit.image_dim,
        "in_channels": dit.in_dim,
        "num_attention_heads": dit.num_heads,
        "num_layers": dit.num_layers,
        "out_channels": dit.out_dim,
        "patch_size": list(dit.patch_size),
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 1024,
        "text_dim": dit.text_dim,
    }


def write_diffusers(
    root: Path,
    bundle: ModelBundle,
    *,
    multitalk: bool = True,
    adapters: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """The Diffusers folders, with MeiGen's multitalk.safetensors (unless `multitalk=False`) and `adapters`
    (file -> state) at their paths under the root."""
    root.mkdir(parents=True, exist_ok=True)
    dit = _plain(bundle.dit.state_dict(), torch.float32)
    audio = {k: v for k, v in dit.items() if _is_audio(k)}
    wan = convert_wan_transformer_to_diffusers({k: v for k, v in dit.items() if not _is_audio(k)})
    folder = root / "transformer"
    weight_map = write_sharded(folder, wan, "diffusion_pytorch_model", DIFFUSERS_TRANSFORMER_SHARDS)
    write_index(folder / "diffusion_pytorch_model.safetensors.index.json", weight_map, wan)
    (folder / "config.json").write_text(json.dumps(diffusers_transformer_config(bundle), indent=2))
    if multitalk:
        write_adapter(root, MULTITALK_FILE, audio)
    for file, state in (adapters or {}).items():
        write_adapter(root, file, state)

    text = _plain(bundle.text_encoder.state_dict(), torch.float32)
    text.pop("encoder.embed_tokens.weight")  # tied to shared.weight; saved once
    folder = root / "text_encoder"
    weight_map = write_sharded(folder, text, "model", DIFFUSERS_TEXT_SHARDS)
    write_index(folder / "model.safetensors.index.json", weight_map, text)
    bundle.text_encoder.config.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(root / "tokenizer")

    clip = _plain(bundle.image_encoder.state_dict(), torch.float32)
    (root / "image_encoder").mkdir()
    save_file(
        {f"vision_model.{k}": v for k, v in clip.items()},
        str(root / "image_encoder" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    bundle.image_encoder.config.save_pretrained(root / "image_encoder")

    (root / "vae").mkdir()
    save_file(
        _plain(bundle.vae.state_dict(), torch.float32),
        str(root / "vae" / "diffusion_pytorch_model.safetensors"),
        metadata={"format": "pt"},
    )
    bundle.vae.save_config(root / "vae")
    model_index = {
        "_class_name": "WanImageToVideoPipeline",
        "_diffusers_version": "0.33.0.dev0",
        "image_encoder": ["transformers", "CLIPVisionModel"],
        "image_processor": ["transformers", "CLIPImageProcessor"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return root


# ---------------------------------------------------------------- wav2vec2 folder (spec 8.3)


def wav2vec_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wav2Vec2Model state -> a Wav2Vec2ForPreTraining save: `wav2vec2.` prefix, legacy weight-norm names,
    and the pre-training heads."""
    out = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        out[f"wav2vec2.{key}"] = value
    g = torch.Generator().manual_seed(3)
    out["quantizer.codevectors"] = torch.randn(1, 8, 4, generator=g)
    out["quantizer.weight_proj.weight"] = torch.randn(8, 16, generator=g)
    out["quantizer.weight_proj.bias"] = torch.randn(8, generator=g)
    out["project_hid.weight"] = torch.randn(4, 16, generator=g)
    out["project_hid.bias"] = torch.randn(4, generator=g)
    out["project_q.weight"] = torch.randn(4, 4, generator=g)
    out["project_q.bias"] = torch.randn(4, generator=g)
    return out


def write_wav2vec(folder: Path, bundle: ModelBundle, *, safetensors: bool = False) -> Path:
    """config.json, preprocessor_config.json and pytorch_model.bin (or model.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = wav2vec_file_state(_plain(bundle.audio_encoder.state_dict(), torch.float32))
    if safetensors:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, folder / "pytorch_model.bin")
    bundle.audio_encoder.config.save_pretrained(folder)  # architectures: Wav2Vec2ForPreTraining
    bundle.feature_extractor.save_pretrained(folder)
    return folder


def write_all(
    root: Path,
    bundle: ModelBundle,
    layout: str = "original",
    *,
    multitalk: bool = True,
    adapters: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    index: Index = "meigen",
) -> Path:
    """A complete model folder of `layout` with the wav2vec2 folder inside it (where load_models looks);
    `multitalk`, `adapters` and (original layout) `index` as in write_original."""
    if layout == "original":
        write_original(root, bundle, index=index, multitalk=multitalk, adapters=adapters)
    else:
        write_diffusers(root, bundle, multitalk=multitalk, adapters=adapters)
    write_wav2vec(root / WAV2VEC_DIR, bundle)
    return root
