"""LongCat-Video-Avatar's DiT (`LongCatVideoAvatarTransformer3DModel`, spec §3), as our own module.

`state_dict()` keys are exactly the published checkpoint's (spec §2.4), so the published shards load with
`load_state_dict(strict=True)`. Nothing is kept on the module between calls: RoPE angles are computed per
call and a continuation's cached keys are an argument and a return value (spec §7.6):

    _, cache = model(clean, zeros, text0, None, audio, cond=cond, return_kv=True, skip_cross_attn=True)
    out = model(noisy, t, text, mask, audio, cond=cond, kv_cache=cache)   # per step

`forward` is `embed` → `run_blocks` → `project_out`, as for the Wan DiT, so the engine's compiled blocks,
the fp8 linears and the offloaded blocks apply to `model.blocks` alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitalk_worker.models.longcat.attention import AudioRouting, Conditioning, KVCache
from multitalk_worker.models.longcat.blocks import BlockInputs, FinalLayer, LongCatAvatarBlock, linear_fp32
from multitalk_worker.models.longcat.config import LongCatAvatarConfig
from multitalk_worker.models.longcat.rope import rope_3d_angles
from multitalk_worker.models.runtime import REFERENCE_RUNTIME, DiTRuntime

NO_CONDITIONING = Conditioning()  # at2v: no clean latents

__all__ = ["NO_CONDITIONING", "Conditioning", "LongCatAvatarTransformer", "timestep_sinusoid"]


def timestep_sinusoid(timestep: Tensor, dim: int) -> Tensor:
    """[N] -> [N, dim] float32, [cos, sin] of t·exp(−ln(10⁴)·k/(dim/2)) (spec §3.3: cos first, float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(timestep.device)
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear, in float32 (`t_embedder.mlp.{0,2}`)."""

    def __init__(self, out_dim: int, frequency_dim: int) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, timestep: Tensor) -> Tensor:
        emb = timestep_sinusoid(timestep, self.frequency_dim)
        return linear_fp32(self.mlp[2], F.silu(linear_fp32(self.mlp[0], emb)))


class CaptionEmbedder(nn.Module):
    """umT5 features -> Linear -> GELU(tanh) -> Linear, in the model dtype (`y_embedder.y_proj.{0,2}`)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.y_proj = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, text: Tensor) -> Tensor:
        return self.y_proj(text)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = patch (`x_embedder.proj`)."""

    def __init__(self, config: LongCatAvatarConfig) -> None:
        super().__init__()
        patch = config.patch_size
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=patch, stride=patch)

    def forward(self, latent: Tensor) -> Tensor:
        return self.proj(latent)


class AudioProjector(nn.Module):
    """Per-frame audio windows -> `context_tokens` tokens of width `output_dim` per latent frame (spec §3.5).

    Latent 0 takes frame 0's whole window (`proj1`); latent j ≥ 1 takes the left half and centre of its
    first frame's window, the centres of its middle frames and the centre and right half of its last frame
    (`proj1_vf`). Then ReLU, `proj2`, ReLU, `proj3`, LayerNorm (eps 1e-5), all in the model dtype.
    """

    def __init__(self, config: LongCatAvatarConfig) -> None:
        super().__init__()
        features = config.audio_block * config.audio_channel
        self.tokens, self.width, self.vae_scale = config.context_tokens, config.output_dim, config.vae_scale
        self.proj1 = nn.Linear(config.audio_window * features, config.intermediate_dim)
        self.proj1_vf = nn.Linear(config.audio_vf_window * features, config.intermediate_dim)
        self.proj2 = nn.Linear(config.intermediate_dim, config.intermediate_dim)
        self.proj3 = nn.Linear(config.intermediate_dim, config.context_tokens * config.output_dim)
        self.norm = nn.LayerNorm(config.output_dim)

    def windows(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """audio [P, F, W, blocks, C] -> frame 0's windows [P, W·blocks·C] and the later latents' inputs
        [P, (F−1)/vae_scale, (W + vae_scale − 1)·blocks·C], in (slot, block, channel) order."""
        streams, frames, window = audio.shape[:3]
        centre = window // 2
        groups = audio[:, 1:].unflatten(1, ((frames - 1) // self.vae_scale, self.vae_scale))
        later = torch.cat(
            [groups[:, :, 0, : centre + 1], groups[:, :, 1:-1, centre], groups[:, :, -1, centre:]], dim=2
        )
        return audio[:, 0].flatten(1), later.flatten(3).flatten(2)

    def forward(self, audio: Tensor) -> Tensor:
        """audio [P, F, W, blocks, C] with F = vae_scale·(T−1) + 1 -> [P, T, tokens, width]."""
        first, later = self.windows(audio)
        streams, latents = later.shape[0], later.shape[1] + 1
        h0 = torch.relu(self.proj1(first))  # [P, hidden]
        h1 = torch.relu(self.proj1_vf(later.flatten(0, 1))).unflatten(0, (streams, latents - 1))
        h = torch.cat([h0[:, None], h1], dim=1).flatten(0, 1)  # [P·T, hidden]
        tokens = self.proj3(torch.relu(self.proj2(h))).unflatten(-1, (self.tokens, self.width))
        return self.norm(tokens).unflatten(0, (streams, latents))


class LongCatAvatarTransformer(nn.Module):
    """The DiT. Build from the config, load weights, cast with `.to(dtype)`: the parameters' dtype is the
    rounding dtype of every step (bfloat16 as the reference runs; float32 runs in float32)."""

    def __init__(self, config: LongCatAvatarConfig) -> None:
        super().__init__()
        self.config = config
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = TimestepEmbedder(config.adaln_tembed_dim, config.frequency_embedding_size)
        self.y_embedder = CaptionEmbedder(config.caption_channels, config.hidden_size)
        self.blocks = nn.ModuleList(LongCatAvatarBlock(config) for _ in range(config.depth))
        self.audio_proj = AudioProjector(config)
        self.final_layer = FinalLayer(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def embed_audio(self, audio: Tensor, frames: int, num_ref_latents: int, routed: bool) -> Tensor:
        """audio [P, F, W, blocks, C] -> tokens of the call's last `frames` latents: [P, frames, n, d],
        or, routed (two speakers, batch 1), [1, frames, P·n, d] with stream 0's tokens first."""
        tokens = self.audio_proj(audio.to(self.dtype))  # [P, T_audio, n, d]
        if num_ref_latents:  # the reference latent takes latent 0's tokens (unused: it gets no audio)
            tokens = torch.cat([tokens[:, :1], tokens], dim=1)
        tokens = tokens[:, -frames:]
        return tokens.transpose(0, 1).flatten(1, 2)[None] if routed else tokens

    def embed_text(self, text: Tensor, mask: Tensor | None) -> tuple[Tensor, tuple[int, ...] | None]:
        """text [B, Lt, caption_channels], mask [B, Lt] (1 = token) or None -> caption tokens [B, Lt, C]
        and the valid keys per item (None: all). With text_tokens_zero_pad the padded positions stay keys
        as zero vectors; without it each item's valid tokens are moved to the front and counted."""
        tokens = self.y_embedder(text.to(self.dtype))
        if mask is None:
            return tokens, None
        if self.config.text_tokens_zero_pad:
            return tokens * mask[:, :, None].to(tokens.dtype), None
        valid = mask != 0
        packed = torch.zeros_like(tokens)
        for i in range(tokens.shape[0]):
            packed[i, : int(valid[i].sum())] = tokens[i][valid[i]]
        return packed, tuple(int(n) for n in valid.sum(dim=1))

    def token_masks(self, person_masks: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[K, H, W] -> [K, Nh·Nw] 0/1 in the model dtype: nearest resize to the token grid, then > 0."""
        resized = F.interpolate(person_masks[None].float(), size=grid[1:], mode="nearest")[0]
        return (resized > 0).flatten(1).to(device=self.x_embedder.proj.weight.device, dtype=self.dtype)

    def embed(
        self,
        latent: Tensor,
        timestep: Tensor,
        text: Tensor,
        text_mask: Tensor | None,
        audio: Tensor,
        *,
        cond: Conditioning,
        person_masks: Tensor | None,
        cached: bool,
        skip_cross_attn: bool,
    ) -> BlockInputs:
        """Everything before the blocks (spec §3.2 steps 1–7). Shapes as in `forward`."""
        self._check_inputs(latent, timestep, text, text_mask, audio, person_masks, cond, cached)
        batch, _, frames = latent.shape[:3]
        tokens = self.x_embedder(latent.to(self.dtype))  # [B, C, T, Nh, Nw]
        grid = (frames, tokens.shape[3], tokens.shape[4])
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(batch, frames)
        # the timestep is rounded to the model dtype first (bf16: 876.2 -> 876.0), as the reference does
        temb = self.t_embedder(timestep.to(self.dtype).float().flatten()).unflatten(0, (batch, frames))
        routed = person_masks is not None and audio.shape[0] > 1
        routing = None
        if routed:
            assert person_masks is not None
            cfg = self.config
            routing = AudioRouting(
                self.token_masks(person_masks, grid), audio.shape[0], cfg.class_range, cfg.class_interval,
                cfg.ref_map_head_groups,
            )  # fmt: skip
        text_tokens, lengths = self.embed_text(text, text_mask)
        past = cond.num_cond_latents if cached else 0
        angles = rope_3d_angles(
            (past + frames, grid[1], grid[2]),
            self.config.head_dim,
            theta=self.config.rope_theta,
            ref_img_index=cond.ref_img_index,
            num_ref_latents=cond.num_ref_latents,
            device=tokens.device,
        )
        return BlockInputs(
            tokens=tokens.flatten(2).transpose(1, 2),
            temb=temb,
            text=text_tokens,
            text_lengths=lengths,
            audio=self.embed_audio(audio, frames, cond.num_ref_latents, routed),
            routing=routing,
            angles=angles,
            grid=grid,
            cond=cond,
            cached=cached,
            skip_cross_attn=skip_cross_attn,
        )

    def run_blocks(
        self,
        x: Tensor,
        inputs: BlockInputs,
        kv_cache: list[KVCache] | None = None,
        *,
        return_kv: bool = False,
        runtime: DiTRuntime = REFERENCE_RUNTIME,
    ) -> tuple[Tensor, list[KVCache]]:
        """The block stack on x [B, N, C]; returns the stream and, with `return_kv`, each block's own (k, v)
        before RoPE (else []: a denoising call keeps no block's keys alive past that block)."""
        if kv_cache is not None and len(kv_cache) != len(self.blocks):
            raise ValueError(f"kv_cache has {len(kv_cache)} entries; the model has {len(self.blocks)} blocks")
        exact = runtime.exact() if runtime.exact_self_attention_blocks else runtime
        kvs = []
        for index, block in enumerate(self.blocks):
            block_runtime = exact if index < runtime.exact_self_attention_blocks else runtime
            x, kv = block(x, inputs, None if kv_cache is None else kv_cache[index], runtime=block_runtime)
            if return_kv:  # v is a view of the fused qkv output: copy it so that q's memory is freed
                kvs.append((kv[0].contiguous(), kv[1].contiguous()))
        return x, kvs

    def project_out(self, x: Tensor, temb: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Final layer and unpatchify: x [B, N, C] -> [B, out, T, h, w] float32 (channel o of a token is
        (row-in-patch·pw + column-in-patch)·out + c)."""
        out = self.final_layer(x, temb, grid[0])  # [B, N, pt·ph·pw·out] float32
        pt, ph, pw = self.config.patch_size
        frames, rows, cols = grid
        out = out.reshape(out.shape[0], frames, rows, cols, pt, ph, pw, self.config.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, T, pt, Nh, ph, Nw, pw]
        return out.reshape(out.shape[0], self.config.out_channels, frames * pt, rows * ph, cols * pw)

    def forward(
        self,
        latent: Tensor,
        timestep: Tensor,
        text: Tensor,
        text_mask: Tensor | None,
        audio: Tensor,
        *,
        cond: Conditioning = NO_CONDITIONING,
        person_masks: Tensor | None = None,
        kv_cache: list[KVCache] | None = None,
        runtime: DiTRuntime = REFERENCE_RUNTIME,
    ) -> Tensor:
        """One denoiser evaluation.

        latent [B, 16, T, h, w] (clean latents first, per `cond`; with `kv_cache` only the noisy ones);
        timestep [B] or [B, T] (clean latents at 0); text [B, Lt, caption_channels], text_mask [B, Lt] or
        None; audio [P, F, W, audio_block, audio_channel] per-frame windows of the whole segment, F =
        vae_scale·(T_seg − 1) + 1, with P = B, or P = 2 / 3 streams for batch 1 with `person_masks` [K, H, W]
        (person 1, person 2, background, others…); kv_cache: per block, from `clean_cache`.
        Returns the prediction (≈ x₀ − ε) [B, 16, T, h, w] float32.
        """
        inputs = self.embed(
            latent, timestep, text, text_mask, audio, cond=cond, person_masks=person_masks,
            cached=kv_cache is not None, skip_cross_attn=False,
        )  # fmt: skip
        x, _ = self.run_blocks(inputs.tokens, inputs, kv_cache, runtime=runtime)
        return self.project_out(x, inputs.temb, inputs.grid)

    def clean_cache(
        self,
        latent: Tensor,
        text: Tensor,
        audio: Tensor,
        *,
        cond: Conditioning,
        runtime: DiTRuntime = REFERENCE_RUNTIME,
    ) -> list[KVCache]:
        """The continuation's cache pass (spec §3.7): the clean latents [B, 16, Tc, h, w] alone, timestep
        0, no text or audio attention; each block's keys (after k_norm, before RoPE) and values."""
        if cond.num_cond_latents != latent.shape[2]:
            raise ValueError(
                f"the cache pass takes the {cond.num_cond_latents} clean latents alone; got {latent.shape[2]}"
            )
        timestep = torch.zeros(latent.shape[0], device=latent.device)
        audio = audio[:1].expand(latent.shape[0], *audio.shape[1:])  # unused (no audio attention)
        inputs = self.embed(
            latent, timestep, text, None, audio, cond=cond, person_masks=None, cached=False,
            skip_cross_attn=True,
        )  # fmt: skip
        _, kvs = self.run_blocks(inputs.tokens, inputs, return_kv=True, runtime=runtime)
        return kvs

    def _check_inputs(
        self,
        latent: Tensor,
        timestep: Tensor,
        text: Tensor,
        text_mask: Tensor | None,
        audio: Tensor,
        person_masks: Tensor | None,
        cond: Conditioning,
        cached: bool,
    ) -> None:
        """Raise ValueError naming the first input whose shape does not fit the config."""
        cfg = self.config
        batch, channels, frames, height, width = latent.shape
        segment = frames + (cond.num_cond_latents if cached else 0) - cond.num_ref_latents
        streams = audio.shape[0]
        expected = {
            "latent channels": (channels, cfg.in_channels),
            "timestep shape": (tuple(timestep.shape), (batch,) if timestep.ndim == 1 else (batch, frames)),
            "text batch/width": ((text.shape[0], text.shape[2]), (batch, cfg.caption_channels)),
            "audio [W, blocks, C]": (
                tuple(audio.shape[2:]),
                (cfg.audio_window, cfg.audio_block, cfg.audio_channel),
            ),
            "audio streams": (streams, batch if person_masks is None or streams == 1 else streams),
        }
        if text_mask is not None:
            expected["text_mask shape"] = (tuple(text_mask.shape), tuple(text.shape[:2]))
        for name, (got, want) in expected.items():
            if got != want:
                raise ValueError(f"{name}: got {got}, expected {want}")
        latents_of_audio = (audio.shape[1] - 1) // cfg.vae_scale + 1
        if (audio.shape[1] - 1) % cfg.vae_scale or latents_of_audio < segment:
            raise ValueError(
                f"audio has {audio.shape[1]} frames; expected vae_scale·(T−1)+1 for T >= {segment} latents"
            )
        if person_masks is not None and streams > 1:
            if batch != 1 or streams not in (2, 3) or person_masks.ndim != 3 or person_masks.shape[0] < 3:
                raise ValueError(
                    f"two-speaker routing takes batch 1, 2 or 3 audio streams and masks [K >= 3, H, W]; got "
                    f"batch {batch}, {streams} streams, masks {tuple(person_masks.shape)}"
                )
            if not (cond.num_cond_latents or cached):
                raise ValueError("two-speaker routing needs a clean reference latent (ai2v or continuation)")
        if height % cfg.patch_size[1] or width % cfg.patch_size[2]:
            raise ValueError(f"latent size {(height, width)} is not divisible by patch {cfg.patch_size}")
