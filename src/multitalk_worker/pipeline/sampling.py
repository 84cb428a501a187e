"""Denoising of one clip: shifted schedule, guidance (CFG / APG), TeaCache, motion injection (spec 6.1-6.6).

Everything that changes during sampling (latent, APG momentum, TeaCache accumulator, previous e0 and
residuals) is a local of `sample_clip`, fresh for every clip; the model stays pure. Random numbers come
from ONE `torch.Generator` seeded once per run by the caller and drawn in the reference's order (spec
6.6 "Random draws per run"): per clip the main noise first (`initial_noise`), then, for clips after the
first, `steps + 1` motion-noise draws (one before the first step, one after each step).

TeaCache (spec 6.5). The reference keys its state by a call counter modulo 3, so with two passes per step
(text scale 1) it mixes the `cond` and `drop_audio` residuals. Here each pass keeps its own residual under
its own label, which gives the reference's behaviour for three passes and the intended one for two. The
skip decision depends only on `e0`, which depends only on `t`, so the reference's three per-pass
accumulators always agree; one accumulator per clip is kept and each step is computed or skipped whole.
The first `TEACACHE_RET_STEPS` steps of every clip always compute (the reference's counter wraps per clip).

Sequence parallelism (models/sequence_parallel.py): with a `SequenceParallel`, every rank runs this loop on
the same inputs and each DiT pass is split over the ranks' tokens; the prediction is gathered before the
head, so the latent, the guidance and the random draws stay whole and identical on every rank. The TeaCache
residual is kept per rank, as this rank's shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from multitalk_worker.errors import Cancelled
from multitalk_worker.models.runtime import REFERENCE_RUNTIME, DiTRuntime
from multitalk_worker.models.sequence_parallel import SequenceParallel, shard_block_inputs
from multitalk_worker.models.transformer import MultiTalkTransformer

NUM_TRAIN_TIMESTEPS = 1000
LATENT_CHANNELS = 16
APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 55.0
TEACACHE_RET_STEPS = 5
# use_ret_steps=True coefficients (spec 6.5), highest power first.
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "480p": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "720p": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}
PASSES_FULL = ("cond", "drop_text", "uncond")
PASSES_NO_TEXT_GUIDANCE = ("cond", "drop_audio")
WHOLE_LATENT = [-1, -2, -3, -4]  # APG norms/projections span [C, T, h, w] of a [B, C, T, h, w] prediction


@dataclass(frozen=True)
class GuidanceSettings:
    steps: int
    shift: float
    text_scale: float
    audio_scale: float
    apg: bool = False
    apg_momentum: float = APG_MOMENTUM
    apg_norm_threshold: float = APG_NORM_THRESHOLD
    teacache_threshold: float | None = None
    teacache_coefficients: tuple[float, ...] = TEACACHE_COEFFICIENTS["480p"]


@dataclass(frozen=True)
class PassInputs:
    """What differs between guidance passes: text context [1, Lc, text_dim] and audio [1, P, F, 5, l, c]."""

    context: Tensor
    audio: Tensor


@dataclass(frozen=True)
class ClipConditions:
    """Inputs shared by every pass of one clip, plus the per-pass inputs keyed by pass label."""

    passes: Mapping[str, PassInputs]
    clip_fea: Tensor  # [1, N_img, image_dim]
    y: Tensor  # [1, 20, T, h, w]
    person_masks: Tensor  # [3, h, w]
    # [1, 16, Tm, h, w] float32, noised into the first Tm latent frames (MultiTalk's clips k >= 1; with
    # `clean_latent` too, only its random draws matter: InfiniteTalk's clips k >= 1)
    motion_latent: Tensor | None = None
    # [1, 16, Tm, h, w] float32, written clean into the first Tm latent frames before every model call and
    # after every update (InfiniteTalk, spec IT 5.3)
    clean_latent: Tensor | None = None


StepCallback = Callable[[int], None]  # called with the 1-based step after each step
CancelCheck = Callable[[], bool]


def shifted_timesteps(steps: int, shift: float) -> Tensor:
    """`linspace(1000, 1, steps)` (float32) + [0], each shifted (spec 6.1) -> [steps + 1] float32.

    u = s/1000; t = 1000·shift·u / (1 + (shift−1)·u), in float32 torch arithmetic.
    """
    base = np.append(np.linspace(NUM_TRAIN_TIMESTEPS, 1, steps, dtype=np.float32), np.float32(0.0))
    u = torch.from_numpy(base.astype(np.float32)) / NUM_TRAIN_TIMESTEPS
    return shift * u / (1 + (shift - 1) * u) * NUM_TRAIN_TIMESTEPS


def euler_step(latent: Tensor, velocity: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """x + (−v)·(t − t_next)/1000, with dt a float32 tensor, as the reference orders it."""
    dt = (t - t_next) / NUM_TRAIN_TIMESTEPS
    return latent + (-velocity) * dt


def guidance_passes(text_scale: float) -> tuple[str, ...]:
    """Three passes, or two when the text scale is 1 (`math.isclose`, spec 6.3)."""
    return PASSES_NO_TEXT_GUIDANCE if math.isclose(text_scale, 1.0) else PASSES_FULL


def cfg_combine(preds: Mapping[str, Tensor], text_scale: float, audio_scale: float) -> Tensor:
    """Spec 6.3, evaluated left to right as the reference does."""
    if "drop_audio" in preds:
        return preds["drop_audio"] + audio_scale * (preds["cond"] - preds["drop_audio"])
    uncond, drop_text, cond = preds["uncond"], preds["drop_text"], preds["cond"]
    return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)


def apg_direction(
    diff: Tensor,
    cond: Tensor,
    running: Tensor | None,
    momentum: float,
    norm_threshold: float,
    eta: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Spec 6.4: momentum average, norm clamp, drop the component parallel to `cond`.

    Returns (guidance direction, new running average).
    """
    running = diff if running is None else diff + momentum * running
    diff = running
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=WHOLE_LATENT, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / norm)
    cond64 = cond.double()  # unit: F.normalize's formula (eps 1e-12); its stub refuses a list of dims
    d64, unit = diff.double(), cond64 / cond64.norm(p=2, dim=WHOLE_LATENT, keepdim=True).clamp_min(1e-12)
    parallel = (d64 * unit).sum(dim=WHOLE_LATENT, keepdim=True) * unit
    orthogonal = d64 - parallel
    return orthogonal.to(diff.dtype) + eta * parallel.to(diff.dtype), running


