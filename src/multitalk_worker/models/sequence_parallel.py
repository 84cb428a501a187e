"""Sequence parallelism: one DiT forward split over the ranks of a torch.distributed process group.

Ulysses-style: each of N ranks holds a contiguous 1/N of the token sequence (the L tokens, zero-padded at
the end to a multiple of N) and the full weights. Per block, only what couples tokens is exchanged:

* self-attention: q, k, v go sequence -> heads with one all-to-all; each rank attends with H/N heads over
  all L tokens (padding dropped from the keys) and the output goes heads -> sequence with another;
* reference map (spec 5.7): each rank's queries against the keys of latent frame 0, broadcast from the
  rank that holds them (all-gathered when frame 0 spans several ranks);
* Label-RoPE (spec 5.8): min and max of the map over all L tokens by one all-reduce (MAX of (-min, max));
* audio cross-attention is per latent frame: a shard that starts or ends inside a frame is padded to whole
  frames for that step only (queries are independent rows, so the padding changes nothing).

Shards coincide with whole latent frames whenever N divides the frame count T. Equal token counts are
kept otherwise (81 frames give T = 21, which no head-compatible N divides): whole-frame shards would
leave ranks idle, e.g. 11 and 10 frames on 2 GPUs. Every other operation (linears, norms, FFN, text/image
cross-attention) is row-wise and runs unchanged on the shard, so the result equals the single-process
forward up to the rounding of kernels on different shapes. Inference only (collectives without autograd).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from multitalk_worker.models.attention import attention
from multitalk_worker.models.audio_attention import AudioCrossAttention
from multitalk_worker.models.blocks import BlockInputs

__all__ = ["SequenceParallel", "SequenceShard", "shard_block_inputs"]


@dataclass(frozen=True)
class SequenceParallel:
    """The process group that shares one forward: this process's rank in it and its size."""

    group: dist.ProcessGroup
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.world_size} processes")

    @classmethod
    def from_group(cls, group: dist.ProcessGroup) -> SequenceParallel:
        """Rank and size of this process in `group` (an initialised group this process belongs to)."""
        return cls(group=group, rank=dist.get_rank(group), world_size=dist.get_world_size(group))

    def check_heads(self, num_heads: int) -> None:
        """Raise ValueError unless the attention heads split evenly over the ranks."""
        if num_heads % self.world_size:
            accepted = [n for n in range(1, num_heads + 1) if num_heads % n == 0]
            raise ValueError(
                f"sequence parallelism over {self.world_size} processes needs the {num_heads} attention "
                f"heads to split evenly; accepted process counts: {accepted}"
            )


