"""`MultiTalkPipeline`: image + speech + prompt in, uint8 frames and the soundtrack out (spec 6.6).

The clip/streaming loop of the reference: clip 0 covers video frames [0, 81); every later clip starts
56 frames on (81 − 25 motion frames), is conditioned on the last 25 generated frames, and re-renders them.
The video follows the audio: `La − 3` frames for audio of `La` frames (the reference's streaming mode,
at most 1000 frames = 40 s). When `max_duration_s` caps the video at ≤ 81 frames, one clip is made
(the reference's clip mode) and cut to the cap. The pipeline returns arrays; it never writes files.

With a `SequenceParallel` (several processes, one video), every rank of the group calls the pipeline with
the same request: each DiT pass is split over the ranks (pipeline/sampling.py), everything else runs
whole on every rank. What a rank could decide alone, it takes from rank 0: a random seed, cancelling.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from multitalk_worker.errors import Cancelled, DurationTooLong, InvalidInput
from multitalk_worker.models.audio_encoder import audio_features
from multitalk_worker.models.image_encoder import encode_image
from multitalk_worker.models.sequence_parallel import SequenceParallel
from multitalk_worker.models.text_encoder import encode_text
from multitalk_worker.models.vae import vae_decode, vae_encode
from multitalk_worker.pipeline import audio as audio_prep
from multitalk_worker.pipeline import image as image_prep
from multitalk_worker.pipeline.color import match_colors
from multitalk_worker.pipeline.engine import REFERENCE_ENGINE, EngineOptions, prepare_bundle
from multitalk_worker.pipeline.presets import default_shift
from multitalk_worker.pipeline.request import (
    CancelCheck,
    CheckedInputs,
    GenerationRequest,
    GenerationResult,
    Progress,
    ProgressCallback,
)
from multitalk_worker.pipeline.sampling import (
    LATENT_CHANNELS,
    TEACACHE_COEFFICIENTS,
    ClipConditions,
    GuidanceSettings,
    PassInputs,
    guidance_passes,
    initial_noise,
    sample_clip,
)
from multitalk_worker.pipeline.text import DEFAULT_NEGATIVE_PROMPT, tokenize
from multitalk_worker.weights.loader import ModelBundle, load_models

logger = logging.getLogger(__name__)

FPS = 25
FRAMES_PER_CLIP = 81  # F, must be 4n + 1
MOTION_FRAMES = 25  # overlap between consecutive clips
MAX_FRAMES = 1000  # the reference's streaming limit (40 s)
VAE_STRIDE = (4, 8, 8)
MAX_SEED = 99_999_999  # random seeds are drawn from [0, MAX_SEED], as the reference does


@dataclass(frozen=True)
class ClipPlan:
    """Where each clip starts on the 25 fps timeline and how many frames the video keeps.

    `starts` lists only clips with at least one kept frame: when the reference's last clip would be cut
    away entirely (e.g. audio of 82-84 frames: 79-81 output frames, all from clip 0), it is not made.
    The output is identical, since a clip never affects the clips before it. `padded_clip` is the index
    of the reference's last clip, the one that sees reflection-padded audio (None in clip mode).
    """

    starts: tuple[int, ...]
    max_frames: int
    output_frames: int
    padded_clip: int | None

    @property
    def streaming(self) -> bool:
        return self.max_frames > FRAMES_PER_CLIP


def plan_clips(audio_frames: int, max_frames: int) -> ClipPlan:
    """Spec 6.6 frame counting: clip starts advance by F − motion until a clip ends at or beyond
    min(max_frames, La); the output is cut to max_frames, then (streaming) by the last clip's
    reflection padding `end − La + 3` when that clip runs past the audio."""
    if max_frames <= FRAMES_PER_CLIP:  # clip mode: one clip, cut to max_frames
        return ClipPlan(starts=(0,), max_frames=max_frames, output_frames=max_frames, padded_clip=None)
    starts = [0, FRAMES_PER_CLIP - MOTION_FRAMES]
    while starts[-1] + FRAMES_PER_CLIP < min(max_frames, audio_frames):
        starts.append(starts[-1] + FRAMES_PER_CLIP - MOTION_FRAMES)
    generated = FRAMES_PER_CLIP + (len(starts) - 1) * (FRAMES_PER_CLIP - MOTION_FRAMES)
    end = starts[-1] + FRAMES_PER_CLIP
    miss = end - audio_frames + 3 if end >= audio_frames else 0
    output = min(generated, max_frames) - miss
    needed = tuple(s for i, s in enumerate(starts) if i == 0 or s + MOTION_FRAMES < output)
    return ClipPlan(starts=needed, max_frames=max_frames, output_frames=output, padded_clip=len(starts) - 1)


def resolve_max_frames(max_duration_s: float | None, audio_frames: int) -> int:
    """Frames the request allows; DurationTooLong beyond the 1000-frame limit or for longer audio
    without a cap (we do not cut silently)."""
    limit_s = MAX_FRAMES / FPS
    if max_duration_s is None:
        if audio_frames - 3 > MAX_FRAMES:
            raise DurationTooLong(
                f"audio is {audio_frames / FPS:.1f} s; videos are at most {limit_s:g} s. "
                f"Set max_duration_s (<= {limit_s:g}) to make a video of the first part"
            )
        return MAX_FRAMES
    if max_duration_s > limit_s:
        raise DurationTooLong(f"max_duration_s={max_duration_s:g} exceeds the limit of {limit_s:g} s")
    frames = int(max_duration_s * FPS + 1e-6)
    if frames < 1:
        raise InvalidInput(f"max_duration_s={max_duration_s:g} is shorter than one frame (0.04 s)")
    return frames


AUDIO_CONTEXT_S = 1.0  # audio decoded past a capped job's last window: wav2vec2 context at the cut


def audio_budget(max_duration_s: float | None) -> audio_prep.AudioBudget:
    """How much of each track a request can use (docs/api.md, "Cost"). With a cap: up to the end of its
    last planned clip plus the frame windows' reach and AUDIO_CONTEXT_S, so the clip plan is the one the
    whole track gives; without: the streaming limit plus the reflection padding's frames, a longer track
    being refused (resolve_max_frames's rule, made while decoding)."""
    if max_duration_s is None:
        return audio_prep.AudioBudget((MAX_FRAMES + 5) / FPS, cut=False)
    max_frames = resolve_max_frames(max_duration_s, audio_frames=0)  # with a cap, the length is irrelevant
    plan = plan_clips(audio_frames=MAX_FRAMES * 2, max_frames=max_frames)
    end = plan.starts[-1] + FRAMES_PER_CLIP + max(audio_prep.WINDOW_OFFSETS) + 1
    return audio_prep.AudioBudget(end / FPS + AUDIO_CONTEXT_S, cut=True)


def check_params(request: GenerationRequest, *, tiny_model: bool) -> None:
    """Checks of the request's own values (no file is read)."""
    params = request.sampling
    if request.resolution == "tiny" and not tiny_model:
        raise InvalidInput("resolution 'tiny' exists only for the built-in tiny model; use 480p or 720p")
    if params.steps < 1:
        raise InvalidInput(f"steps={params.steps} is not accepted; use 1 or more")
    if not 0.0 <= params.color_correction <= 1.0:
        raise InvalidInput(f"color_correction={params.color_correction} is not accepted; use 0..1")
    if params.teacache_threshold is not None and params.teacache_threshold <= 0:
        raise InvalidInput("teacache_threshold must be > 0 (None turns TeaCache off)")
    if params.shift is not None and params.shift <= 0:
        raise InvalidInput(f"shift={params.shift} is not accepted; use a value > 0")
    if not request.prompt.strip():
        raise InvalidInput("prompt is empty; describe the scene")


def prepare_image_and_masks(request: GenerationRequest) -> tuple[image_prep.ConditionImage, torch.Tensor]:
    """The bucket-sized conditioning image and the [3, h, w] person masks at latent size (CPU)."""
    cond = image_prep.prepare_image(image_prep.load_image(request.image), request.resolution)
    latent_size = (cond.bucket[0] // VAE_STRIDE[1], cond.bucket[1] // VAE_STRIDE[2])
    regions = [speaker.region for speaker in request.speakers]
    boxes = image_prep.person_boxes(regions, *cond.source_size)
    masks = image_prep.person_masks(boxes, cond.source_size, cond.bucket, latent_size)
    image_prep.check_masks_visible(masks, len(regions))
    return cond, masks


def check_inputs(request: GenerationRequest, *, tiny_model: bool) -> CheckedInputs:
    """Every input check of a generation without any model: values, audio files and lengths, duration,
    image, regions. Cheap (bounded decoding only); lets a caller fail before loading weights. The one set
    of checks of the CLI, the worker's jobs and its validate_only."""
    check_params(request, tiny_model=tiny_model)
    paths = [s.audio for s in request.speakers]
    budget = audio_budget(request.max_duration_s)
    prepared = audio_prep.prepare_audio(paths, request.audio_mode, FRAMES_PER_CLIP, budget)
    max_frames = resolve_max_frames(request.max_duration_s, prepared.frames)
    cond, _ = prepare_image_and_masks(request)
    return CheckedInputs(
        track_s=prepared.track_s,
        audio_s=prepared.num_samples / audio_prep.SAMPLE_RATE,
        audio_cut=prepared.cut,
        bucket=cond.bucket,
        source_size=cond.source_size,
        frames=plan_clips(prepared.frames, max_frames).output_frames,
    )


@dataclass(frozen=True)
class _Prepared:
    """Everything computed once per request, before the clip loop."""

    audio: audio_prep.PreparedAudio
    embeddings: list[torch.Tensor]  # per person [La, layers, C] float32 (CPU)
    image: image_prep.ConditionImage
    person_masks: torch.Tensor  # [3, h, w]
    context: torch.Tensor  # [1, Lp, text_dim]
    context_null: torch.Tensor  # [1, Ln, text_dim]
    plan: ClipPlan
    settings: GuidanceSettings
    color_strength: float


class _Timer:
    """Wall time per stage; on CUDA each stage waits for its queued GPU work, so it is counted there."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        self.device = device

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class MultiTalkPipeline:
    """Holds the loaded networks; each call makes one video.

    `sequence_parallel`: split every DiT pass over the processes of its group (one call per rank, same
    request on each); None runs in this process alone.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        sequence_parallel: SequenceParallel | None = None,
        engine: EngineOptions = REFERENCE_ENGINE,
        device: torch.device | None = None,
    ) -> None:
        """`engine` is applied to `bundle` in place (LoRA merge, offload, fp8, compilation, VAE precision).
        `device`: where the networks run; default: where the DiT's weights are (give it with offload)."""
        self.device = device or next(bundle.dit.parameters()).device
        self.offloads = prepare_bundle(bundle, engine, self.device)
        self.bundle = bundle
        self.engine = engine
        self.sequence_parallel = sequence_parallel
        if sequence_parallel is not None:
            try:
                sequence_parallel.check_heads(bundle.dit.config.num_heads)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        sequence_parallel: SequenceParallel | None = None,
        engine: EngineOptions = REFERENCE_ENGINE,
    ) -> MultiTalkPipeline:
        """Load a checkpoint folder, or "tiny" for the built-in random-weight tiny model.

        device: CUDA when available, else CPU. dtype: bfloat16 on CUDA (the reference), float32 on CPU.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        load_to = torch.device("cpu") if engine.offload else device  # offload streams blocks from host memory
        if str(path) == "tiny":
            from multitalk_worker.tiny import build_tiny_bundle

            bundle = build_tiny_bundle(seed=0, device=load_to, dtype=dtype)
        else:
            bundle = load_models(path, device=load_to, dtype=dtype)
        return cls(bundle, sequence_parallel, engine, device)

    @property
    def is_tiny(self) -> bool:
        return self.bundle.config.name == "tiny"

    @torch.inference_mode()
    def __call__(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        timer = _Timer(self.device)
        check_params(request, tiny_model=self.is_tiny)
        seed = request.sampling.seed if request.sampling.seed >= 0 else random.randint(0, MAX_SEED)
        if self.sequence_parallel is not None:  # the ranks must draw the same noise and stop together
            seed = _from_rank0(seed, self.sequence_parallel, self.device)
            cancel = _cancel_of_rank0(cancel, self.sequence_parallel, self.device)
        prepared = self._prepare(request, timer, progress)
        frames = self._generate(prepared, seed, timer, progress, cancel)
        samples = frames.shape[0] * audio_prep.SAMPLE_RATE // FPS
        return GenerationResult(
            frames=frames,
            audio=prepared.audio.soundtrack[:samples],
            sample_rate=audio_prep.SAMPLE_RATE,
            fps=FPS,
            seed=seed,
            timings=timer.seconds,
            resolved=self._resolved(request, prepared, seed),
        )

    def _settings(self, request: GenerationRequest) -> GuidanceSettings:
        params = request.sampling
        resolution = "720p" if request.resolution == "720p" else "480p"
        return GuidanceSettings(
            steps=params.steps,
            shift=params.shift if params.shift is not None else default_shift(request.resolution),
            text_scale=params.text_guidance,
            audio_scale=params.audio_guidance,
            apg=params.apg,
            teacache_threshold=params.teacache_threshold,
            teacache_coefficients=TEACACHE_COEFFICIENTS[resolution],
        )

    def _prepare(
        self, request: GenerationRequest, timer: _Timer, progress: ProgressCallback | None
    ) -> _Prepared:
        steps = request.sampling.steps
        _report(progress, Progress("audio", 0, 0, 0, steps))
        with timer.stage("audio"):  # decode and check every input before the expensive encoders
            paths = [speaker.audio for speaker in request.speakers]
            budget = audio_budget(request.max_duration_s)
            prepared_audio = audio_prep.prepare_audio(paths, request.audio_mode, FRAMES_PER_CLIP, budget)
            max_frames = resolve_max_frames(request.max_duration_s, prepared_audio.frames)
        _report(progress, Progress("image", 0, 0, 0, steps))
        with timer.stage("image"):
            cond_image, masks = prepare_image_and_masks(request)
            masks = masks.to(self.device)
        with timer.stage("audio"):
            embeddings = [self._audio_embedding(track, p) for p, track in enumerate(prepared_audio.tracks, 1)]
        _report(progress, Progress("text", 0, 0, 0, steps))
        with timer.stage("text"):
            context, context_null = self._encode_prompts(request)
        return _Prepared(
            audio=prepared_audio,
            embeddings=embeddings,
            image=cond_image,
            person_masks=masks,
            context=context,
            context_null=context_null,
            plan=plan_clips(prepared_audio.frames, max_frames),
            settings=self._settings(request),
            color_strength=request.sampling.color_correction,
        )

    def _audio_embedding(self, track: np.ndarray, person: int) -> torch.Tensor:
        embedding = audio_features(self.bundle.audio_encoder, self.bundle.feature_extractor, track)
        audio_prep.check_embedding(embedding, person)
        return embedding.cpu()

    def _encode_prompts(self, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor]:
        negative = request.negative_prompt if request.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
        text_len = self.bundle.config.text_encoder.text_len
        ids, mask = tokenize(self.bundle.tokenizer, [request.prompt, negative], max_length=text_len)
        context, context_null = encode_text(self.bundle.text_encoder, ids, mask)
        return context[None].to(self.device), context_null[None].to(self.device)

    def _generate(
        self,
        prepared: _Prepared,
        seed: int,
        timer: _Timer,
        progress: ProgressCallback | None,
        cancel: CancelCheck | None,
    ) -> np.ndarray:
        """The clip loop of spec 6.6; returns uint8 frames [N, H, W, 3]."""
        plan, settings, clips = prepared.plan, prepared.settings, len(prepared.plan.starts)
        generator = torch.Generator(self.device).manual_seed(seed)  # seeded once, drawn in reference order
        embeddings = list(prepared.embeddings)
        reference = prepared.image.pixels[0, :, 0].to(self.device)  # colour reference [3, H, W]
        cond_pixels = prepared.image.pixels.to(self.device)  # [1, 3, Fm, H, W]: the image, then motion frames
        kept: list[np.ndarray] = []
        for index, start in enumerate(plan.starts):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled before clip {index + 1} of {clips}")
            if (
                index == clips - 1 and index > 0
            ):  # the last clip may run past the audio: reflect (6.6 step 10)
                embeddings, _ = audio_prep.reflect_pad(embeddings, start + FRAMES_PER_CLIP)
            noise = initial_noise(generator, self._latent_shape(prepared.image.bucket))
            with timer.stage("condition"):
                windows = audio_prep.clip_windows(embeddings, start, FRAMES_PER_CLIP)
                conditions = self._conditions(prepared, cond_pixels, windows, first=index == 0)
            with timer.stage("sample"):
                latent = sample_clip(
                    self.bundle.dit,
                    noise,
                    conditions,
                    settings,
                    generator,
                    on_step=lambda step, clip=index + 1: _report(
                        progress, Progress("sample", clip, clips, step, settings.steps)
                    ),
                    cancel=cancel,
                    sequence_parallel=self.sequence_parallel,
                    runtime=self.engine.runtime,
                )
            _report(progress, Progress("decode", index + 1, clips, settings.steps, settings.steps))
            with timer.stage("decode"):
                video = vae_decode(self.bundle.vae, latent)[0]  # [3, F, H, W] in [-1, 1]
            with timer.stage("color"):
                video = match_colors(video, reference, prepared.color_strength)
            with timer.stage("frames"):
                kept.append(to_uint8(video if index == 0 else video[:, MOTION_FRAMES:]))
            cond_pixels = video[None, :, -MOTION_FRAMES:].float()
        frames = np.concatenate(kept)[: plan.max_frames][: plan.output_frames]
        assert frames.shape[0] == plan.output_frames, (frames.shape, plan)
        return frames

    def _conditions(
        self, prepared: _Prepared, cond_pixels: torch.Tensor, windows: torch.Tensor, *, first: bool
    ) -> ClipConditions:
        """Spec 3.3-3.4 for one clip: CLIP tokens of the last known frame, VAE latent of the known frames
        followed by grey, the known-frame mask, the motion latent, and the inputs of each guidance pass."""
        dtype = self.bundle.dit.dtype
        known, (height, width) = cond_pixels.shape[2], prepared.image.bucket
        grey = torch.zeros(1, 3, FRAMES_PER_CLIP - known, height, width, device=self.device)
        y_latent = vae_encode(self.bundle.vae, torch.cat([cond_pixels, grey], dim=2)).to(
            dtype
        )  # [1,16,T,h,w]
        clip_fea = encode_image(self.bundle.image_encoder, cond_pixels[:, :, -1]).to(dtype)
        mask = known_frames_mask(known, y_latent.shape[-2:]).to(device=self.device, dtype=dtype)
        audio = windows[None].to(self.device)  # [1, P, F, 5, layers, C]
        silent = torch.zeros_like(audio[:, -1:])  # the "no audio" branch: one all-zero person (5.9)
        inputs = {
            "cond": PassInputs(prepared.context, audio),
            "drop_text": PassInputs(prepared.context_null, audio),
            "uncond": PassInputs(prepared.context_null, silent),
            "drop_audio": PassInputs(prepared.context, silent),
        }
        motion_latents = 1 + (known - 1) // VAE_STRIDE[0]
        return ClipConditions(
            passes={label: inputs[label] for label in guidance_passes(prepared.settings.text_scale)},
            clip_fea=clip_fea,
            y=torch.cat([mask, y_latent], dim=1),
            person_masks=prepared.person_masks,
            motion_latent=None if first else y_latent[:, :, :motion_latents].float(),
        )

    def _latent_shape(self, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
        frames = (FRAMES_PER_CLIP - 1) // VAE_STRIDE[0] + 1
        return LATENT_CHANNELS, frames, bucket[0] // VAE_STRIDE[1], bucket[1] // VAE_STRIDE[2]

    def _resolved(self, request: GenerationRequest, prepared: _Prepared, seed: int) -> dict[str, object]:
        settings, plan = prepared.settings, prepared.plan
        return {
            "model": self.bundle.config.name,
            "resolution": request.resolution,
            "bucket": list(prepared.image.bucket),
            "persons": len(request.speakers),
            "audio_mode": request.audio_mode,
            "audio_s": prepared.audio.num_samples / audio_prep.SAMPLE_RATE,
            "audio_padded_s": prepared.audio.padded_s,
            "mode": "streaming" if plan.streaming else "clip",
            "max_frames": plan.max_frames,
            "clips": len(plan.starts),
            "frames": plan.output_frames,
            "steps": settings.steps,
            "shift": settings.shift,
            "text_guidance": settings.text_scale,
            "audio_guidance": settings.audio_scale,
            "passes_per_step": len(guidance_passes(settings.text_scale)),
            "apg": settings.apg,
            "teacache_threshold": settings.teacache_threshold,
            "color_correction": prepared.color_strength,
            "negative_prompt": "default" if request.negative_prompt is None else "custom",
            "seed": seed,
        }


def known_frames_mask(known: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Spec 3.4 step 3: ones on the first `known` of F frames, frame 0 repeated 4 times, folded into
    4 channels -> [1, 4, T, h, w] float32."""
    mask = torch.ones(1, FRAMES_PER_CLIP, *latent_hw)
    mask[:, known:] = 0
    mask = torch.cat([mask[:, :1].repeat_interleave(VAE_STRIDE[0], dim=1), mask[:, 1:]], dim=1)
    return mask.view(1, mask.shape[1] // VAE_STRIDE[0], VAE_STRIDE[0], *latent_hw).transpose(1, 2)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, N, H, W] in [-1, 1] -> uint8 [N, H, W, 3] with the reference's truncating cast (spec 7).

    Computed where `video` is (the reference does the same float32 steps in numpy), so only uint8 crosses
    to the host."""
    unit = ((video.float() + 1) / 2) * 255
    return unit.clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def _from_rank0(value: int, parallel: SequenceParallel, device: torch.device) -> int:
    """Rank 0's `value` on every rank of the group (one broadcast of an int64)."""
    shared = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(shared, group=parallel.group, group_src=0)
    return int(shared.item())


def _cancel_of_rank0(
    cancel: CancelCheck | None, parallel: SequenceParallel, device: torch.device
) -> CancelCheck:
    """A cancel check that every rank calls at the same points and that answers rank 0's `cancel` on all
    of them (a rank stopping alone would leave the others waiting in a collective)."""

    def check() -> bool:
        asked = parallel.rank == 0 and cancel is not None and cancel()
        return bool(_from_rank0(int(asked), parallel, device))

    return check


def _report(progress: ProgressCallback | None, event: Progress) -> None:
    if progress is not None:
        progress(event)
