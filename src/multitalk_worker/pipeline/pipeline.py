"""`TalkingVideoPipeline`: speech + a prompt + an image or a video in, uint8 frames and the soundtrack out.

One clip loop serves every model of the registry (spec MT 6.6, IT 5): clip k covers frames
[k(F − M), k(F − M) + F) of the 25 fps timeline, is conditioned by the model's `ClipConditioner`
(pipeline/conditioning.py), sampled, decoded and colour-corrected; clip 0 keeps all its frames, every later
clip drops the M frames it re-rendered. The plan (pipeline/plan.py) says how many clips and frames. Each
clip's final frames go to a `FrameSink` as soon as they are final (the CLI and the worker encode them into
the mp4 as they arrive), so memory does not grow with the video's length; without a sink they are
collected and returned. The pipeline never writes files.

With a `SequenceParallel` (several processes, one video), every rank of the group calls the pipeline with
the same request: each DiT pass is split over the ranks (pipeline/sampling.py), everything else runs
whole on every rank. What a rank could decide alone, it takes from rank 0: a random seed, cancelling.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from multitalk_worker.errors import Cancelled, InvalidInput
from multitalk_worker.models.audio_encoder import audio_features
from multitalk_worker.models.sequence_parallel import SequenceParallel
from multitalk_worker.models.text_encoder import encode_text
from multitalk_worker.models.vae import vae_decode
from multitalk_worker.pipeline import audio as audio_prep
from multitalk_worker.pipeline.checkpoint import ClipCheckpoint, ClipState, LoopStart
from multitalk_worker.pipeline.color import match_colors
from multitalk_worker.pipeline.conditioning import (
    CONDITIONERS,
    ClipConditioner,
    ClipInputs,
    Encoders,
    RequestInputs,
    SharedInputs,
)
from multitalk_worker.pipeline.engine import REFERENCE_ENGINE, EngineOptions, prepare_bundle, resolve_engine
from multitalk_worker.pipeline.inputs import PreparedInputs, check_inputs, check_params, prepare_inputs
from multitalk_worker.pipeline.presets import default_shift
from multitalk_worker.pipeline.request import (
    CancelCheck,
    CheckedInputs,
    FrameSink,
    GenerationRequest,
    GenerationResult,
    ProgressCallback,
    VideoSpec,
)
from multitalk_worker.pipeline.sampling import (
    LATENT_CHANNELS,
    TEACACHE_COEFFICIENTS,
    GuidanceSettings,
    initial_noise,
    sample_clip,
)
from multitalk_worker.pipeline.text import DEFAULT_NEGATIVE_PROMPT, tokenize
from multitalk_worker.progress import Progress
from multitalk_worker.registry import get_model
from multitalk_worker.timeline import FPS, FRAMES_PER_CLIP, LATENT_FRAMES, SAMPLE_RATE, VAE_STRIDE
from multitalk_worker.weights.adapters import apply_adapter_state
from multitalk_worker.weights.loader import ModelBundle, load_models

logger = logging.getLogger(__name__)

MAX_SEED = 99_999_999  # random seeds are drawn from [0, MAX_SEED], as the reference does


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


class FrameCollector:
    """A sink that keeps every frame in memory (the result's `frames` when no sink is given)."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def open(self, spec: VideoSpec) -> None:
        self.chunks = []

    def write(self, frames: np.ndarray) -> None:
        self.chunks.append(frames)

    def frames(self) -> np.ndarray:
        return np.concatenate(self.chunks)


class DiscardFrames:
    """A sink that keeps nothing: the ranks after the first of a sequence-parallel group make the same video
    and leave its frames to rank 0."""

    def open(self, spec: VideoSpec) -> None:
        pass

    def write(self, frames: np.ndarray) -> None:
        pass


@dataclass(frozen=True)
class _Run:
    """What one call computes before its clip loop."""

    inputs: PreparedInputs
    embeddings: list[torch.Tensor]  # per person [La, layers, C] float32 (CPU)
    conditioner: ClipConditioner
    settings: GuidanceSettings
    color_strength: float


class TalkingVideoPipeline:
    """Holds the loaded networks of one model (the bundle's); each call makes one video.

    `sequence_parallel`: split every DiT pass over the processes of its group (one call per rank, same
    request on each); None runs in this process alone.
    """

    resumable = True  # a checkpoint after every clip (pipeline/checkpoint.py)

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
        engine = resolve_engine(engine, self.device)  # attention backends: probed once, here
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
        model: str = "multitalk",
        adapter: str | None = None,
    ) -> TalkingVideoPipeline:
        """Load a checkpoint folder, or "tiny" for the built-in random-weight tiny model, with `model`'s
        `adapter` (default: its first; registry.py).

        device: CUDA when available, else CPU. dtype: bfloat16 on CUDA (the reference), float32 on CPU.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        load_to = torch.device("cpu") if engine.offload else device  # offload streams blocks from host memory
        if str(path) == "tiny":
            from multitalk_worker.tiny import build_tiny_bundle

            bundle = build_tiny_bundle(seed=0, device=load_to, dtype=dtype, model=model, adapter=adapter)
        else:
            bundle = load_models(path, device=load_to, dtype=dtype, model=model, adapter=adapter)
        return cls(bundle, sequence_parallel, engine, device)

    @property
    def is_tiny(self) -> bool:
        return self.bundle.config.name == "tiny"

    @staticmethod
    def check_inputs(request: GenerationRequest, *, tiny_model: bool) -> CheckedInputs:
        """Every input check of `request` without any model (the registry's entry point for a door)."""
        return check_inputs(request, tiny_model=tiny_model)

    @staticmethod
    def prepare_inputs(request: GenerationRequest, *, tiny_model: bool) -> PreparedInputs:
        """`request`'s inputs decoded and checked, for `__call__(inputs=...)`."""
        return prepare_inputs(request, tiny_model=tiny_model)

    @torch.inference_mode()
    def __call__(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        sink: FrameSink | None = None,
        inputs: PreparedInputs | None = None,
        checkpoint: ClipCheckpoint | None = None,
    ) -> GenerationResult:
        """Make the video of `request`; frames go to `sink` as each clip is final (default: returned).
        `inputs`: `prepare_inputs(request)` already done by the caller (it is closed here).
        `checkpoint`: continue after its last finished clip when it has one for this job, and save one after
        every clip; the frames then go to its segments (`checkpoint.sink`), not to `sink`."""
        timer = _Timer(self.device)
        check_params(request, tiny_model=self.is_tiny)
        self._check_model(request)
        resumed = checkpoint.open() if checkpoint is not None else None
        state = resumed.state if resumed is not None else None
        seed = request.sampling.seed if request.sampling.seed >= 0 else random.randint(0, MAX_SEED)
        seed = state.seed if state is not None else seed  # a drawn seed is kept across resumes
        if self.sequence_parallel is not None:  # the ranks must draw the same noise and stop together
            seed = _from_rank0(seed, self.sequence_parallel, self.device)
            cancel = _cancel_of_rank0(cancel, self.sequence_parallel, self.device)
        if checkpoint is not None:
            sink = checkpoint.sink
        collector = FrameCollector() if sink is None else None
        try:
            if inputs is None:
                _report(progress, Progress("audio", 0, 0, 0, request.sampling.steps))
                with timer.stage("audio"):  # decode and check every input before the expensive encoders
                    inputs = prepare_inputs(request, tiny_model=self.is_tiny)
            run = self._prepare(request, inputs, timer, progress)
            soundtrack = inputs.audio.soundtrack[: inputs.plan.output_frames * SAMPLE_RATE // FPS]
            height, width = inputs.first.bucket
            frame_count, clips = inputs.plan.output_frames, len(inputs.plan.starts)
            out = sink or collector
            assert out is not None
            out.open(VideoSpec(width, height, inputs.plan.output_frames, FPS, soundtrack, SAMPLE_RATE))
            loop = LoopStart(seed, state, checkpoint if self._saves else None)
            self._generate(run, loop, timer, progress, cancel, out)
        finally:
            if inputs is not None:
                inputs.close()
        resumed_clips = state.clips_done if state is not None else 0
        return GenerationResult(
            frames=None if collector is None else collector.frames(),
            frame_count=frame_count,
            size=(height, width),
            audio=soundtrack,
            sample_rate=SAMPLE_RATE,
            fps=FPS,
            seed=seed,
            timings=timer.seconds,
            resolved=self._resolved(request, run, seed),
            clips_generated=clips - resumed_clips,
            clips_resumed=resumed_clips,
            resume_reason=None if resumed is None else resumed.reason,
        )

    @property
    def _saves(self) -> bool:
        """Rank 0 alone writes checkpoints (every rank reads the same folder to resume)."""
        return self.sequence_parallel is None or self.sequence_parallel.rank == 0

    @torch.no_grad()
    def use_adapter(self, model: str, adapter: str, state: Mapping[str, torch.Tensor]) -> float:
        """Serve `model` with `adapter` from now on: copy its tensors `state` (residency.py) into the DiT's
        audio parameters in place (no rebuild; compiled blocks keep their graphs; offloaded blocks get
        their host copies written). Returns the seconds the copy took (on CUDA, until it is done)."""
        get_model(model).adapter(adapter)  # a name the registry knows for this model
        start = time.perf_counter()
        apply_adapter_state(self.bundle.dit, state)
        for offload in self.offloads:
            offload.sync_host()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.bundle = replace(self.bundle, model=model, adapter=adapter)
        return time.perf_counter() - start

    def _check_model(self, request: GenerationRequest) -> None:
        """The request must ask for the loaded model (and adapter, when it names one)."""
        if request.model != self.bundle.model:
            raise InvalidInput(
                f"this pipeline serves model {self.bundle.model}; the request asks for {request.model}"
            )
        if request.adapter is not None and request.adapter != self.bundle.adapter:
            raise InvalidInput(
                f"this pipeline has adapter {self.bundle.adapter} loaded; the request asks for "
                f"{request.adapter}"
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
        self,
        request: GenerationRequest,
        inputs: PreparedInputs,
        timer: _Timer,
        progress: ProgressCallback | None,
    ) -> _Run:
        steps = request.sampling.steps
        with timer.stage("audio"):
            embeddings = [self._audio_embedding(track, p) for p, track in enumerate(inputs.audio.tracks, 1)]
        _report(progress, Progress("text", 0, 0, 0, steps))
        with timer.stage("text"):
            context, context_null = self._encode_prompts(request)
        settings = self._settings(request)
        shared = SharedInputs(context, context_null, inputs.person_masks.to(self.device), settings.text_scale)
        return _Run(
            inputs=inputs,
            embeddings=embeddings,
            conditioner=self._conditioner(request, inputs, shared),
            settings=settings,
            color_strength=request.sampling.color_correction,
        )

    def _conditioner(
        self, request: GenerationRequest, inputs: PreparedInputs, shared: SharedInputs
    ) -> ClipConditioner:
        encoders = Encoders(self.bundle.vae, self.bundle.image_encoder, self.bundle.dit.dtype, self.device)
        return CONDITIONERS[inputs.spec.name](
            RequestInputs(
                first=inputs.first.pixels.to(self.device),
                source=inputs.source,
                resolution=request.resolution,
                encoders=encoders,
                shared=shared,
                motion_frames=inputs.spec.motion_frames,
                color=request.color_reference,
            )
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
        run: _Run,
        loop: LoopStart,
        timer: _Timer,
        progress: ProgressCallback | None,
        cancel: CancelCheck | None,
        sink: FrameSink,
    ) -> None:
        """The clip loop (spec MT 6.6, IT 5.2-5.6); each clip's kept frames go to `sink`; after each clip
        the loop's state goes to the checkpoint, and a resumed loop starts from the saved one."""
        plan, settings, clips = run.inputs.plan, run.settings, len(run.inputs.plan.starts)
        generator = torch.Generator(self.device).manual_seed(
            loop.seed
        )  # seeded once, drawn in reference order
        embeddings = list(run.embeddings)
        previous: torch.Tensor | None = None
        first_clip = 0
        if loop.state is not None:  # the clips before were made by an earlier run of this job
            generator.set_state(loop.state.rng)
            previous = None if loop.state.motion is None else loop.state.motion.to(self.device)
            run.conditioner.restore(loop.state.conditioner)
            first_clip = loop.state.clips_done
            _report(progress, Progress("resume", first_clip, clips, 0, settings.steps))
        for index, start in enumerate(plan.starts):
            if index < first_clip:
                continue
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled before clip {index + 1} of {clips}")
            if index == clips - 1 and index > 0:  # the last clip may run past the audio: reflect (MT 6.6)
                embeddings, _ = audio_prep.reflect_pad(embeddings, start + FRAMES_PER_CLIP)
            noise = initial_noise(generator, self._latent_shape(run.inputs.first.bucket))
            _report(progress, Progress("condition", index + 1, clips, 0, settings.steps))
            with timer.stage("condition"):
                windows = audio_prep.clip_windows(embeddings, start, FRAMES_PER_CLIP)
                clip = ClipInputs(index, start, windows[None].to(self.device), previous)
                conditions = run.conditioner.conditions(clip)
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
                video = match_colors(video, run.conditioner.color_reference(clip), run.color_strength)
            with timer.stage("frames"):
                first, last = plan.kept(index)
                sink.write(to_uint8(video[:, first:last]))
            previous = video
            if loop.checkpoint is not None:  # after the last clip too: a retry then only assembles
                with timer.stage("checkpoint"):
                    motion = video[:, -run.conditioner.motion_frames :].clone()
                    state = ClipState(index + 1, loop.seed, generator.get_state(), motion)
                    loop.checkpoint.save(replace(state, conditioner=run.conditioner.state()))

    def _latent_shape(self, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
        return LATENT_CHANNELS, LATENT_FRAMES, bucket[0] // VAE_STRIDE[1], bucket[1] // VAE_STRIDE[2]

    def _resolved(self, request: GenerationRequest, run: _Run, seed: int) -> dict[str, object]:
        """The inputs' report (PreparedInputs.report) with what the run learned: the adapter and weights
        loaded, and the seed (drawn when the request named none)."""
        report = run.inputs.report(request)
        return report | {"adapter": self.bundle.adapter, "weights": self.bundle.config.name, "seed": seed}


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
