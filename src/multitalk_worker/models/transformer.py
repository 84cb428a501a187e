"""MultiTalk DiT: Wan2.1-I2V-14B with MultiTalk's audio cross-attention (spec 5).

`state_dict()` keys are exactly the original checkpoints' keys (Wan I2V + `multitalk.safetensors`), so a
reference state dict loads with `load_state_dict(strict=True)`. Nothing else is persisted: RoPE tables are
computed per call.

Written here rather than from diffusers' `WanTransformer3DModel` blocks: those keep norms and modulation
tables in float32, run the time projection and the output projection in bf16 and use other key names
(spec 11 items 1, 2, 23), which changes the numbers; the audio layers do not exist there.

`forward` is the composition of four pure steps, exposed so that a sampling loop can implement TeaCache
without state on the module (STYLE habit 1):

    e, e0 = model.time_embed(timestep)            # TeaCache's signal is e0
    inputs = model.embed(latent, timestep, ...)   # BlockInputs
    x = model.run_blocks(inputs.tokens, inputs)   # or inputs.tokens + cached residual
    out = model.project_out(x, inputs.e, inputs.grid)
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitalk_worker.models.audio_proj import AudioProjModel, split_audio_windows, vae_temporal_stride
from multitalk_worker.models.blocks import BlockInputs, Head, TransformerBlock
from multitalk_worker.models.configs import DiTConfig
from multitalk_worker.models.rope import rope_3d_tables
from multitalk_worker.models.runtime import REFERENCE_RUNTIME, DiTRuntime
from multitalk_worker.models.sequence_parallel import SequenceParallel, shard_block_inputs

__all__ = ["BlockInputs", "MultiTalkTransformer", "sinusoidal_embedding"]

MASK_CLASSES = 3  # person 1, person 2, background


def sinusoidal_embedding(timestep: Tensor, dim: int) -> Tensor:
    """[B] -> [B, dim] float32: [cos, sin] of t·10000^(−i/(dim/2)), computed in float64 (spec 5.3 step 2)."""
    half = dim // 2
    position = timestep.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=timestep.device).div(half))
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def _linear_at(stack: nn.Sequential, index: int) -> nn.Linear:
    """The linear layer at `index` of `stack` (nn.Sequential's indexing is typed as any Module)."""
    layer = stack[index]
    assert isinstance(layer, nn.Linear)  # built so in __init__
    return layer


def _linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """A linear layer in float32 on float32 copies of its weights (the reference's autocast(float32))."""
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())


class ImageEmbedding(nn.Module):
    """CLIP features -> image context tokens (`img_emb.proj.{0,1,3,4}`)."""

    def __init__(self, image_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(image_dim),
            nn.Linear(image_dim, image_dim),
            nn.GELU(),
            nn.Linear(image_dim, dim),
            nn.LayerNorm(dim),
        )

    def forward(self, clip_fea: Tensor) -> Tensor:
        return self.proj(clip_fea)


