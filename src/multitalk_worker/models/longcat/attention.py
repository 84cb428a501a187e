"""The three attentions of a LongCat-Video-Avatar block (spec §3.7, §3.9, §3.10).

Layout inside is ours, [B, L, H, D], so every call goes through `models.attention.attention` and its
backends. Parameter names are the published checkpoint's (`attn.qkv`, `cross_attn.q_linear`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multitalk_worker.models.attention import attention
from multitalk_worker.models.audio_attention import reference_attention_map
from multitalk_worker.models.blocks import RMSNorm
from multitalk_worker.models.longcat.rope import audio_key_positions, label_positions, rotate_pairs
from multitalk_worker.models.rope import apply_rope_1d

KVCache = tuple[Tensor, Tensor]
"""One block's cached keys (after k_norm, before RoPE) and values of the clean latents, [B, L, H, D]."""


@dataclass(frozen=True)
class Conditioning:
    """Clean latents in a call (spec §3.7).

    num_cond_latents: clean latents leading the sequence (1: the image of ai2v; in a continuation the
    reference latent plus the conditioning latents, 5), or, with a KV cache, the latents held by the cache.
    num_ref_latents: 1 in a continuation (the first clean latent is the reference, at RoPE time
    `ref_img_index`), else 0. mask_frame_range: the noisy latents whose RoPE time lies within this range of
    ref_img_index do not see the reference (None or 0: no band).
    """

    num_cond_latents: int = 0
    num_ref_latents: int = 0
    ref_img_index: int | None = None
    mask_frame_range: int | None = None

    def __post_init__(self) -> None:
        if self.num_cond_latents < 0 or self.num_ref_latents not in (0, 1):
            raise ValueError(
                f"num_cond_latents must be >= 0 and num_ref_latents 0 or 1; got {self.num_cond_latents}, "
                f"{self.num_ref_latents}"
            )
        if self.num_ref_latents and self.ref_img_index is None:
            raise ValueError("a reference latent needs ref_img_index (its RoPE time)")
        if self.num_cond_latents > 1 and not self.num_ref_latents:
            raise ValueError("more than one clean latent is a continuation: num_ref_latents must be 1")

    def masked_band(self, num_noisy: int) -> tuple[int, int] | None:
        """Noisy latents [start, end) hidden from the reference, or None (band empty or off the window)."""
        if not self.mask_frame_range or self.mask_frame_range <= 0 or self.ref_img_index is None:
            return None
        offset = self.ref_img_index - self.num_cond_latents + self.num_ref_latents
        start, end = offset - self.mask_frame_range, offset + self.mask_frame_range + 1
        return (start, end) if start >= 0 and end > start and end <= num_noisy else None


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, -1))