def apg_combine(
    preds: Mapping[str, Tensor], settings: GuidanceSettings, buffers: dict[str, Tensor | None]
) -> Tensor:
    """APG guidance (spec 6.4); updates the per-clip momentum `buffers` ("text", "audio") in place."""
    cond = preds["cond"]
    momentum, threshold = settings.apg_momentum, settings.apg_norm_threshold
    if "drop_audio" in preds:
        audio, buffers["audio"] = apg_direction(
            cond - preds["drop_audio"], cond, buffers.get("audio"), momentum, threshold
        )
        return cond + (settings.audio_scale - 1) * audio
    text, buffers["text"] = apg_direction(
        cond - preds["drop_text"], cond, buffers.get("text"), momentum, threshold
    )
    audio, buffers["audio"] = apg_direction(
        preds["drop_text"] - preds["uncond"], cond, buffers.get("audio"), momentum, threshold
    )
    return cond + (settings.text_scale - 1) * text + (settings.audio_scale - 1) * audio


def teacache_decision(
    accumulated: float, previous_e0: Tensor | None, e0: Tensor, step: int, settings: GuidanceSettings
) -> tuple[bool, float]:
    """(compute the blocks?, new accumulator): add the rescaled relative L1 change of e0 since the
    previous step; compute (and reset) once it reaches the threshold. Forced for the first steps (6.5)."""
    if step < TEACACHE_RET_STEPS or previous_e0 is None:
        return True, 0.0
    rel = ((e0 - previous_e0).abs().mean() / previous_e0.abs().mean()).cpu().item()
    accumulated += float(np.poly1d(settings.teacache_coefficients)(rel))
    assert settings.teacache_threshold is not None  # sample_clip decides only with TeaCache on
    if accumulated < settings.teacache_threshold:
        return False, accumulated
    return True, 0.0


