"""LongCat-Video-Avatar sampling: sigma schedules, one Euler step, split text/audio guidance, the noise draws
(spec longcat-avatar-inference.md §7.1-7.5). Pure functions over tensors, as pipeline/sampling.py.

Schedules (§7.1). The reference always hands its FlowMatchEulerDiscreteScheduler explicit raw sigmas, which
the scheduler shifts in float32 NumPy (`s·σ / (1 + (s−1)·σ)`), multiplies by 1000 for the timesteps and ends
with σ = 0. The raw sigmas per mode:

| mode | raw sigmas (float32) | used by |
|---|---|---|
| `default` | `torch.linspace(1, 0.001, N)` | v1.0 (N = 50), v1.5 without distillation |
| `distill` | `σ_full[125·i]`, i < 8; `σ_full = flip(linspace(0, 1, 1000))` | v1.5 + DMD LoRA, 8 steps |
| `distill_v1` | `(1000 − 20·⌊50·i/N⌋) / 1000` | v1.0 with `--use_distill` (no LoRA, N steps) |

`enhance_hf` (continuations whenever distillation is off) keeps the timesteps above 500 and appends 500, 450,
..., 50; its sigmas are then `t / 1000` and 0. The DiT sees every timestep rounded to its own dtype,
so to bfloat16 with the published weights (`Schedule.model_timesteps`: multiples of 4 above 512, so 1000,
980, 956, ... in the distilled schedule); a float32 run keeps the float32 timesteps, as the reference's does.

Step (§7.2): the DiT predicts `x0 − ε`; the reference negates it and the scheduler adds `(σ_next − σ)·(−v̂)` in
float32. Guidance (§7.3): `v̂ = u + s_t·(c − u_t) + s_a·(u_t − u)` with `c` = positive text + audio, `u_t` =
negative text + audio, `u` = negative text + all-zero audio features; it is `sampling.cfg_combine` under
the labels `cond`, `drop_text` and `uncond`. Guidance runs when either scale is above 1; v1.5 with
distillation forces both scales to 1 (one pass per step).

RNG order (§7.5): ONE generator, seeded once per run (the reference: 42 + rank on the GPU), never reseeded.
Segment 0 draws its full latent `[1, 16, T, h, w]` in float32; every continuation draws a full-size latent
in bfloat16 whose first `Tc` latents are then overwritten. Nothing else draws from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline.sampling import cfg_combine

NUM_TRAIN_TIMESTEPS = 1000
LATENT_CHANNELS = 16
DISTILL_STEPS = 8  # v1.5's DMD schedule
DISTILL_V1_TABLE = 50  # v1.0's "distill" sigma table
DEFAULT_SIGMA_END = 0.001
ENHANCE_HF_START = 500.0  # timesteps above it are kept
ENHANCE_HF_TAIL = 10  # 500, 450, ..., 50

ScheduleMode = Literal["default", "distill", "distill_v1"]
PASS_LABELS = ("drop_text", "cond", "uncond")  # u_t, c, u: the reference's call order (multi-speaker)


@dataclass(frozen=True)
class Schedule:
    """`timesteps [n]` and `sigmas [n + 1]` (last 0), float32, as the reference's scheduler holds them."""

    timesteps: Tensor
    sigmas: Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def model_timesteps(self) -> Tensor:
        """The timesteps the DiT embeds: rounded to bfloat16 (§7.2), returned as bfloat16."""
        return self.timesteps.to(torch.bfloat16)


def raw_sigmas(mode: ScheduleMode, steps: int) -> np.ndarray:
    """The unshifted sigmas the reference passes to its scheduler, float32 [steps]."""
    if mode == "default":
        if steps < 1:
            raise InvalidInput(f"steps={steps}: at least one step is needed")
        return torch.linspace(1.0, DEFAULT_SIGMA_END, steps).numpy()
    if mode == "distill":
        if steps != DISTILL_STEPS:
            raise InvalidInput(f"the distilled schedule has {DISTILL_STEPS} steps, not {steps}")
        stride = NUM_TRAIN_TIMESTEPS // DISTILL_STEPS
        full = torch.flip(torch.linspace(0.0, 1.0, NUM_TRAIN_TIMESTEPS), [0])
        return full[torch.arange(DISTILL_STEPS) * stride].numpy()
    if mode == "distill_v1":
        if not 1 <= steps <= DISTILL_V1_TABLE:
            raise InvalidInput(f"steps={steps}: the v1.0 distill table takes 1-{DISTILL_V1_TABLE} steps")
        stride = NUM_TRAIN_TIMESTEPS // DISTILL_V1_TABLE
        picks = np.floor(np.linspace(0, DISTILL_V1_TABLE, num=steps, endpoint=False)).astype(np.int64)
        levels = torch.from_numpy(NUM_TRAIN_TIMESTEPS - stride * picks).float()
        return (levels / NUM_TRAIN_TIMESTEPS).numpy()
    raise InvalidInput(f"schedule {mode!r} is not known; use 'default', 'distill' or 'distill_v1'")


