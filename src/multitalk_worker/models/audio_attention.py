"""Audio cross-attention of the MultiTalk blocks and the reference attention map that routes it.

Spec 5.7 (reference map M) and 5.8 (per-latent-frame audio attention, Label-RoPE for two persons).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitalk_worker.models.attention import attention
from multitalk_worker.models.rope import apply_rope_1d, audio_key_positions, label_rope_positions

# Queries per chunk of the reference map: bounds the [B, H/groups, chunk, S] probability tensor
# (rows are independent, so chunking does not change the values).
REF_MAP_QUERY_CHUNK = 8192


def _group_map(q: Tensor, keys: Tensor, token_masks: Tensor, denominators: Tensor) -> Tensor:
    """Per-class attention mass on the reference frame for one head group, averaged over its heads.

    q: [B, h, Lq, D] already scaled; keys: [B, h, S, D]; token_masks: [C, S]; denominators: [C].
    Every step rounds to the input dtype, as the reference's bf16 ops do. Returns [B, C, Lq].
    """
    probs = (q @ keys.transpose(-1, -2)).softmax(dim=-1)  # [B, h, Lq, S]
    mass = probs @ token_masks.transpose(0, 1)  # [B, h, Lq, C]: Σ_keys prob·mask
    return (mass / denominators).mean(dim=1).transpose(1, 2)


def reference_attention_map(
    q: Tensor,
    k: Tensor,
    token_masks: Tensor,
    *,
    head_groups: int,
    query_chunk: int = REF_MAP_QUERY_CHUNK,
) -> Tensor:
    """How strongly each token attends to each masked region of latent frame 0 (spec 5.7).

    q, k: roped self-attention queries/keys [B, L, H, D] in the model dtype; token_masks [C, S] (0/1, model
    dtype) over the S tokens of latent frame 0, which are the keys. Per head group: softmax((q/√D) kᵀ)
    over the S keys, mass per class divided by the class's token count, mean over the group's heads;
    the groups' results are summed and divided by the number of groups. Returns [B, C, L].
    """
    batch, length, heads, head_dim = q.shape
    classes, frame_tokens = token_masks.shape
    if heads % head_groups:
        raise ValueError(f"{heads} heads cannot be split into {head_groups} groups")
    group = heads // head_groups
    scaled_q = (q * (1.0 / head_dim**0.5)).transpose(1, 2)  # [B, H, L, D]
    keys = k[:, :frame_tokens].transpose(1, 2)  # [B, H, S, D]
    denominators = token_masks.sum(dim=-1)  # [C], rounded to the model dtype like the reference's sum
    total = q.new_zeros(batch, classes, length)
    for g in range(head_groups):
        heads_g = slice(g * group, (g + 1) * group)
        parts = [
            _group_map(
                scaled_q[:, heads_g, start : start + query_chunk], keys[:, heads_g], token_masks, denominators
            )
            for start in range(0, length, query_chunk)
        ]
        total = total + torch.cat(parts, dim=-1)
    return total / head_groups


def reference_attention_map_fused(
    q: Tensor, k: Tensor, token_masks: Tensor, *, head_groups: int, backend: str = "sdpa"
) -> Tensor:
    """`reference_attention_map` as one attention call: softmax((q/√D) kᵀ) over the S reference-frame
    keys applied to the 0/1 masks as values is Σ_keys prob·mask. Accumulates in float32 inside the kernel
    (the reference rounds probabilities and sums to bf16); the mean over the heads of equal-size groups
    equals the mean of the group means. The values are zero-padded to the head dim so that every kernel
    accepts them. Same arguments and result as `reference_attention_map` ([B, C, L], q's dtype).
    """
    batch, length, heads, head_dim = q.shape
    classes, frame_tokens = token_masks.shape
    if heads % head_groups:
        raise ValueError(f"{heads} heads cannot be split into {head_groups} groups")
    if classes > head_dim:
        raise ValueError(f"{classes} mask classes do not fit a head dim of {head_dim}")
    values = F.pad(token_masks.to(q.dtype).transpose(0, 1), (0, head_dim - classes))  # [S, D]
    values = values[None, :, None].expand(batch, frame_tokens, heads, head_dim).contiguous()
    mass = attention(q, k[:, :frame_tokens].contiguous(), values, backend=backend)[..., :classes]
    denominators = token_masks.sum(dim=-1).float()  # rounded to the model dtype, as the reference's sum
    return (mass.float() / denominators).mean(dim=2).transpose(1, 2).to(q.dtype)


class AudioCrossAttention(nn.Module):
    """Visual tokens of latent frame t attend to the audio tokens of frame t (checkpoint names
    `q_linear`, `kv_linear`, `proj`; no q/k norms). Two persons: Label-RoPE on queries and keys."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        audio: Tensor,
        query_positions: Tensor | None,
        key_positions: Tensor | None,
        *,
        backend: str,
    ) -> Tensor:
        """x: [B, L, dim] normed visual tokens; audio: [B, T, Na, audio_dim]; positions (two persons
        only): query [B, L], key [Na], model dtype. Returns [B, L, dim]."""
        batch, length, dim = x.shape
        frames = audio.shape[1]
        frame_tokens = length // frames
        heads = (self.num_heads, self.head_dim)
        q = self.q_linear(x).reshape(batch * frames, frame_tokens, *heads)  # [B·T, S, H, D]
        kv = self.kv_linear(audio.flatten(0, 1)).unflatten(-1, (2, *heads))  # [B·T, Na, 2, H, D]
        k, v = kv.unbind(dim=2)
        if query_positions is not None and key_positions is not None:
            q = apply_rope_1d(q, query_positions.reshape(batch * frames, frame_tokens))
            k = apply_rope_1d(k, key_positions)
        out = attention(q, k, v, backend=backend)  # [B·T, S, H, D]
        return self.proj(out.reshape(batch, length, dim))


def label_rope_inputs(
    ref_map: Tensor,
    num_persons: int,
    tokens_per_person: int,
    *,
    class_range: int,
    class_interval: int,
    bounds: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Query positions [B, L] and audio key positions [P·Na] for the two-person audio attention
    (`bounds` as in `label_rope_positions`)."""
    query = label_rope_positions(
        ref_map, class_range=class_range, class_interval=class_interval, bounds=bounds
    )
    keys = audio_key_positions(
        num_persons,
        tokens_per_person,
        class_range=class_range,
        class_interval=class_interval,
        dtype=ref_map.dtype,
        device=ref_map.device,
    )
    return query, keys
