"""Norms, attentions, the transformer block and the output head of the Wan2.1-I2V DiT with MultiTalk's
audio layers (spec 5.4, 5.8, 5.3 step 8). Module and parameter names are the original checkpoint's.

Rounding follows the reference (spec 5.10, 11): `dtype` is the parameters' dtype (bfloat16 in real runs);
norms compute in float32 and round to `dtype`; modulation and gated residual sums run in float32 and
are rounded once; the head runs in float32. A float32 model therefore runs entirely in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitalk_worker.models.attention import attention
from multitalk_worker.models.audio_attention import (
    AudioCrossAttention,
    label_rope_inputs,
    reference_attention_map,
    reference_attention_map_fused,
)
from multitalk_worker.models.configs import DiTConfig
from multitalk_worker.models.rope import apply_rope_3d, apply_rope_3d_fp32
from multitalk_worker.models.runtime import REFERENCE_RUNTIME, DiTRuntime

if TYPE_CHECKING:
    from multitalk_worker.models.sequence_parallel import SequenceShard


@dataclass(frozen=True)
class BlockInputs:
    """Everything the block stack needs besides the residual stream; built once per forward by
    `MultiTalkTransformer.embed`. Tensors are on the model's device.

    tokens: [B, L, dim] patch tokens (the stack's input); e: [B, dim] float32 time embedding (head);
    e0: [B, 6, dim] float32 time modulation (blocks; TeaCache's signal); context: [B, N_img + text_len,
    dim] image tokens then text tokens; audio: [B, T, P·audio_tokens, audio_dim], person 1 first;
    token_masks: [3, S] 0/1 masks of latent frame 0 (person 1, person 2, background);
    rope_cos/rope_sin: [L, 1, head_dim/2] float64 3D RoPE tables; grid: (T, Nh, Nw) token grid.
    shard: set by `sequence_parallel.shard_block_inputs`: tokens and RoPE tables then hold only this
    rank's shard of the L tokens, and the blocks exchange what couples tokens through it.
    """

    tokens: Tensor
    e: Tensor
    e0: Tensor
    context: Tensor
    num_image_tokens: int
    audio: Tensor
    num_persons: int
    token_masks: Tensor
    rope_cos: Tensor
    rope_sin: Tensor
    grid: tuple[int, int, int]
    shard: SequenceShard | None = None


def layer_norm_fp32(x: Tensor, eps: float) -> Tensor:
    """Parameter-free LayerNorm computed in float32, rounded to x's dtype."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """Affine LayerNorm computed in float32 on float32 copies of its (model-dtype) weights, rounded to the
    input dtype. Hand-written because nn.LayerNorm in bf16 does not promise this rounding point."""

    def forward(self, input: Tensor) -> Tensor:  # nn.LayerNorm's parameter name
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(input.float(), self.normalized_shape, weight, bias, self.eps).to(input.dtype)


class RMSNorm(nn.Module):
    """RMSNorm whose float32 result is rounded to the input dtype *before* the weight multiply
    (nn.RMSNorm multiplies first, which rounds differently)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class SelfAttention(nn.Module):
    """Full self-attention over all tokens with q/k RMSNorm over the whole width and 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        runtime: DiTRuntime = REFERENCE_RUNTIME,
        shard: SequenceShard | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, L, dim]. Returns the output [B, L, dim] and the roped q, k [B, L, H, D] in x's dtype
        (the reference map is computed from them). With a `shard`, x holds this rank's tokens and the
        attention runs over the whole sequence through the shard's collectives."""
        heads = (self.num_heads, -1)
        rope = apply_rope_3d_fp32 if runtime.fp32_rope else apply_rope_3d
        q = rope(self.norm_q(self.q(x)).unflatten(-1, heads), cos, sin).to(x.dtype)
        k = rope(self.norm_k(self.k(x)).unflatten(-1, heads), cos, sin).to(x.dtype)
        v = self.v(x).unflatten(-1, heads)
        attend = attention if shard is None else shard.attention
        out = attend(q, k, v, backend=runtime.self_backend)
        return self.o(out.flatten(2)), q, k


class CrossAttention(nn.Module):
    """Image-to-video cross-attention: separate softmax attentions over the text tokens and the image
    tokens with a shared query, summed before the output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x: Tensor, context: Tensor, num_image_tokens: int, *, backend: str) -> Tensor:
        """x: [B, L, dim]; context: [B, N_img + N_txt, dim], image tokens first. Returns [B, L, dim]."""
        heads = (self.num_heads, -1)
        image, text = context[:, :num_image_tokens], context[:, num_image_tokens:]
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(text)).unflatten(-1, heads)
        v = self.v(text).unflatten(-1, heads)
        k_img = self.norm_k_img(self.k_img(image)).unflatten(-1, heads)
        v_img = self.v_img(image).unflatten(-1, heads)
        from_text = attention(q, k, v, backend=backend).flatten(2)
        from_image = attention(q, k_img, v_img, backend=backend).flatten(2)
        return self.o(from_text + from_image)


class TransformerBlock(nn.Module):
    """Self-attention, text/image cross-attention, audio cross-attention, FFN (spec 5.4)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim = config.dim
        self.config = config
        self.self_attn = SelfAttention(dim, config.num_heads, config.eps)
        self.norm3 = FP32LayerNorm(dim, eps=config.eps)
        self.cross_attn = CrossAttention(dim, config.num_heads, config.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.audio_cross_attn = AudioCrossAttention(dim, config.audio_dim, config.num_heads)
        self.norm_x = FP32LayerNorm(dim, eps=config.eps)

    def forward(self, x: Tensor, inputs: BlockInputs, *, runtime: DiTRuntime = REFERENCE_RUNTIME) -> Tensor:
        """x: [B, L, dim] residual stream in the model dtype. Returns the updated stream."""
        dtype, eps, backend = x.dtype, self.config.eps, runtime.attention_backend
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + inputs.e0).chunk(6, dim=1)  # fp32

        # self-attention, gated residual in float32
        a = (layer_norm_fp32(x, eps).float() * (1 + scale1) + shift1).to(dtype)
        y, q, k = self.self_attn(a, inputs.rope_cos, inputs.rope_sin, runtime=runtime, shard=inputs.shard)
        x = (x + y * gate1).to(dtype)

        # text and image cross-attention
        x = x + self.cross_attn(self.norm3(x), inputs.context, inputs.num_image_tokens, backend=backend)

        # audio cross-attention, routed by the reference map when two persons speak
        query_pos = key_pos = None
        shard = inputs.shard
        if inputs.num_persons == 2:
            keys = k if shard is None else shard.frame0_keys(k)  # the map's keys: latent frame 0
            if runtime.fused_reference_map:
                ref_map = reference_attention_map_fused(
                    q, keys, inputs.token_masks, head_groups=self.config.ref_map_head_groups, backend=backend
                )
            else:
                ref_map = reference_attention_map(
                    q, keys, inputs.token_masks, head_groups=self.config.ref_map_head_groups
                )
            query_pos, key_pos = label_rope_inputs(
                ref_map,
                inputs.num_persons,
                self.config.audio_tokens,
                class_range=self.config.lrope_class_range,
                class_interval=self.config.lrope_class_interval,
                bounds=None if shard is None else shard.map_bounds(ref_map),
            )
        audio_in = self.norm_x(x)
        if shard is None:
            x = x + self.audio_cross_attn(audio_in, inputs.audio, query_pos, key_pos, backend=backend)
        else:
            x = x + shard.audio_attention(
                self.audio_cross_attn, audio_in, inputs.audio, query_pos, key_pos, backend=backend
            )

        # feed-forward, gated residual in float32
        b = (layer_norm_fp32(x, eps).float() * (1 + scale2) + shift2).to(dtype)
        return (x + self.ffn(b) * gate2).to(dtype)


class Head(nn.Module):
    """Output head in float32: modulated parameter-free LayerNorm, then a float32 linear."""

    def __init__(self, dim: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x: [B, L, dim] model dtype; e: [B, dim] float32. Returns [B, L, out_features] float32."""
        shift, scale = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        h = layer_norm_fp32(x, self.eps) * (1 + scale) + shift
        return F.linear(h, self.head.weight.float(), self.head.bias.float())
