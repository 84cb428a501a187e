"""One LongCat-Video-Avatar block and the final layer (spec §3.6, §3.11, dtypes §3.12).

`dtype` is the parameters' dtype (bfloat16 in real runs; a float32 model runs in float32). As in the
reference: the adaLN modulations, the timestep MLP and the final linear run in float32 on float32 copies of
the weights (its CUDA autocast(float32) islands); the parameter-free LayerNorms and the affine ones compute
in float32 and round once; gated residual adds are float32 sums rounded once; the text cross-attention adds
in `dtype`; everything else (linears, attention, FFN) runs in `dtype`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitalk_worker.models.blocks import FP32LayerNorm
from multitalk_worker.models.longcat.attention import (
    AudioCrossAttention,
    AudioRouting,
    Conditioning,
    KVCache,
    SelfAttention,
    TextCrossAttention,
)
from multitalk_worker.models.longcat.config import LongCatAvatarConfig
from multitalk_worker.models.longcat.int8 import Int8Linear
from multitalk_worker.models.longcat.lora import lora_term_fp32
from multitalk_worker.models.runtime import REFERENCE_RUNTIME, DiTRuntime


def linear_fp32(layer: nn.Module, x: Tensor) -> Tensor:
    """A linear layer (nn.Linear or Int8Linear) in float32 on float32 copies of its weights, plus its DMD
    LoRA term when one is attached and enabled (models/longcat/lora.py)."""
    if isinstance(layer, Int8Linear):
        weight = layer.weight_in(torch.float32)
    elif isinstance(layer, nn.Linear):
        weight = layer.weight.float()
    else:
        raise TypeError(f"expected a linear layer, got {type(layer).__name__}")
    bias = layer.bias
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    lora = lora_term_fp32(layer, x)
    return out if lora is None else out + lora


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """bf16(LN(x)·(1 + scale) + shift) with a parameter-free float32 LayerNorm; x [B, T, St, C] in the
    model dtype, shift/scale [B, T, 1, C] float32."""
    return (F.layer_norm(x.float(), x.shape[-1:], eps=eps) * (scale + 1) + shift).to(x.dtype)


def gated_add(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """bf16(x + gate·y) computed in float32; x, y [B, T, St, C] model dtype, gate [B, T, 1, C] float32."""
    return (x + gate * y).to(x.dtype)


@dataclass(frozen=True)
class BlockInputs:
    """Everything the block stack needs besides the residual stream; built once per forward.

    tokens: [B, N, C] patch tokens (the stack's input); temb: [B, T, Ct] float32, one time embedding per
    latent frame of the call; text: [B, Lt, C] caption tokens (model dtype); text_lengths: valid text keys
    per item (None: all Lt); audio: [B, T, M, Ca] audio tokens of the call's latent frames (with routing:
    batch 1, M = streams·tokens); routing: two-speaker routing or None; angles: [L_keys, D] float32 RoPE
    angles of the key sequence (cached tokens first); grid: (T, Nh, Nw) of this call's tokens; cond: the
    clean latents; cached: the clean latents come from a KV cache; skip_cross_attn: no text or audio
    attention (the cache pass).
    """

    tokens: Tensor
    temb: Tensor
    text: Tensor
    text_lengths: tuple[int, ...] | None
    audio: Tensor
    routing: AudioRouting | None
    angles: Tensor
    grid: tuple[int, int, int]
    cond: Conditioning
    cached: bool
    skip_cross_attn: bool = False

    @property
    def frame_tokens(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def clean_latents(self) -> int:
        """Leading clean latents of this call's own tokens (0 when they come from a cache)."""
        return 0 if self.cached else self.cond.num_cond_latents


