"""Open-clip XLM-R ViT-H/14 visual tower as transformers' CLIPVisionModel (spec 3.3, 8.5).

MultiTalk uses the output of the penultimate transformer block (no final block, no post-LayerNorm), which is
`hidden_states[-2]` of CLIPVisionModel.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from multitalk_worker.models.configs import ImageEncoderConfig

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def image_encoder_config(cfg: ImageEncoderConfig) -> CLIPVisionConfig:
    """The transformers config of the visual tower: exact-erf GELU, pre-LN, no patch bias."""
    return CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.projection_dim,
        hidden_act="gelu",
        num_channels=3,
    )


def build_image_encoder(cfg: ImageEncoderConfig) -> CLIPVisionModel:
    """A CLIP vision tower with freshly initialised weights, in eval mode."""
    return CLIPVisionModel(image_encoder_config(cfg)).eval().requires_grad_(False)


def preprocess_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """`[1, 3, H, W]` in [-1, 1] -> CLIP input `[1, 3, size, size]` float32 (spec 3.3 steps 1-3).

    A plain bicubic resize of the whole frame (no crop, no antialias, no clamp), then [-1,1] -> [0,1] and
    the CLIP mean/std normalisation.
    """
    x = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x.mul(0.5).add(0.5)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_image(encoder: CLIPVisionModel, image: torch.Tensor) -> torch.Tensor:
    """`[1, 3, H, W]` frame in [-1, 1] -> penultimate-block tokens `[1, N, C]` in the encoder's dtype.

    On CUDA with 16-bit weights the forward runs under autocast of that dtype, as the reference does
    (fp16 weights, fp16 autocast); elsewhere it runs plainly in the weights' dtype.
    """
    weight = encoder.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)  # the patch embedding's (nn.Module attributes are typed loosely)
    size = encoder.config.image_size
    assert isinstance(size, int)  # image_encoder_config sets one side
    pixels = preprocess_image(image.to(weight.device), size)
    use_autocast = weight.device.type == "cuda" and weight.dtype in (torch.float16, torch.bfloat16)
    context = torch.autocast("cuda", dtype=weight.dtype) if use_autocast else contextlib.nullcontext()
    with context:
        out = encoder(pixel_values=pixels.to(weight.dtype), output_hidden_states=True)
    return out.hidden_states[-2].to(weight.dtype)