def predict(
    model: MultiTalkTransformer,
    latent: Tensor,
    timestep: Tensor,
    conditions: ClipConditions,
    label: str,
    residuals: dict[str, Tensor] | None,
    compute: bool,
    sequence_parallel: SequenceParallel | None = None,
    runtime: DiTRuntime = REFERENCE_RUNTIME,
) -> Tensor:
    """One guidance pass. With TeaCache (`residuals` given), a computed pass stores the residual of the
    block stack under its label and a skipped pass adds the label's last residual instead. With
    `sequence_parallel`, the blocks run on this rank's tokens (residuals too) and the head on all of them."""
    pass_inputs = conditions.passes[label]
    inputs = model.embed(
        latent,
        timestep,
        pass_inputs.context,
        conditions.clip_fea,
        conditions.y,
        pass_inputs.audio,
        conditions.person_masks,
    )
    if sequence_parallel is not None:
        inputs = shard_block_inputs(inputs, sequence_parallel)  # tokens [1, ⌈L/N⌉, dim] of this rank
    if compute:
        x = model.run_blocks(inputs.tokens, inputs, runtime=runtime)
        if residuals is not None:
            residuals[label] = x - inputs.tokens
    else:
        assert residuals is not None  # a skipped pass reuses its residual: only with TeaCache on
        x = inputs.tokens + residuals[label]
    if inputs.shard is not None:
        x = inputs.shard.gather(x)  # [1, L, dim] on every rank
    return model.project_out(x, inputs.e, inputs.grid)


def initial_noise(generator: torch.Generator, shape: tuple[int, int, int, int]) -> Tensor:
    """The clip's main noise [16, T, h, w] float32 on the generator's device, as a [1, ...] batch."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)[None]


def inject_motion(latent: Tensor, motion: Tensor, timestep: Tensor, generator: torch.Generator) -> Tensor:
    """Overwrite the first Tm latent frames with the motion latent noised to σ = t/1000 (fresh noise)."""
    shape = motion.shape[1:]  # [16, Tm, h, w], as the reference's randn_like of the unbatched latent
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=motion.dtype)[None]
    sigma = timestep.float() / NUM_TRAIN_TIMESTEPS
    latent = latent.clone()
    latent[:, :, : motion.shape[2]] = (1 - sigma) * motion + sigma * noise
    return latent


def write_clean(latent: Tensor, clean: Tensor | None) -> Tensor:
    """The latent with its first Tm frames replaced by `clean` (no-op without one)."""
    if clean is None:
        return latent
    latent = latent.clone()
    latent[:, :, : clean.shape[2]] = clean
    return latent


def sample_clip(
    model: MultiTalkTransformer,
    noise: Tensor,
    conditions: ClipConditions,
    settings: GuidanceSettings,
    generator: torch.Generator,
    *,
    on_step: StepCallback | None = None,
    cancel: CancelCheck | None = None,
    sequence_parallel: SequenceParallel | None = None,
    runtime: DiTRuntime = REFERENCE_RUNTIME,
) -> Tensor:
    """Denoise one clip from `noise` [1, 16, T, h, w]; returns the final latent (σ = 0), float32.

    With `sequence_parallel`, every rank of its group calls this with the same arguments (and a `cancel`
    that answers the same on every rank) and gets the same latent. `runtime` picks the DiT's kernels
    (models/runtime.py; the default is the reference path)."""
    schedule = shifted_timesteps(settings.steps, settings.shift).to(noise.device)
    passes = guidance_passes(settings.text_scale)
    motion, clean = conditions.motion_latent, conditions.clean_latent
    latent = noise if motion is None else inject_motion(noise, motion, schedule[0:1], generator)
    apg_buffers: dict[str, Tensor | None] = {}  # APG momentum, per clip
    use_teacache = settings.teacache_threshold is not None
    residuals: dict[str, Tensor] | None = {} if use_teacache else None  # TeaCache state, per clip
    accumulated, previous_e0, compute = 0.0, None, True
    for step in range(settings.steps):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled before step {step + 1} of {settings.steps}")
        timestep = schedule[step : step + 1]
        latent = write_clean(latent, clean)
        if use_teacache:
            e0 = model.time_embed(timestep)[1]
            compute, accumulated = teacache_decision(accumulated, previous_e0, e0, step, settings)
            previous_e0 = e0
        preds = {
            label: predict(
                model, latent, timestep, conditions, label, residuals, compute, sequence_parallel, runtime
            )
            for label in passes
        }
        if settings.apg:
            velocity = apg_combine(preds, settings, apg_buffers)
        else:
            velocity = cfg_combine(preds, settings.text_scale, settings.audio_scale)
        latent = euler_step(latent, velocity, schedule[step], schedule[step + 1])
        if motion is not None:
            latent = inject_motion(latent, motion, schedule[step + 1 : step + 2], generator)
        latent = write_clean(latent, clean)
        if on_step is not None:
            on_step(step + 1)
    return latent