class MultiTalkTransformer(nn.Module):
    """The DiT. Build with the config, load weights, cast with `.to(dtype)`; the parameters' dtype is the
    rounding dtype of every step (bfloat16 reproduces the reference run, float32 runs in float32)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.head = Head(dim, math.prod(config.patch_size) * config.out_dim, config.eps)
        self.img_emb = ImageEmbedding(config.image_dim, dim)
        self.audio_proj = AudioProjModel(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def time_embed(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        """timestep [B] (shifted t in [0, 1000]) -> e [B, dim], e0 [B, 6, dim], both float32.

        Runs in float32 on float32 copies of the (model-dtype) weights; e0 depends only on t and the
        weights, so TeaCache's skip pattern can be precomputed from it.
        """
        emb = sinusoidal_embedding(timestep, self.config.freq_dim)
        first, second = _linear_at(self.time_embedding, 0), _linear_at(self.time_embedding, 2)
        e = _linear_fp32(second, F.silu(_linear_fp32(first, emb)))
        e0 = _linear_fp32(_linear_at(self.time_projection, 1), F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e0

    def embed(
        self,
        latent: Tensor,
        timestep: Tensor,
        context: Tensor,
        clip_fea: Tensor,
        y: Tensor,
        audio: Tensor,
        person_masks: Tensor,
    ) -> BlockInputs:
        """Everything before the blocks (spec 5.3 steps 1–6). Shapes as in `forward`."""
        self._check_inputs(latent, timestep, context, clip_fea, y, audio, person_masks)
        dtype = self.dtype
        tokens = self.patch_embedding(torch.cat([latent, y], dim=1).to(dtype))  # [B, dim, T, Nh, Nw]
        grid = (tokens.shape[2], tokens.shape[3], tokens.shape[4])
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, L, dim]
        e, e0 = self.time_embed(timestep)

        padded = F.pad(
            context.to(dtype), (0, 0, 0, self.config.text_len - context.shape[1])
        )  # zeros at the end
        text = self.text_embedding(padded)  # [B, text_len, dim]
        image = self.img_emb(clip_fea.to(dtype))  # [B, N_img, dim]
        cos, sin = rope_3d_tables(
            grid, self.config.head_dim, max_positions=self.config.rope_max_positions, device=tokens.device
        )
        return BlockInputs(
            tokens=tokens,
            e=e,
            e0=e0,
            context=torch.cat([image, text], dim=1).to(dtype),
            num_image_tokens=image.shape[1],
            audio=self.embed_audio(audio),
            num_persons=audio.shape[1],
            token_masks=self._token_masks(person_masks, grid),
            rope_cos=cos,
            rope_sin=sin,
            grid=grid,
        )

    def embed_audio(self, audio: Tensor) -> Tensor:
        """[B, P, F, W, C_layers, C] windows -> [B, T, P·audio_tokens, audio_dim] tokens, person 1 first."""
        batch, persons = audio.shape[:2]
        first, rest = split_audio_windows(
            audio.to(self.dtype).flatten(0, 1), vae_temporal_stride(self.config)
        )
        tokens = self.audio_proj(first, rest)  # [B·P, T, n, d]
        tokens = tokens.unflatten(0, (batch, persons)).transpose(1, 2)  # [B, T, P, n, d]
        return tokens.flatten(2, 3)

    def _token_masks(self, person_masks: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[3, h, w] -> [3, S] 0/1 in the model dtype: nearest resize to the token grid, then > 0."""
        resized = F.interpolate(person_masks[None].to(torch.float32), size=grid[1:], mode="nearest")[0]
        return (resized > 0).flatten(1).to(device=self.patch_embedding.weight.device, dtype=self.dtype)

    def run_blocks(
        self, x: Tensor, inputs: BlockInputs, *, runtime: DiTRuntime = REFERENCE_RUNTIME
    ) -> Tensor:
        """The block stack on the residual stream x [B, L, dim] (model dtype). `runtime` picks kernels and
        shortcuts (models/runtime.py); the default is the reference path."""
        if runtime.fp32_rope:  # cast the tables once per call, not once per block
            inputs = replace(inputs, rope_cos=inputs.rope_cos.float(), rope_sin=inputs.rope_sin.float())
        exact = runtime.exact() if runtime.exact_self_attention_blocks else runtime
        for index, block in enumerate(self.blocks):
            x = block(x, inputs, runtime=exact if index < runtime.exact_self_attention_blocks else runtime)
        return x

    def project_out(self, x: Tensor, e: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Head and unpatchify: x [B, L, dim], e [B, dim] float32 -> [B, out_dim, T, h, w] float32."""
        out = self.head(x, e)  # [B, L, pt·ph·pw·out_dim] float32
        pt, ph, pw = self.config.patch_size
        frames, rows, cols = grid
        out = out.reshape(out.shape[0], frames, rows, cols, pt, ph, pw, self.config.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, T, pt, Nh, ph, Nw, pw]
        return out.reshape(out.shape[0], self.config.out_dim, frames * pt, rows * ph, cols * pw)

    def forward(
        self,
        latent: Tensor,
        timestep: Tensor,
        context: Tensor,
        clip_fea: Tensor,
        y: Tensor,
        audio: Tensor,
        person_masks: Tensor,
        *,
        runtime: DiTRuntime = REFERENCE_RUNTIME,
        sequence_parallel: SequenceParallel | None = None,
    ) -> Tensor:
        """One denoiser evaluation.

        latent [B, 16, T, h, w] float32; timestep [B] float32; context [B, Lc <= text_len, text_dim];
        clip_fea [B, N_img, image_dim]; y [B, 20, T, h, w]; audio [B, P, F, W, audio_layers,
        audio_channels] with P in {1, 2} and F = 4(T−1)+1; person_masks [3, h, w] shared by the batch
        (used only when P = 2). `runtime` picks kernels and shortcuts (default: the reference path).
        Returns the prediction [B, 16, T, h, w] float32.
        `sequence_parallel` splits the tokens over its process group (models/sequence_parallel.py):
        every rank passes the same inputs and gets the whole prediction.
        """
        inputs = self.embed(latent, timestep, context, clip_fea, y, audio, person_masks)
        if sequence_parallel is not None:
            inputs = shard_block_inputs(inputs, sequence_parallel)
        x = self.run_blocks(inputs.tokens, inputs, runtime=runtime)
        if inputs.shard is not None:
            x = inputs.shard.gather(x)
        return self.project_out(x, inputs.e, inputs.grid)

    def _check_inputs(
        self,
        latent: Tensor,
        timestep: Tensor,
        context: Tensor,
        clip_fea: Tensor,
        y: Tensor,
        audio: Tensor,
        person_masks: Tensor,
    ) -> None:
        """Raise ValueError naming the first input whose shape does not fit the config."""
        cfg = self.config
        batch, frames, height, width = latent.shape[0], latent.shape[2], latent.shape[3], latent.shape[4]
        stride = vae_temporal_stride(cfg)
        expected = {
            "latent channels + y channels": (latent.shape[1] + y.shape[1], cfg.in_dim),
            "y shape [B, T, h, w]": ((y.shape[0], *y.shape[2:]), (batch, frames, height, width)),
            "timestep shape": (tuple(timestep.shape), (batch,)),
            "context batch/width": ((context.shape[0], context.shape[2]), (batch, cfg.text_dim)),
            "clip_fea batch/width": ((clip_fea.shape[0], clip_fea.shape[2]), (batch, cfg.image_dim)),
            "audio [B, F, W, layers, channels]": (
                (audio.shape[0], *audio.shape[2:]),
                (batch, stride * (frames - 1) + 1, cfg.audio_window, cfg.audio_layers, cfg.audio_channels),
            ),
            "person_masks shape": (tuple(person_masks.shape), (MASK_CLASSES, height, width)),
        }
        for name, (got, want) in expected.items():
            if got != want:
                raise ValueError(f"{name}: got {got}, expected {want}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(
                f"context has {context.shape[1]} tokens; at most text_len={cfg.text_len} accepted"
            )
        if audio.shape[1] not in (1, 2):
            raise ValueError(f"audio has {audio.shape[1]} persons; 1 or 2 accepted")
        _, ph, pw = cfg.patch_size
        if height % ph or width % pw or frames % cfg.patch_size[0]:
            raise ValueError(
                f"latent grid {(frames, height, width)} is not divisible by patch {cfg.patch_size}"
            )
