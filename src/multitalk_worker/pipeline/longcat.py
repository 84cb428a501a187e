"""`LongCatPipeline`: LongCat-Video-Avatar (1.5 and 1.0) speech + a prompt + an image or a video in, uint8
frames and the soundtrack out (spec longcat-avatar-inference.md §4-§8).

The video is made segment by segment (pipeline/longcat_segments.py): segment 0 is ai2v (the image's latent
clean at latent 0), segment k >= 1 a continuation: the previous segment's last 13 output frames, after the
uint8 round trip, are VAE-encoded as its 4 clean latents, the first segment's latent 0 is prepended as the
reference latent, one cache pass on those 5 clean latents gives every block's keys and values, and the 20
noisy latents are denoised against them (§7.6). A video source makes segment 0 a continuation of the
video's last 13 frames (the video's first frame is the reference); its output is the new frames only.

Each segment's kept frames go to the `FrameSink` as soon as they are decoded; only the last 13 uint8
frames (and, for 1.0, the last 4 latents) are carried to the next segment, so memory does not grow with the
video. With a checkpoint (pipeline/checkpoint.py) that carried state, the reference latent and the RNG
state are saved after every segment, and a job sent again continues after its last saved segment. One
generator is seeded once and drawn in the reference's order (§7.5). Guidance runs the passes of
pipeline/longcat_sampling.py one at a time (the reference batches u_t and c for one speaker: same values
within the batched GEMMs' rounding, §7.3; `batched_guidance` batches them as the reference does).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from multitalk_worker.errors import Cancelled, InvalidInput, ModelMissing
from multitalk_worker.models.longcat.attention import Conditioning, KVCache
from multitalk_worker.models.longcat.transformer import LongCatAvatarTransformer
from multitalk_worker.models.offload import BlockOffload
from multitalk_worker.models.runtime import compile_blocks
from multitalk_worker.models.sequence_parallel import SequenceParallel
from multitalk_worker.models.vae import vae_decode, vae_encode
from multitalk_worker.pipeline import longcat_sampling as ls
from multitalk_worker.pipeline.checkpoint import ClipCheckpoint, ClipState, LoopStart
from multitalk_worker.pipeline.engine import (
    REFERENCE_ENGINE,
    EngineOptions,
    offload_stacks,
    quantize_dit_fp8,
    resolve_engine,
)
from multitalk_worker.pipeline.inputs import check_resolution
from multitalk_worker.pipeline.longcat_audio import (
    FeatureEncoder,
    LongCatAudioConfig,
    null_windows,
    stream_tracks,
    track_features,
)
from multitalk_worker.pipeline.longcat_inputs import LongCatInputs, prepare_longcat_inputs, resolve_sampling
from multitalk_worker.pipeline.longcat_segments import (
    COND_FRAMES,
    COND_LATENTS,
    SEGMENT_LATENTS,
    Segment,
    segment_windows,
)
from multitalk_worker.pipeline.pipeline import FrameCollector, to_uint8
from multitalk_worker.pipeline.request import (
    CancelCheck,
    CheckedInputs,
    FrameSink,
    GenerationRequest,
    GenerationResult,
    Progress,
    ProgressCallback,
    VideoSpec,
)
from multitalk_worker.pipeline.text import tokenize
from multitalk_worker.pipeline.vocals import VOCAL_DIR, VOCAL_MODEL, VocalSeparator, separated_vocals
from multitalk_worker.registry import LongCatFamily, get_model
from multitalk_worker.timeline import SAMPLE_RATE
from multitalk_worker.weights.longcat_lora import LORA_FILE, LoraSwitch

if TYPE_CHECKING:
    from torch import nn

    from multitalk_worker.weights.longcat_bundle import DiTSlot

logger = logging.getLogger(__name__)

MAX_SEED = 99_999_999
NOISE_SEED = 0  # v1.0's noise floor: the reference draws it from NumPy's unseeded global RNG; ours is fixed


@dataclass(frozen=True)
class LongCatBundle:
    """Every network of one LongCat-Video-Avatar version, ready for inference."""

    dit: LongCatAvatarTransformer
    text_encoder: UMT5EncoderModel
    tokenizer: PreTrainedTokenizerBase
    vae: AutoencoderKLWan
    audio: FeatureEncoder  # a prepared 16 kHz track -> [frames, groups, C] float32
    audio_config: LongCatAudioConfig
    model: str  # registry name
    weights: str  # "tiny" or the folder
    adapter: None = None  # LongCat has no audio adapters (the doors report a model's adapter)
    vocals: VocalSeparator | None = None  # vocal_separator/ of the model folder, when it is there
    lora: LoraSwitch | None = None  # 1.5's DMD LoRA, attached to `dit`, on for distilled jobs only
    dit_slot: DiTSlot | None = None  # a folder-loaded model: which DiT folder `dit` holds (1.0 swaps)
    audio_encoder: nn.Module | None = None  # the network behind `audio`


@dataclass(frozen=True)
class _Text:
    positive: tuple[Tensor, Tensor]  # [1, Lt, C], mask [1, Lt]
    negative: tuple[Tensor, Tensor] | None  # only when guidance is on


@dataclass(frozen=True)
class _Segment:
    """What one segment's sampling needs besides its latent."""

    windows: Tensor  # [P, 93, 5, groups, C]
    cond: Conditioning
    cache: list[KVCache] | None
    masks: Tensor | None
    clean: int  # leading latents kept clean (ai2v: 1)