@dataclass(frozen=True)
class SequenceShard:
    """Which tokens of one forward this rank holds: positions [start, start + shard_length) of the
    sequence padded to world_size · shard_length, of which the first `valid` are real tokens."""

    parallel: SequenceParallel
    length: int  # L: real tokens of the whole sequence
    frame_tokens: int  # S: tokens per latent frame

    @property
    def shard_length(self) -> int:
        return -(-self.length // self.parallel.world_size)

    @property
    def start(self) -> int:
        return self.parallel.rank * self.shard_length

    @property
    def valid(self) -> int:
        return max(0, min(self.shard_length, self.length - self.start))

    def scatter(self, x: Tensor, dim: int) -> Tensor:
        """This rank's part of a full-sequence tensor along `dim`, zero-padded to shard_length."""
        part = x.narrow(dim, min(self.start, self.length), self.valid)
        missing = self.shard_length - self.valid
        if missing == 0:
            return part
        padding = list(part.shape)
        padding[dim] = missing
        return torch.cat([part, part.new_zeros(padding)], dim=dim)

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's shard [B, shard_length, ...] -> the whole sequence [B, L, ...] on every rank."""
        n = self.parallel.world_size
        out = x.new_empty(n * x.shape[0], *x.shape[1:])  # the ranks' shards concatenated on dim 0
        dist.all_gather_single(out, x.contiguous(), group=self.parallel.group)
        return out.unflatten(0, (n, x.shape[0])).movedim(0, 1).flatten(1, 2)[:, : self.length]

    def _heads_from_sequence(self, x: Tensor) -> Tensor:
        """[C, B, shard_length, H, D] sequence shards -> [C, B, N·shard_length, H/N, D] head shards."""
        n = self.parallel.world_size
        c, b, length, heads, d = x.shape
        self.parallel.check_heads(heads)
        send = x.reshape(c, b, length, n, heads // n, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        received = torch.empty_like(send)  # [source rank, C, B, shard_length, H/N, D]
        dist.all_to_all_single(received, send, group=self.parallel.group)
        return received.permute(1, 2, 0, 3, 4, 5).reshape(c, b, n * length, heads // n, d)

    def _sequence_from_heads(self, x: Tensor) -> Tensor:
        """Inverse of `_heads_from_sequence`: [C, B, N·shard_length, H/N, D] -> [C, B, shard_length, H, D]."""
        n = self.parallel.world_size
        c, b, padded, heads, d = x.shape
        send = x.reshape(c, b, n, padded // n, heads, d).permute(2, 0, 1, 3, 4, 5).contiguous()
        received = torch.empty_like(send)  # [source rank = head group, C, B, shard_length, H/N, D]
        dist.all_to_all_single(received, send, group=self.parallel.group)
        return received.permute(1, 2, 3, 0, 4, 5).reshape(c, b, padded // n, n * heads, d)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, backend: str) -> Tensor:
        """Full self-attention of this rank's queries over all L tokens.

        q, k, v: [B, shard_length, H, D] (same dtype). Returns [B, shard_length, H, D]; padding rows are 0.
        """
        q_h, k_h, v_h = self._heads_from_sequence(torch.stack((q, k, v)))[:, :, : self.length].unbind(0)
        out = attention(q_h, k_h, v_h, backend=backend)  # [B, L, H/N, D]
        out = F.pad(out, (0, 0, 0, 0, 0, self.parallel.world_size * self.shard_length - self.length))
        return self._sequence_from_heads(out[None])[0]

    def frame0_keys(self, k: Tensor) -> Tensor:
        """The keys of latent frame 0 [B, S, H, D] on every rank, from each rank's k [B, shard_length, H, D]
        (the keys of the reference map, spec 5.7)."""
        group = self.parallel.group
        if self.frame_tokens <= self.shard_length:  # frame 0 lies on rank 0
            keys = k[:, : self.frame_tokens].contiguous()
            if self.parallel.rank != 0:
                keys = torch.empty_like(keys)
            dist.broadcast(keys, group=group, group_src=0)
            return keys
        return self.gather(k)[:, : self.frame_tokens]

    def map_bounds(self, ref_map: Tensor) -> tuple[Tensor, Tensor]:
        """Min and max of the two person rows of the reference map over all L real tokens.

        ref_map: [B, C, shard_length] this rank's part. Returns (min, max), each [B, 2] in ref_map's dtype
        (exact: the reduction runs in float32 on values of that dtype).
        """
        rows = ref_map[:, :2, : self.valid].float()
        if self.valid:
            lows, highs = rows.amin(dim=-1), rows.amax(dim=-1)
        else:  # a rank holding only padding contributes the identities of min and max
            lows = highs = rows.new_full(rows.shape[:2], float("inf"))
            highs = -highs
        both = torch.stack((-lows, highs))  # one all-reduce: max(-x) = -min(x)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.parallel.group)
        return (-both[0]).to(ref_map.dtype), both[1].to(ref_map.dtype)

    def audio_attention(
        self,
        module: AudioCrossAttention,
        x: Tensor,
        audio: Tensor,
        query_positions: Tensor | None,
        key_positions: Tensor | None,
        *,
        backend: str,
    ) -> Tensor:
        """`module` (per-latent-frame audio attention) on this rank's shard.

        x: [B, shard_length, dim]; audio: [B, T, Na, audio_dim] of the whole clip; query_positions:
        [B, shard_length] or None. The real tokens are padded to the whole frames they touch, those
        frames' audio is used, and the padding rows are dropped. Returns [B, shard_length, dim].
        """
        if self.valid == 0:
            return torch.zeros_like(x)
        s = self.frame_tokens
        first, stop = self.start // s, -(-(self.start + self.valid) // s)
        lead = self.start - first * s
        trail = stop * s - self.start - self.valid
        padded_x = F.pad(x[:, : self.valid], (0, 0, lead, trail))
        positions = None
        if query_positions is not None:
            positions = F.pad(query_positions[:, : self.valid], (lead, trail))
        out = module(padded_x, audio[:, first:stop], positions, key_positions, backend=backend)
        return F.pad(out[:, lead : lead + self.valid], (0, 0, 0, self.shard_length - self.valid))


def shard_block_inputs(inputs: BlockInputs, parallel: SequenceParallel) -> BlockInputs:
    """Block inputs for this rank: its part of the tokens and of the RoPE tables, and the shard layout
    (`inputs.shard`) that the blocks use for their collectives. Everything else stays whole."""
    frames, rows, cols = inputs.grid
    shard = SequenceShard(parallel=parallel, length=frames * rows * cols, frame_tokens=rows * cols)
    return replace(
        inputs,
        tokens=shard.scatter(inputs.tokens, dim=1),
        rope_cos=shard.scatter(inputs.rope_cos, dim=0),
        rope_sin=shard.scatter(inputs.rope_sin, dim=0),
        shard=shard,
    )