def make_schedule(mode: ScheduleMode, steps: int, shift: float) -> Schedule:
    """The shifted schedule (§7.1): float32 NumPy shift, t = 1000·σ, a terminal σ = 0."""
    raw = raw_sigmas(mode, steps).astype(np.float32)
    shifted = (shift * raw / (1 + (shift - 1) * raw)).astype(np.float32)
    sigmas = torch.from_numpy(shifted)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    return Schedule(timesteps=timesteps, sigmas=torch.cat([sigmas, torch.zeros(1)]))


def enhance_hf(schedule: Schedule) -> Schedule:
    """The continuation schedule without distillation (§7.1): timesteps > 500, then 500, 450, ..., 50."""
    tail = np.linspace(ENHANCE_HF_START, 0.0, ENHANCE_HF_TAIL, dtype=np.float32, endpoint=False)
    kept = schedule.timesteps[schedule.timesteps > ENHANCE_HF_START]
    timesteps = torch.cat([kept, torch.from_numpy(tail)])
    return Schedule(timesteps=timesteps, sigmas=torch.cat([timesteps / NUM_TRAIN_TIMESTEPS, torch.zeros(1)]))


def segment_schedule(mode: ScheduleMode, steps: int, shift: float, continuation: bool) -> Schedule:
    """The schedule of one segment: continuations without distillation use `enhance_hf` (§7.6 step 7)."""
    schedule = make_schedule(mode, steps, shift)
    return enhance_hf(schedule) if continuation and mode != "distill" else schedule


def guidance_on(text_scale: float, audio_scale: float) -> bool:
    """The reference guides when either scale is above 1 (§7.3)."""
    return text_scale > 1.0 or audio_scale > 1.0


def guidance_passes(text_scale: float, audio_scale: float) -> tuple[str, ...]:
    """The passes of one step, in the reference's call order: `cond` alone, or `drop_text`, `cond`,
    `uncond` (u_t, c, u)."""
    return PASS_LABELS if guidance_on(text_scale, audio_scale) else ("cond",)


def combine(preds: Mapping[str, Tensor], text_scale: float, audio_scale: float) -> Tensor:
    """`v̂` (§7.3), float32: the `cond` prediction alone without guidance, else
    `u + s_t·(c − u_t) + s_a·(u_t − u)` evaluated left to right."""
    if not guidance_on(text_scale, audio_scale):
        return preds["cond"]
    return cfg_combine(preds, text_scale, audio_scale)


def euler_step(latent: Tensor, velocity: Tensor, schedule: Schedule, step: int) -> Tensor:
    """One scheduler step (§7.2): `x + (σ_{i+1} − σ_i)·(−v̂)` in float32 (the latent upcast first)."""
    dt = schedule.sigmas[step + 1] - schedule.sigmas[step]
    return latent.to(torch.float32) + dt.to(latent.device) * (-velocity)


def model_timestep(schedule: Schedule, step: int, latents: int, clean: int = 0) -> Tensor:
    """The per-latent timestep vector of one DiT call `[1, latents]` float32: the step's timestep, 0 on the
    first `clean` latents (ai2v's image latent, §7.4). The DiT rounds it to its own dtype, as the reference
    casts it to the DiT's dtype (`t.expand(B).to(dit_dtype)`): bf16 for the published weights
    (`Schedule.model_timesteps`), unrounded in a float32 run (what the float32 parity runs compare)."""
    vector = schedule.timesteps[step].expand(1, latents).clone()
    vector[:, :clean] = 0
    return vector


def segment_noise(
    generator: torch.Generator, latent_shape: tuple[int, int, int, int], continuation: bool
) -> Tensor:
    """The segment's noise `[1, 16, T, h, w]` (§7.5): float32 for the first segment, bfloat16 for a
    continuation (its first latents are overwritten by the caller). One draw per segment, in order."""
    dtype = torch.bfloat16 if continuation else torch.float32
    return torch.randn((1, *latent_shape), generator=generator, device=generator.device, dtype=dtype)


def steps_for(distilled: bool, requested: int | None) -> int:
    """v1.5 distilled runs exactly 8 steps; otherwise the requested count (the reference's default 50)."""
    if distilled:
        return DISTILL_STEPS
    steps = 50 if requested is None else requested
    if steps < 1:
        raise InvalidInput(f"steps={steps}: at least one step is needed")
    return steps
