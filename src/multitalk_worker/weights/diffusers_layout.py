"""The Diffusers layout: a `Wan-AI/Wan2.1-I2V-14B-480P-Diffusers` folder plus MeiGen's adapter files
(spec MT 8.4, 8.5, IT 2.7).

    model_index.json
    transformer/   config.json, diffusion_pytorch_model-000NN-of-000MM.safetensors + index (diffusers keys)
    text_encoder/  config.json, model-000NN-of-000MM.safetensors + model.safetensors.index.json
    tokenizer/     tokenizer.json, tokenizer_config.json, ...
    image_encoder/ config.json, model.safetensors (CLIPVisionModel)
    vae/           config.json, diffusion_pytorch_model.safetensors (AutoencoderKLWan)
    multitalk.safetensors                          MeiGen's audio layers, unchanged, in the folder root
    single/infinitetalk.safetensors, multi/...     InfiniteTalk's, likewise

The audio layers stay in their own file under the root, at the same relative path as in the original layout
(registry.Adapter.file); their keys are the model's own keys and never pass through the diffusers renaming.
"""

from __future__ import annotations

import re
from pathlib import Path

from multitalk_worker.weights.adapters import KeyTargets, plan_base, with_adapter
from multitalk_worker.weights.checkpoint import (
    Component,
    Plan,
    Shape,
    identity_keymap,
    open_sharded,
    plan_files,
    single_file_component,
)
from multitalk_worker.weights.original import MULTITALK_FILE, T5_TIED

MODEL_INDEX = "model_index.json"
TRANSFORMER_INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"
TEXT_ENCODER_INDEX = "text_encoder/model.safetensors.index.json"
IMAGE_ENCODER_FILE = "image_encoder/model.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
TOKENIZER_DIR = "tokenizer"

# diffusers WanTransformer3DModel key -> original key (the inverse of spec 8.5); full-key regexes, so no
# rule can touch a key it was not written for.
_TRANSFORMER_RULES: tuple[tuple[str, str], ...] = (
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"condition_embedder\.text_embedder\.linear_1\.(weight|bias)", r"text_embedding.0.\1"),
    (r"condition_embedder\.text_embedder\.linear_2\.(weight|bias)", r"text_embedding.2.\1"),
    (r"condition_embedder\.time_embedder\.linear_1\.(weight|bias)", r"time_embedding.0.\1"),
    (r"condition_embedder\.time_embedder\.linear_2\.(weight|bias)", r"time_embedding.2.\1"),
    (r"condition_embedder\.time_proj\.(weight|bias)", r"time_projection.1.\1"),
    (r"condition_embedder\.image_embedder\.norm1\.(weight|bias)", r"img_emb.proj.0.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.(weight|bias)", r"img_emb.proj.1.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.(weight|bias)", r"img_emb.proj.3.\1"),
    (r"condition_embedder\.image_embedder\.norm2\.(weight|bias)", r"img_emb.proj.4.\1"),
    (r"blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)", r"blocks.\1.self_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.self_attn.o.\2"),
    (r"blocks\.(\d+)\.attn1\.norm_([qk])\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])\.(weight|bias)", r"blocks.\1.cross_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attn.o.\2"),
    (r"blocks\.(\d+)\.attn2\.add_([kv])_proj\.(weight|bias)", r"blocks.\1.cross_attn.\2_img.\3"),
    (r"blocks\.(\d+)\.attn2\.norm_([qk])\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.attn2\.norm_added_k\.weight", r"blocks.\1.cross_attn.norm_k_img.weight"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),  # diffusers swaps norm2/norm3
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.2\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"proj_out\.(weight|bias)", r"head.head.\1"),
    (r"scale_shift_table", r"head.modulation"),
)
_COMPILED_RULES = tuple((re.compile(pattern), template) for pattern, template in _TRANSFORMER_RULES)


def transformer_key_to_original(key: str) -> str | None:
    """A diffusers transformer key as the original key; None when no rule matches."""
    for pattern, template in _COMPILED_RULES:
        match = pattern.fullmatch(key)
        if match:
            return match.expand(template)
    return None


def base_component(root: Path) -> Component:
    """The Wan base tensors of the DiT from transformer/, renamed to the original keys."""
    plan = Plan()
    files = open_sharded(root, TRANSFORMER_INDEX, plan)
    plan_base(files, transformer_key_to_original, plan)
    return Component("dit", files, plan, lambda _key: TRANSFORMER_INDEX)


def dit_component(root: Path, adapter_file: str = MULTITALK_FILE) -> Component:
    """The DiT: transformer/ (renamed) plus the audio layers of `adapter_file` (relative to root, as is)."""
    return with_adapter(base_component(root), root, adapter_file)


def text_encoder_component(root: Path) -> Component:
    """UMT5 tensors; `encoder.embed_tokens.weight` is tied to `shared.weight` (either one may be stored)."""
    plan = Plan()
    files = open_sharded(root, TEXT_ENCODER_INDEX, plan)
    keys = {key for f in files.values() for key in f.shapes()}

    def keymap(key: str, shape: Shape) -> KeyTargets | None:
        if key == "encoder.embed_tokens.weight":
            return [] if "shared.weight" in keys else [("shared.weight", shape, None)]
        return [(key, shape, None)]

    plan_files(files, keymap, plan)
    return Component("text_encoder", files, plan, lambda _key: TEXT_ENCODER_INDEX, dict(T5_TIED))


def image_encoder_keymap(key: str, shape: Shape) -> KeyTargets | None:
    """CLIPVisionModel files carry a `vision_model.` prefix that the module tree no longer has."""
    if key.startswith("visual_projection."):
        return []  # a CLIPVisionModelWithProjection save; the projection is unused
    return [(key.removeprefix("vision_model."), shape, None)]


def image_encoder_component(root: Path) -> Component:
    return single_file_component("image_encoder", root, IMAGE_ENCODER_FILE, image_encoder_keymap)


def vae_component(root: Path) -> Component:
    return single_file_component("vae", root, VAE_FILE, identity_keymap)