class SelfAttention(nn.Module):
    """qkv, per-head q/k RMSNorm, 3D RoPE, the conditioning patterns of spec §3.7, proj."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        angles: Tensor,
        frame_tokens: int,
        cond: Conditioning,
        cache: KVCache | None,
        *,
        backend: str,
    ) -> tuple[Tensor, Tensor, Tensor, KVCache]:
        """x [B, N, C]; angles [N (+ cached tokens), D] float32; frame_tokens St = Nh·Nw.

        Returns the output [B, N, C], the roped queries of the noisy tokens and the roped keys of the
        whole key sequence ([B, L, H, D], for the reference map), and this call's (k, v) before RoPE.
        """
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # [B, N, H, D] each
        q, k = self.q_norm(q), self.k_norm(k)
        new_kv = (k, v)
        if cache is not None:
            cached_k, cached_v = (c.expand(x.shape[0], -1, -1, -1) for c in cache)
            k, v = torch.cat([cached_k, k], dim=1), torch.cat([cached_v, v], dim=1)
        q = rotate_pairs(q, angles[-q.shape[1] :])
        k = rotate_pairs(k, angles)
        if cache is not None:  # only noisy tokens in this call
            band = cond.masked_band(q.shape[1] // frame_tokens)
            out, noisy_q = self._noisy_attention(q, k, v, frame_tokens, band, backend), q
        else:
            out, noisy_q = self._uncached(q, k, v, frame_tokens, cond, backend)
        return self.proj(out.flatten(2)), noisy_q, k, new_kv

    def _uncached(
        self, q: Tensor, k: Tensor, v: Tensor, st: int, cond: Conditioning, backend: str
    ) -> tuple[Tensor, Tensor]:
        """Clean latents attend to themselves (the reference and the conditioning latents apart)."""
        clean = cond.num_cond_latents * st
        if clean == 0:
            return attention(q, k, v, backend=backend), q
        parts = []
        groups = [(0, clean)] if cond.num_cond_latents == 1 else [(0, st), (st, clean)]
        for lo, hi in groups:
            parts.append(attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], backend=backend))
        noisy_q = q[:, clean:]
        if noisy_q.shape[1]:
            num_noisy = noisy_q.shape[1] // st
            band = cond.masked_band(num_noisy) if cond.num_cond_latents > 1 else None
            parts.append(self._noisy_attention(noisy_q, k, v, st, band, backend))
        return torch.cat(parts, dim=1), noisy_q

    @staticmethod
    def _noisy_attention(
        q: Tensor, k: Tensor, v: Tensor, st: int, band: tuple[int, int] | None, backend: str
    ) -> Tensor:
        """Noisy queries over every key, except the band's, which skip the reference latent's St keys."""
        if band is None:
            return attention(q, k, v, backend=backend)
        lo, hi = band[0] * st, band[1] * st
        return torch.cat(
            [
                attention(q[:, :lo], k, v, backend=backend),
                attention(q[:, lo:hi], k[:, st:], v[:, st:], backend=backend),
                attention(q[:, hi:], k, v, backend=backend),
            ],
            dim=1,
        )


class TextCrossAttention(nn.Module):
    """Queries from the video tokens, keys/values from the caption tokens; q/k RMSNorm per head."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim // num_heads, eps)
        self.k_norm = RMSNorm(dim // num_heads, eps)

    def forward(
        self, x: Tensor, text: Tensor, text_lengths: tuple[int, ...] | None, *, backend: str
    ) -> Tensor:
        """x [B, N, C]; text [B, Lt, C]; text_lengths: valid keys per item (None: all Lt). -> [B, N, C]."""
        q = self.q_norm(_heads(self.q_linear(x), self.num_heads))
        k, v = self.kv_linear(text).unflatten(-1, (2, self.num_heads, -1)).unbind(2)
        k = self.k_norm(k)
        if text_lengths is None:
            out = attention(q, k, v, backend=backend)
        else:  # the reference's varlen attention: each item over its own valid tokens
            out = torch.cat(
                [
                    attention(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], backend=backend)
                    for i, n in enumerate(text_lengths)
                ]
            )
        return self.proj(out.flatten(2))


@dataclass(frozen=True)
class AudioRouting:
    """Two-speaker routing of one call: token masks [K, St] (person 1, person 2, background, others…)
    over the reference latent's tokens, and the number of audio streams (2, or 3 with a silent one)."""

    token_masks: Tensor
    streams: int
    class_range: int
    class_interval: int
    head_groups: int


class AudioCrossAttention(nn.Module):
    """Each noisy latent frame's tokens attend to that frame's audio tokens (spec §3.10)."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim // num_heads, eps)
        self.k_norm = RMSNorm(dim // num_heads, eps)

    def forward(
        self,
        x: Tensor,
        audio: Tensor,
        *,
        noisy_q: Tensor,
        keys: Tensor,
        routing: AudioRouting | None,
        backend: str,
    ) -> Tensor:
        """x [B, Tn·St, C] noisy tokens; audio [B, Tn, M, Ca] their frames' tokens. With `routing`
        (batch 1), Label-RoPE positions come from the reference map of the self-attention's roped noisy
        queries `noisy_q` against the reference latent's keys (the first St of `keys`). -> [B, Tn·St, C]."""
        batch, frames, tokens_per_frame = audio.shape[0], audio.shape[1], audio.shape[2]
        q = self.q_norm(_heads(self.q_linear(x), self.num_heads))  # [B, Tn·St, H, D]
        k, v = self.kv_linear(audio).unflatten(-1, (2, self.num_heads, -1)).unbind(3)  # [B, Tn, M, H, D]
        k = self.k_norm(k)
        if routing is not None:
            ref_map = reference_attention_map(
                noisy_q, keys, routing.token_masks, head_groups=routing.head_groups
            )[0]  # [K, Tn·St]
            q_pos = label_positions(
                ref_map, class_range=routing.class_range, class_interval=routing.class_interval
            )
            k_pos = audio_key_positions(
                routing.streams,
                tokens_per_frame // routing.streams,
                class_range=routing.class_range,
                class_interval=routing.class_interval,
                num_classes=routing.token_masks.shape[0],
                dtype=k.dtype,
            ).to(k.device)
            q = apply_rope_1d(q, q_pos)
            k = apply_rope_1d(k, k_pos)
        q = q.unflatten(1, (frames, -1)).flatten(0, 1)  # [B·Tn, St, H, D]
        out = attention(q, k.flatten(0, 1), v.flatten(0, 1), backend=backend)
        return self.proj(out.flatten(2).unflatten(0, (batch, frames)).flatten(1, 2))