class LongCatPipeline:
    """Holds the loaded networks of one LongCat version; each call makes one video."""

    resumable = True  # a checkpoint after every segment (pipeline/checkpoint.py)

    def __init__(
        self,
        bundle: LongCatBundle,
        device: torch.device | None = None,
        engine: EngineOptions = REFERENCE_ENGINE,
        batched_guidance: bool = False,
    ) -> None:
        """`engine`: resolved (pipeline/engine.resolve_engine) and already applied to `bundle.dit`
        (`from_pretrained` does both); its runtime is what every DiT call runs with.
        `batched_guidance`: one speaker's `u_t` and `c` passes as one batch-2 DiT call, as the reference
        runs them (§7.3); off, they run one at a time (half the activation memory, the same values within
        the batched GEMMs' rounding: float32 rel 5e-7 on the tiny model, tools/parity.py)."""
        self.bundle = bundle
        self.device = device or next(bundle.dit.parameters()).device
        self.batched_guidance = batched_guidance
        self.family: LongCatFamily = _family(bundle.model)
        self.engine = engine
        self.offloads: list[BlockOffload] = []  # the low-memory mode's streamed stacks (DiT first)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        model: str = "longcat-avatar",
        *,
        engine: EngineOptions = REFERENCE_ENGINE,
        sequence_parallel: SequenceParallel | None = None,
        adapter: str | None = None,
    ) -> LongCatPipeline:
        """ "tiny" for the built-in random-weight model, else the published model folder K (with the base
        LongCat-Video/ folder beside it: weights/longcat_bundle.py). `engine`: the DiT's attention kernels,
        compiled blocks, the fp8 tier (bench/RESULTS.md run O) and the low-memory mode (the DiT's and
        umT5's blocks in host memory, one at a time on the GPU: the networks are loaded on the CPU first);
        extra LoRAs and a split over several GPUs are Wan's only so far and refused here."""
        if sequence_parallel is not None and sequence_parallel.world_size > 1:
            raise InvalidInput(f"{model} runs on one GPU; sequence parallelism serves the Wan models only")
        if engine.loras:
            raise InvalidInput(
                f"{model}: extra LoRAs (MULTITALK_LORAS) serve the Wan models only so far; unset them for "
                "LongCat-Video-Avatar"
            )
        if adapter is not None:
            raise InvalidInput(f"{model} has no audio adapters; got adapter {adapter!r}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        engine = resolve_engine(engine, device)
        load_on = torch.device("cpu") if engine.offload else device
        if str(path) == "tiny":
            from multitalk_worker.tiny_longcat import build_tiny_longcat_bundle

            bundle = build_tiny_longcat_bundle(model, seed=0, device=load_on, dtype=dtype)
        else:
            from multitalk_worker.weights.longcat_bundle import load_longcat_bundle

            bundle = load_longcat_bundle(Path(path), model=model, device=load_on, dtype=dtype)
        offloads = []
        if engine.offload:
            stacks = [
                (bundle.dit, bundle.dit.blocks),
                (bundle.text_encoder, bundle.text_encoder.encoder.block),
            ]
            others = [cast(nn.Module, bundle.vae)] + ([bundle.audio_encoder] if bundle.audio_encoder else [])
            offloads = offload_stacks(stacks, others, device)
        if engine.fp8:
            quantize_dit_fp8(bundle.dit)  # the LoRA branches stay: they read the layers' inputs
        if engine.compile:
            compile_blocks(bundle.dit)
        pipeline = cls(bundle, device, engine)
        pipeline.offloads = offloads
        return pipeline

    @property
    def is_tiny(self) -> bool:
        """The built-in tiny model, or a folder holding a DiT of its sizes (resolution `tiny` allowed)."""
        from multitalk_worker.tiny_longcat import TINY_DIT

        config, sizes = self.bundle.dit.config, TINY_DIT[self.bundle.model]
        tiny_sizes = all(getattr(config, k) == sizes[k] for k in ("hidden_size", "depth", "num_heads"))
        return self.bundle.weights == "tiny" or tiny_sizes

    @staticmethod
    def check_inputs(request: GenerationRequest, *, tiny_model: bool) -> CheckedInputs:
        """Every input check of `request` without any model."""
        check_resolution(request, tiny_model=tiny_model)
        return prepare_longcat_inputs(request).checked()

    @staticmethod
    def prepare_inputs(request: GenerationRequest, *, tiny_model: bool) -> LongCatInputs:
        """`request`'s inputs decoded and checked, for `__call__(inputs=...)`."""
        check_resolution(request, tiny_model=tiny_model)
        return prepare_longcat_inputs(request)

    @torch.inference_mode()
    def __call__(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        sink: FrameSink | None = None,
        inputs: LongCatInputs | None = None,
        checkpoint: ClipCheckpoint | None = None,
    ) -> GenerationResult:
        if request.model != self.bundle.model:
            raise InvalidInput(
                f"this pipeline serves model {self.bundle.model}; the request asks for {request.model}"
            )
        check_resolution(request, tiny_model=self.is_tiny)
        timings: dict[str, float] = {}
        resumed = checkpoint.open() if checkpoint is not None else None
        state = resumed.state if resumed is not None else None
        seed = request.sampling.seed if request.sampling.seed >= 0 else random.randint(0, MAX_SEED)
        seed = state.seed if state is not None else seed  # a drawn seed is kept across resumes
        if checkpoint is not None:
            sink = checkpoint.sink
        with _stage(timings, "audio"):
            inputs = inputs or prepare_longcat_inputs(request)
        collector = FrameCollector() if sink is None else None
        out = sink or collector
        assert out is not None
        height, width = inputs.first.bucket
        fps = get_model(self.bundle.model).fps
        out.open(VideoSpec(width, height, inputs.plan.output_frames, fps, inputs.soundtrack, SAMPLE_RATE))
        chosen = resolve_sampling(request, inputs.spec)
        steps, mode, shift = chosen.steps, chosen.mode, chosen.shift
        self._prepare_dit(len(request.speakers), distilled=mode == "distill", timings=timings)
        text_scale, audio_scale = chosen.text_scale, chosen.audio_scale
        with _stage(timings, "audio"):
            features = self._features(inputs, request)
        with _stage(timings, "text"):
            text = self._text(request, ls.guidance_on(text_scale, audio_scale))
        run = _Run(
            self, inputs, features, text, steps, mode, shift, text_scale, audio_scale, progress, cancel
        )
        loop = LoopStart(seed, state, checkpoint)
        run.generate(torch.Generator(self.device).manual_seed(seed), out, timings, loop)
        segments, done = len(inputs.plan.segments), state.clips_done if state is not None else 0
        return GenerationResult(
            frames=None if collector is None else collector.frames(),
            frame_count=inputs.plan.output_frames,
            size=inputs.first.bucket,
            audio=inputs.soundtrack,
            sample_rate=SAMPLE_RATE,
            fps=fps,
            seed=seed,
            timings=timings,
            resolved=inputs.report(request) | {"weights": self.bundle.weights, "seed": seed},
            clips_generated=segments - done,
            clips_resumed=done,
            resume_reason=None if resumed is None else resumed.reason,
        )

    def _prepare_dit(self, persons: int, *, distilled: bool, timings: dict[str, float]) -> None:
        """The DiT for this job: 1.0's folder for its speaker count (weights/longcat_bundle.DiTSlot), and
        1.5's DMD LoRA on for the distilled schedule, off otherwise (the reference applies it with
        --use_distill only, spec §2.7)."""
        slot, lora = self.bundle.dit_slot, self.bundle.lora
        if slot is not None:
            folder = self.family.multi_dit_folder if persons > 1 else self.family.dit_folder
            seconds = slot.use(self.bundle.dit, folder)
            if seconds:
                timings["dit_swap"] = seconds
                for offload in self.offloads:  # a block still on the device was written there
                    offload.sync_host()
        if distilled and lora is None:
            # The reference silently skips a missing LoRA file and samples the 8-step schedule with the
            # base DiT; that makes a video the distilled preset does not describe, so we refuse.
            raise ModelMissing(
                f"the distilled schedule (8 steps, no guidance) needs the DMD LoRA "
                f"{Path(self.bundle.weights) / LORA_FILE}, which is missing; add it "
                "(part of the published model folder) or use the longcat-1.5 preset (50 steps, guided)"
            )
        if lora is not None:
            lora.enabled = distilled

    def _features(self, inputs: LongCatInputs, request: GenerationRequest) -> list[Tensor]:
        """Each stream's features; with vocal separation (the reference's first stage, spec §4.1) the streams
        are made of the separated vocals of each speaker's file (the soundtrack stays the audio as sent)."""
        streams = inputs.streams
        if request.vocal_separation is True and self.bundle.vocals is None:
            raise ModelMissing(
                f"vocal separation was asked for; the {self.bundle.weights} model has no "
                f"{VOCAL_DIR}/{VOCAL_MODEL} (set vocal_separation false to drive the model with the audio "
                "as sent)"
            )
        if request.vocal_separation is not False and self.bundle.vocals is not None:
            vocals = [separated_vocals(Path(s.audio), self.bundle.vocals) for s in request.speakers]
            streams = tuple(
                stream_tracks([v for v in vocals if v is not None], request.audio_mode, others=False)
            )
        segments = len(inputs.plan.segments)
        noise = np.random.RandomState(NOISE_SEED)
        return [
            track_features(stream, segments, self.bundle.audio_config, self.bundle.audio, noise)
            for stream in streams
        ]

    def _text(self, request: GenerationRequest, guided: bool) -> _Text:
        """umT5 of the prompt (and of the negative prompt when guidance is on), padded to the DiT's length
        with the mask (§5)."""
        prompts = [request.prompt]
        if guided:
            default = self.family.default_negative(len(request.speakers))
            prompts.append(request.negative_prompt if request.negative_prompt is not None else default)
        length = self.bundle.dit.config.model_max_length
        ids, mask = tokenize(self.bundle.tokenizer, prompts, max_length=length)
        device = self.bundle.text_encoder.get_input_embeddings().weight.device
        hidden = self.bundle.text_encoder(
            input_ids=ids.to(device), attention_mask=mask.to(device)
        ).last_hidden_state
        hidden, mask = hidden.to(self.device), mask.to(self.device)
        positive = (hidden[:1], mask[:1])
        return _Text(positive, (hidden[1:], mask[1:]) if guided else None)


class _Run:
    """One call's segment loop; state lives here, not on the pipeline."""

    def __init__(
        self,
        pipe: LongCatPipeline,
        inputs: LongCatInputs,
        features: list[Tensor],
        text: _Text,
        steps: int,
        mode: ls.ScheduleMode,
        shift: float,
        text_scale: float,
        audio_scale: float,
        progress: ProgressCallback | None,
        cancel: CancelCheck | None,
    ) -> None:
        self.pipe, self.inputs, self.features, self.text = pipe, inputs, features, text
        self.steps, self.shift = steps, shift
        self.mode: ls.ScheduleMode = mode
        self.text_scale, self.audio_scale = text_scale, audio_scale
        self.progress, self.cancel = progress, cancel
        self.dit, self.vae, self.device = pipe.bundle.dit, pipe.bundle.vae, pipe.device
        self.runtime = pipe.engine.runtime
        height, width = inputs.first.bucket
        self.latent_shape = (ls.LATENT_CHANNELS, SEGMENT_LATENTS, height // 8, width // 8)

    def generate(
        self, generator: torch.Generator, sink: FrameSink, timings: dict[str, float], loop: LoopStart
    ) -> None:
        """The segment loop; after each segment, what the next one needs goes to `loop.checkpoint`, and a
        resumed loop (`loop.state`) starts after its last saved segment."""
        plan = self.inputs.plan
        count = len(plan.segments)
        reference: Tensor | None = None  # [1, 16, 1, h, w] float32: the first segment's latent 0
        carried: Tensor | None = (
            None  # [1, 3, 13, H, W] in [-1, 1]: the last frames after the uint8 round trip
        )
        tail: Tensor | None = None  # v1.0: the previous returned latent's last 4 latents
        done = 0
        if loop.state is not None:  # the segments before were made by an earlier run of this job
            generator.set_state(loop.state.rng)
            saved = {key: value.to(self.device) for key, value in loop.state.conditioner.items()}
            reference, tail = saved["reference"], saved.get("tail")
            carried = None if loop.state.motion is None else loop.state.motion.to(self.device)
            done = loop.state.clips_done
            if self.progress is not None:
                self.progress(Progress("resume", done, count, 0, self.steps))
        elif self.inputs.source_frames is not None:  # a video source: continue it
            carried = self.inputs.source_frames.to(self.device)
            with _stage(timings, "condition"):
                reference = vae_encode(self.vae, self.inputs.first.pixels.to(self.device))
        for segment in plan.segments[done:]:
            if self.cancel is not None and self.cancel():
                raise Cancelled(f"cancelled before segment {segment.index + 1} of {count}")
            self._report("condition", segment, 0)
            with _stage(timings, "sample"):
                if carried is None:
                    latent = self._first(segment, generator, timings)
                    reference = latent[:, :, :1]
                else:
                    assert reference is not None
                    latent = self._continue(segment, generator, reference, carried, tail, timings)
            self._report("decode", segment, self.steps)
            with _stage(timings, "decode"):
                video = vae_decode(self.vae, latent)  # [1, 3, 93, H, W] in [-1, 1]
                frames = to_uint8(video[0])  # [93, H, W, 3] uint8: the output and the next condition
            with _stage(timings, "frames"):
                first, last = _kept(segment, self.inputs.source_frames is not None)
                if last > first:
                    sink.write(frames[first:last])
            carried = _from_uint8(frames[-COND_FRAMES:], self.device)
            tail = latent[:, :, -COND_LATENTS:]
            if loop.checkpoint is not None:  # after the last segment too: a retry then only assembles
                with _stage(timings, "checkpoint"):
                    assert reference is not None
                    kept = {"reference": reference} | ({} if tail is None else {"tail": tail})
                    state = ClipState(segment.index + 1, loop.seed, generator.get_state(), carried, kept)
                    loop.checkpoint.save(state)

    def _first(self, segment: Segment, generator: torch.Generator, timings: dict[str, float]) -> Tensor:
        """ai2v (§7.4): the image latent clean at latent 0 (timestep 0), latents 1... denoised."""
        noise = ls.segment_noise(generator, self.latent_shape, continuation=False)
        with _stage(timings, "condition"):
            image = vae_encode(self.vae, self.inputs.first.pixels.to(self.device))  # [1, 16, 1, h, w]
        latent = noise.clone()
        latent[:, :, :1] = image
        state = _Segment(
            self._windows(segment), Conditioning(num_cond_latents=1), None, self._masks(), clean=1
        )
        schedule = ls.segment_schedule(self.mode, self.steps, self.shift, continuation=False)
        for step in range(schedule.steps):
            self._check_cancel(segment, step)
            timestep = ls.model_timestep(schedule, step, SEGMENT_LATENTS, clean=1).to(self.device)
            velocity = self._velocity(latent, timestep, state)
            latent[:, :, 1:] = ls.euler_step(latent, velocity, schedule, step)[:, :, 1:]
            self._report("sample", segment, step + 1)
        return latent

    def _continue(
        self,
        segment: Segment,
        generator: torch.Generator,
        reference: Tensor,
        carried: Tensor,
        tail: Tensor | None,
        timings: dict[str, float],
    ) -> Tensor:
        """A continuation (§7.6): [reference, 4 clean, 20 noisy]; the cache pass, then the noisy latents
        alone against the cached keys; the clean latents re-encoded in front of the result."""
        noise = ls.segment_noise(generator, self.latent_shape, continuation=True).float()
        with _stage(timings, "condition"):
            cond_latents = vae_encode(self.vae, carried)  # [1, 16, 4, h, w]
        clean = cond_latents if tail is None or self.pipe.family.condition == "reencoded" else tail.float()
        band = segment.masked_band is not None
        cond = Conditioning(
            num_cond_latents=1 + COND_LATENTS,
            num_ref_latents=1,
            ref_img_index=self.inputs.plan.ref_img_index,
            mask_frame_range=self.inputs.plan.mask_frame_range if band else None,
        )
        windows = self._windows(segment)
        head = torch.cat([reference, clean], dim=2)  # [1, 16, 5, h, w]
        cache = self.dit.clean_cache(head, self.text.positive[0], windows, cond=cond, runtime=self.runtime)
        state = _Segment(windows, cond, cache, self._masks(), clean=0)
        noisy = noise[:, :, COND_LATENTS:]
        schedule = ls.segment_schedule(self.mode, self.steps, self.shift, continuation=True)
        for step in range(schedule.steps):
            self._check_cancel(segment, step)
            timestep = ls.model_timestep(schedule, step, noisy.shape[2]).to(self.device)
            velocity = self._velocity(noisy, timestep, state)
            noisy = ls.euler_step(noisy, velocity, schedule, step)
            self._report("sample", segment, step + 1)
        return torch.cat([cond_latents, noisy], dim=2)

    def _velocity(self, latent: Tensor, timestep: Tensor, state: _Segment) -> Tensor:
        """`v̂` of one step (§7.3): the `cond` pass, or `drop_text`, `cond`, `uncond` combined."""

        def call(text: tuple[Tensor, Tensor], audio: Tensor) -> Tensor:
            return self.dit(
                latent, timestep, text[0], text[1], audio, cond=state.cond, person_masks=state.masks,
                kv_cache=state.cache, runtime=self.runtime,
            )  # fmt: skip

        passes = ls.guidance_passes(self.text_scale, self.audio_scale)
        if passes == ("cond",):
            return call(self.text.positive, state.windows)
        negative = self.text.negative
        assert negative is not None
        if self.pipe.batched_guidance and state.masks is None:  # the reference's [u_t, c] batch
            pair = (
                torch.cat([negative[0], self.text.positive[0]]),
                torch.cat([negative[1], self.text.positive[1]]),
            )
            both = self.dit(
                torch.cat([latent] * 2), timestep.expand(2, -1), pair[0], pair[1],
                torch.cat([state.windows] * 2), cond=state.cond, kv_cache=state.cache, runtime=self.runtime,
            )  # fmt: skip
            preds = {
                "drop_text": both[:1],
                "cond": both[1:],
                "uncond": call(negative, null_windows(state.windows)),
            }
            return ls.combine(preds, self.text_scale, self.audio_scale)
        preds = {
            "drop_text": call(negative, state.windows),
            "cond": call(self.text.positive, state.windows),
            "uncond": call(negative, null_windows(state.windows)),
        }
        return ls.combine(preds, self.text_scale, self.audio_scale)

    def _windows(self, segment: Segment) -> Tensor:
        return segment_windows(self.features, segment, self.pipe.bundle.audio_config.stride).to(self.device)

    def _masks(self) -> Tensor | None:
        masks = self.inputs.person_masks
        return None if masks is None else masks.to(self.device)

    def _check_cancel(self, segment: Segment, step: int) -> None:
        if step and self.cancel is not None and self.cancel():
            raise Cancelled(f"cancelled in segment {segment.index + 1}, step {step + 1}")

    def _report(self, stage: str, segment: Segment, step: int) -> None:
        if self.progress is not None:
            count = len(self.inputs.plan.segments)
            self.progress(Progress(stage, segment.index + 1, count, step, self.steps))


def _kept(segment: Segment, from_video: bool) -> tuple[int, int]:
    """Segment-local frames the output keeps; continuing a video, segment 0 also drops the 13 frames it
    re-rendered from the video."""
    first, last = segment.kept
    if from_video and segment.index == 0:
        first = COND_FRAMES
    return first, last


def _from_uint8(frames: np.ndarray, device: torch.device) -> Tensor:
    """uint8 [n, H, W, 3] -> [1, 3, n, H, W] float32 in [-1, 1] (§6.2 on already-sized frames)."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(device).float() / 255.0
    return (pixels * 2 - 1).permute(3, 0, 1, 2)[None]


def _family(model: str) -> LongCatFamily:
    family = get_model(model).family
    if not isinstance(family, LongCatFamily):
        raise InvalidInput(f"model {model} is not a LongCat-Video-Avatar model")
    return family


class _stage:  # noqa: N801 - used as a context manager like a function
    """Adds the wall time of a block to `timings[name]`."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start