class LongCatAvatarBlock(nn.Module):
    """AdaLN self-attention, text cross-attention, gated audio cross-attention, AdaLN SwiGLU FFN."""

    def __init__(self, config: LongCatAvatarConfig) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.eps
        self.config = config
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.adaln_tembed_dim, 6 * dim))
        self.audio_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.adaln_tembed_dim, 3 * dim))
        self.pre_crs_attn_norm = FP32LayerNorm(dim, eps=eps)
        self.pre_video_crs_attn_norm = FP32LayerNorm(dim, eps=eps)
        self.pre_audio_crs_attn_norm = (
            FP32LayerNorm(config.output_dim, eps=eps) if config.audio_prenorm else nn.Identity()
        )
        self.attn = SelfAttention(dim, config.num_heads, eps)
        self.cross_attn = TextCrossAttention(dim, config.num_heads, eps)
        self.audio_cross_attn = AudioCrossAttention(dim, config.output_dim, config.num_heads, eps)
        self.ffn = SwiGLU(dim, config.ffn_dim)

    def forward(
        self,
        x: Tensor,
        inputs: BlockInputs,
        cache: KVCache | None = None,
        *,
        runtime: DiTRuntime = REFERENCE_RUNTIME,
    ) -> tuple[Tensor, KVCache]:
        """x [B, N, C] residual stream (model dtype); cache: this block's cached clean keys/values.
        Returns the updated stream and this call's own (k, v) before RoPE (the cache a cache pass keeps)."""
        batch, frames, eps = x.shape[0], inputs.grid[0], self.config.eps
        st = inputs.frame_tokens
        mod = linear_fp32(self.adaLN_modulation[1], F.silu(inputs.temb)).unsqueeze(2)  # [B, T, 1, 6C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)

        # self-attention, gated residual in float32
        h = modulate(x.view(batch, frames, st, -1), shift_msa, scale_msa, eps).flatten(1, 2)
        y, noisy_q, keys, new_kv = self.attn(
            h, inputs.angles, st, inputs.cond, cache, backend=runtime.self_backend
        )
        x = gated_add(x.view(batch, frames, st, -1), gate_msa, y.view(batch, frames, st, -1)).flatten(1, 2)

        if not inputs.skip_cross_attn:
            x = x + self._text(self.pre_crs_attn_norm(x), inputs, runtime.attention_backend)
            x = self._audio(x, inputs, noisy_q, keys, runtime.attention_backend)

        # feed-forward, gated residual in float32
        h = modulate(x.view(batch, frames, st, -1), shift_mlp, scale_mlp, eps).flatten(1, 2)
        y = self.ffn(h)
        x = gated_add(x.view(batch, frames, st, -1), gate_mlp, y.view(batch, frames, st, -1)).flatten(1, 2)
        return x, new_kv

    def _text(self, x: Tensor, inputs: BlockInputs, backend: str) -> Tensor:
        """Text cross-attention of the noisy tokens; rows of clean tokens are zeros."""
        clean = inputs.clean_latents * inputs.frame_tokens
        out = self.cross_attn(x[:, clean:], inputs.text, inputs.text_lengths, backend=backend)
        return F.pad(out, (0, 0, clean, 0))

    def _audio(self, x: Tensor, inputs: BlockInputs, noisy_q: Tensor, keys: Tensor, backend: str) -> Tensor:
        """x + [0 for clean tokens, gate·(LN(u)·(1 + scale) + shift)] with u the audio attention output."""
        batch, st, clean = x.shape[0], inputs.frame_tokens, inputs.clean_latents
        frames = inputs.grid[0] - clean
        mod = linear_fp32(self.audio_adaLN_modulation[1], F.silu(inputs.temb[:, clean:])).unsqueeze(2)
        shift, scale, gate = mod.chunk(3, dim=-1)  # [B, Tn, 1, C] float32
        audio = self.pre_audio_crs_attn_norm(inputs.audio[:, clean:])
        u = self.audio_cross_attn(
            self.pre_video_crs_attn_norm(x)[:, clean * st :],
            audio,
            noisy_q=noisy_q,
            keys=keys,
            routing=inputs.routing,
            backend=backend,
        )
        added = gate * modulate(u.view(batch, frames, st, -1), shift, scale, self.config.eps)  # float32
        added = F.pad(added.flatten(1, 2), (0, 0, clean * st, 0))
        return (x + added).to(x.dtype)


class SwiGLU(nn.Module):
    """w2(SiLU(w1·x) ⊙ w3·x), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class FinalLayer(nn.Module):
    """Modulated parameter-free LayerNorm and the output linear, both in float32 (spec §3.11)."""

    def __init__(self, config: LongCatAvatarConfig) -> None:
        super().__init__()
        self.eps = config.eps
        patch = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
        self.linear = nn.Linear(config.hidden_size, patch * config.out_channels)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(config.adaln_tembed_dim, 2 * config.hidden_size)
        )

    def forward(self, x: Tensor, temb: Tensor, frames: int) -> Tensor:
        """x [B, N, C] model dtype; temb [B, T, Ct] float32 -> [B, N, patch·out] float32."""
        batch = x.shape[0]
        shift, scale = linear_fp32(self.adaLN_modulation[1], F.silu(temb)).unsqueeze(2).chunk(2, dim=-1)
        h = modulate(x.view(batch, frames, -1, x.shape[-1]), shift, scale, self.eps).flatten(1, 2)
        return linear_fp32(self.linear, h)
