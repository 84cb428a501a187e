"""The original layout: a `Wan-AI/Wan2.1-I2V-14B-480P` folder with MeiGen's adapter files in it (spec MT 8.1,
8.2, IT 2.1).

    config.json
    diffusion_pytorch_model-0000{1..7}-of-00007.safetensors   Wan DiT, float32
    diffusion_pytorch_model.safetensors.index.json             Wan's own index, MeiGen's replacement index
                                                               (audio keys -> multitalk.safetensors), or none
    multitalk.safetensors                                      MultiTalk audio layers
    single/infinitetalk.safetensors, multi/...                 InfiniteTalk audio layers (1, 2 speakers)
    models_t5_umt5-xxl-enc-bf16.pth                            umT5-XXL encoder
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth    open-clip XLM-R ViT-H/14 (visual.* used)
    Wan2.1_VAE.pth                                             Wan VAE
    google/umt5-xxl/                                           tokenizer

The DiT keys are the model's own keys. The base comes from the shards the index names, or, with no index
(how the InfiniteTalk reference reads a stock Wan folder), from every `diffusion_pytorch_model-0000i-of-0000N`
shard; the audio layers come from the chosen adapter file only (weights/adapters.py), so Wan's own index,
MeiGen's index and no index all load every model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from multitalk_worker.registry import MULTITALK
from multitalk_worker.weights.adapters import (
    KeyTargets,
    adapter_files,
    is_audio_key,
    plan_base,
    with_adapter,
)
from multitalk_worker.weights.checkpoint import (
    Component,
    Convert,
    Plan,
    Shape,
    open_sharded,
    open_unindexed_shards,
    single_file_component,
)

DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
MULTITALK_FILE = MULTITALK.adapter("multitalk").file  # the default adapter of the default model
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
CONFIG_FILE = "config.json"

DIT_SHARD_STEM = "diffusion_pytorch_model"


def base_component(root: Path) -> Component:
    """The Wan base tensors of the DiT (no audio layers): the index's shards, or all shards when there is
    no index (a note says so)."""
    plan = Plan()
    if (root / DIT_INDEX).is_file():
        files, home = open_sharded(root, DIT_INDEX, plan, skip=adapter_files()), DIT_INDEX
    else:
        files, complete = open_unindexed_shards(root, DIT_SHARD_STEM, plan)
        home = f"{DIT_SHARD_STEM}-*-of-*.safetensors"
        if not complete:  # the missing shards' keys are unknown: do not list them one by one
            plan.unavailable_if.append(lambda key: not is_audio_key(key))
        plan.notes.append(f"no {DIT_INDEX}: the base is read from the {len(files)} shards {home}")
    plan_base(files, lambda key: key, plan)
    return Component("dit", files, plan, lambda _key: home)


def dit_component(root: Path, adapter_file: str = MULTITALK_FILE) -> Component:
    """The DiT: the Wan base shards plus the audio layers of `adapter_file` (relative to root)."""
    return with_adapter(base_component(root), root, adapter_file)


_T5_BLOCK = {
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm1.weight": "layer.0.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
}
T5_TIED = {"encoder.embed_tokens.weight": "shared.weight"}


def t5_keymap(key: str, shape: Shape) -> KeyTargets | None:
    """Wan's umT5 .pth key -> transformers UMT5EncoderModel key (spec 8.5)."""
    if key == "token_embedding.weight":
        return [("shared.weight", shape, None)]
    if key == "norm.weight":
        return [("encoder.final_layer_norm.weight", shape, None)]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match and match.group(2) in _T5_BLOCK:
        return [(f"encoder.block.{match.group(1)}.{_T5_BLOCK[match.group(2)]}", shape, None)]
    return None


def t5_component(root: Path) -> Component:
    return single_file_component("text_encoder", root, T5_FILE, t5_keymap, T5_TIED)


_CLIP_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}


def _rows(part: int, parts: int) -> Convert:
    def take(tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.shape[0] // parts
        return tensor[part * size : (part + 1) * size].clone()

    return take


def _clip_block_targets(index: str, name: str, param: str, shape: Shape) -> KeyTargets | None:
    prefix = f"encoder.layers.{index}"
    if name == "attn.to_qkv":
        rows = shape[0] // 3
        part_shape = (rows, *shape[1:])
        return [
            (f"{prefix}.self_attn.{p}_proj.{param}", part_shape, _rows(i, 3)) for i, p in enumerate("qkv")
        ]
    if name in _CLIP_BLOCK:
        return [(f"{prefix}.{_CLIP_BLOCK[name]}.{param}", shape, None)]
    return None


def clip_keymap(key: str, shape: Shape) -> KeyTargets | None:
    """open-clip XLM-R ViT-H/14 key -> transformers CLIPVisionModel key (spec 8.5). The text tower,
    `log_scale` and the visual projection head are known and unused."""
    if key.startswith("textual.") or key in ("log_scale", "visual.head"):
        return []
    if key == "visual.patch_embedding.weight":
        return [("embeddings.patch_embedding.weight", shape, None)]
    if key == "visual.cls_embedding":  # [1, 1, D] -> [D]
        return [("embeddings.class_embedding", shape[-1:], lambda t: t.reshape(-1))]
    if key == "visual.pos_embedding":  # [1, N, D] -> [N, D]
        return [("embeddings.position_embedding.weight", shape[-2:], lambda t: t.reshape(t.shape[-2:]))]
    match = re.fullmatch(r"visual\.(pre_norm|post_norm)\.(weight|bias)", key)
    if match:
        name = "pre_layrnorm" if match.group(1) == "pre_norm" else "post_layernorm"
        return [(f"{name}.{match.group(2)}", shape, None)]
    match = re.fullmatch(r"visual\.transformer\.(\d+)\.(.+)\.(weight|bias)", key)
    if match:
        return _clip_block_targets(match.group(1), match.group(2), match.group(3), shape)
    return None


def clip_component(root: Path) -> Component:
    return single_file_component("image_encoder", root, CLIP_FILE, clip_keymap)


def vae_keymap(key: str, shape: Shape) -> KeyTargets | None:
    """Wan VAE key -> diffusers AutoencoderKLWan key, through diffusers' own converter (spec 8.5)."""
    (target,) = convert_wan_vae_to_diffusers({key: key}).keys()
    return [(target, shape, None)]


def vae_component(root: Path) -> Component:
    return single_file_component("vae", root, VAE_FILE, vae_keymap)
