"""Our side of the two pipeline-level parity stages: real speech through the audio front end, and a full
two-clip streaming run of `TalkingVideoPipeline` on the parity weights.

Shared by tools/parity.py (against the live reference) and tests/test_parity_generate.py (against stored
reference outputs), so both run exactly the same code. The inputs are the committed example files
(examples/speech_a.wav, speech_b.wav, person.png, two_people.png) and the weight folders that
tools/parity.py writes under its root (tests/fixtures/parity/ for CI).
"""

from __future__ import annotations

import tempfile
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import soxr
import torch
from _parity_ours import (
    CLIP_DIR,
    CPU,
    DIT_DIR,
    PARITY,
    T5_DIR,
    VAE_DIR,
    WAV2VEC_DIR,
    _load,
    _vae,
    compare,
    load_dit,
)
from torch import Tensor

from multitalk_worker import timeline
from multitalk_worker.models.audio_encoder import audio_features
from multitalk_worker.models.image_encoder import build_image_encoder
from multitalk_worker.models.text_encoder import build_text_encoder
from multitalk_worker.models.transformer import MultiTalkTransformer
from multitalk_worker.pipeline import audio as audio_prep
from multitalk_worker.pipeline import pipeline as pipeline_module
from multitalk_worker.pipeline.request import GenerationRequest, SamplingParams, Speaker
from multitalk_worker.pipeline.text import DEFAULT_NEGATIVE_PROMPT
from multitalk_worker.registry import MULTITALK
from multitalk_worker.tiny import build_tiny_tokenizer
from multitalk_worker.weights import original
from multitalk_worker.weights.loader import ModelBundle
from multitalk_worker.weights.wav2vec import load_wav2vec

Tensors = dict[str, Tensor]

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SPEECH_A, SPEECH_B = EXAMPLES / "speech_a.wav", EXAMPLES / "speech_b.wav"
# Clip geometry: our pipeline's constants (the reference's defaults), passed to the reference's generate.
FRAMES_PER_CLIP, MOTION_FRAMES = timeline.FRAMES_PER_CLIP, MULTITALK.motion_frames
PARA_A = "speech_a_cut.wav"  # speech_a cut to speech_b's length: the reference's `para` needs equal lengths
A_22K = "speech_a_22k_stereo.wav"  # speech_a at 22.05 kHz in two channels: exercises downmix and resampling

# --------------------------------------------------------------------------- speech


@dataclass(frozen=True)
class SpeechCase:
    """One audio preparation: the files of person 1 (and 2), and the two-person mode."""

    name: str
    files: tuple[str, ...]  # names under the work folder (see `speech_files`)
    mode: str  # ours: "parallel" | "sequential"; the reference: "para" | "add"


SPEECH_CASES = (
    SpeechCase("one", ("speech_a.wav",), "parallel"),
    SpeechCase("one_22k", (A_22K,), "parallel"),
    SpeechCase("para", (PARA_A, "speech_b.wav"), "parallel"),
    SpeechCase("add", ("speech_a.wav", "speech_b.wav"), "sequential"),
)
REFERENCE_MODE = {"parallel": "para", "sequential": "add"}


def speech_files(work: Path) -> Path:
    """The example tracks under `work`, plus two files made from them with the stdlib `wave` module:
    speech_a cut to speech_b's sample count (same 16-bit samples), and speech_a resampled to 22.05 kHz
    (soxr HQ) as 16-bit stereo, right channel half as loud and time-reversed. Returns `work`."""
    work.mkdir(parents=True, exist_ok=True)
    for src in (SPEECH_A, SPEECH_B):
        (work / src.name).write_bytes(src.read_bytes())
    with wave.open(str(SPEECH_B)) as b:
        length = b.getnframes()
    with wave.open(str(SPEECH_A)) as a:
        params, pcm = a.getparams(), a.readframes(a.getnframes())
    with wave.open(str(work / PARA_A), "wb") as out:
        out.setparams(params)
        out.writeframes(pcm[: 2 * length])
    left = soxr.resample(np.frombuffer(pcm, dtype="<i2") / 32768.0, 16_000, 22_050, quality="HQ")
    stereo = np.stack([left, 0.5 * left[::-1]], axis=1)
    with wave.open(str(work / A_22K), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(22_050)
        out.writeframes(np.clip(np.round(stereo * 32767), -32768, 32767).astype("<i2").tobytes())
    return work


def run_speech(root: Path, work: Path) -> tuple[Tensors, Tensors]:
    """Our `prepare_audio` + `audio_features` on every speech case.

    Returns (signals, features): `<case>/s<p>` the prepared 16 kHz track of person p, `<case>/mix` the
    soundtrack; `<case>/f<p>` the wav2vec2 features [La, layers, C] of person p."""
    speech_files(work)
    model, extractor = load_wav2vec(root / WAV2VEC_DIR, device=CPU)
    signals, features = {}, {}
    for case in SPEECH_CASES:
        paths = [work / f for f in case.files]
        prepared = audio_prep.prepare_audio(paths, case.mode, FRAMES_PER_CLIP)  # type: ignore[arg-type]
        for p, track in enumerate(prepared.tracks, 1):
            signals[f"{case.name}/s{p}"] = torch.from_numpy(np.asarray(track, dtype=np.float32))
            features[f"{case.name}/f{p}"] = audio_features(model, extractor, track).float()
        signals[f"{case.name}/mix"] = torch.from_numpy(np.asarray(prepared.soundtrack, dtype=np.float32))
    return signals, features


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class GenerateRun:
    """One streaming run: two clips of 81 frames (25 motion frames), 3 steps, colour correction on."""

    name: str
    image: str  # under examples/
    speech: str  # name of the SpeechCase whose tracks (and, for the reference, embeddings) it uses
    text_scale: float
    audio_scale: float = 4.0
    steps: int = 3
    shift: float = 7.0
    color_correction: float = 1.0

    @property
    def case(self) -> SpeechCase:
        return next(c for c in SPEECH_CASES if c.name == self.speech)


GENERATE_RUNS = (
    # two persons in parallel (default left/right masks), text guidance 5: 3 passes per step
    GenerateRun("generate_two_clips", "two_people.png", "para", text_scale=5.0),
    # one person, text guidance 1: 2 passes per step (cond, drop_audio)
    GenerateRun("generate_two_clips_text1", "person.png", "one", text_scale=1.0),
)
PROMPT = "A person talks to the camera in a bright studio"
NEGATIVE_PROMPT = DEFAULT_NEGATIVE_PROMPT
VIDEO_FRAME_STRIDE = 16  # stored fixtures keep every 16th decoded frame (size); the tool compares all


def parity_bundle(root: Path, dit: MultiTalkTransformer | None = None) -> ModelBundle:
    """Every network of PARITY loaded from the weight folders under `root`, in float32 on CPU; `dit`
    replaces the MultiTalk DiT of root/dit (the InfiniteTalk stages bring theirs).

    The config is named "tiny": the pipeline accepts the tiny bucket table only for a model of that name,
    and PARITY is TINY with a 257-token CLIP patch and a narrower VAE."""
    text_encoder = build_text_encoder(PARITY.text_encoder)
    _load(original.t5_component(root / T5_DIR), text_encoder)
    image_encoder = build_image_encoder(PARITY.image_encoder)
    _load(original.clip_component(root / CLIP_DIR), image_encoder)
    audio_encoder, extractor = load_wav2vec(root / WAV2VEC_DIR, device=CPU)
    return ModelBundle(
        dit=load_dit(root / DIT_DIR, PARITY.dit, torch.float32) if dit is None else dit,
        text_encoder=text_encoder.eval(),
        tokenizer=build_tiny_tokenizer(max_length=PARITY.text_encoder.text_len),
        image_encoder=image_encoder.eval(),
        vae=_vae(root / VAE_DIR).eval(),
        audio_encoder=audio_encoder,
        feature_extractor=extractor,
        config=replace(PARITY, name="tiny"),
    )


@contextmanager
def _recording(
    name: str, record: Callable[[tuple[Any, ...], Any], None], module: ModuleType = pipeline_module
) -> Iterator[None]:
    """Wrap the function `name` that `module` calls so that each call's (arguments, result) is recorded."""
    original_fn = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = original_fn(*args, **kwargs)
        record(args, out)
        return out

    setattr(module, name, wrapped)
    try:
        yield
    finally:
        setattr(module, name, original_fn)


def run_generate(root: Path, work: Path, run: GenerateRun, seed: int) -> tuple[Tensors, Tensor]:
    """Our `TalkingVideoPipeline.__call__` on the run's files. Returns per clip the final latent before
    decoding (`latent_<k>` [16, T, h, w]) and the decoded, colour-corrected video (`video_<k>` [3, F, H, W]);
    and the output frames (uint8 [N, H, W, 3])."""
    speech_files(work)
    latents: list[Tensor] = []
    videos: list[Tensor] = []
    request = GenerationRequest(
        image=EXAMPLES / run.image,
        speakers=tuple(Speaker(audio=work / f) for f in run.case.files),
        prompt=PROMPT,
        audio_mode=run.case.mode,  # type: ignore[arg-type]
        negative_prompt=NEGATIVE_PROMPT,
        resolution="tiny",
        image_orientation="stored",  # the reference ignores EXIF
        sampling=SamplingParams(
            steps=run.steps,
            text_guidance=run.text_scale,
            audio_guidance=run.audio_scale,
            shift=run.shift,
            seed=seed,
            color_correction=run.color_correction,
        ),
    )
    pipe = pipeline_module.TalkingVideoPipeline(parity_bundle(root))
    with (
        _recording("vae_decode", lambda args, _: latents.append(args[1][0].float().clone())),  # (vae, latent)
        _recording("match_colors", lambda _, video: videos.append(video.float().clone())),
    ):
        result = pipe(request)
    out = {f"latent_{k}": v for k, v in enumerate(latents)} | {f"video_{k}": v for k, v in enumerate(videos)}
    return out, torch.from_numpy(result.frames)


# --------------------------------------------------------------------------- stages

F32_TOLERANCE = 1e-4
PIPELINE_TOLERANCES: dict[str, float] = {
    "audio_prepare_speech": F32_TOLERANCE,
    "audio_features_speech": F32_TOLERANCE,
    **{run.name: F32_TOLERANCE for run in GENERATE_RUNS},
}
FRAMES_KEY = "frames"  # uint8 output frames: compared separately (a level may differ where the truncating
MAX_FRAME_LEVEL_DIFF = 1  # cast meets a value within rounding of an integer level)


def run_pipeline_stage(stage: str, root: Path, inputs: Tensors) -> Tensors:
    """Our outputs of one pipeline stage; `inputs["seed"]` is the run's seed."""
    with tempfile.TemporaryDirectory(prefix="parity-ours-") as tmp:
        work = Path(tmp)
        if stage in ("audio_prepare_speech", "audio_features_speech"):
            signals, features = run_speech(root, work)
            return signals if stage == "audio_prepare_speech" else features
        run = next(r for r in GENERATE_RUNS if r.name == stage)
        outputs, frames = run_generate(root, work, run, int(inputs["seed"]))
        return outputs | {FRAMES_KEY: frames}


def compare_pipeline(ours: Tensors, reference: Tensors) -> tuple[float, float, str | None]:
    """`compare` over the float outputs; for the uint8 frames a note, or a failure on a shape mismatch or
    a difference of more than one level."""
    ours, reference = dict(ours), dict(reference)
    ours_frames, ref_frames = ours.pop(FRAMES_KEY, None), reference.pop(FRAMES_KEY, None)
    ours_shape, ref_shape = ours.pop("frames_shape", None), reference.pop("frames_shape", None)
    if ref_shape is not None and (ours_shape is None or not torch.equal(ours_shape, ref_shape)):
        raise ValueError(f"output frames shape {ours_shape} vs reference {ref_shape.tolist()}")
    max_abs, rel = compare(ours, reference)
    if ref_frames is None:
        return max_abs, rel, None
    if ours_frames is None or ours_frames.shape != ref_frames.shape:
        shape = None if ours_frames is None else tuple(ours_frames.shape)
        raise ValueError(f"output frames {shape} vs reference {tuple(ref_frames.shape)}")
    levels = (ours_frames.int() - ref_frames.int()).abs()
    worst = int(levels.max())
    if worst > MAX_FRAME_LEVEL_DIFF:
        raise ValueError(f"output frames differ by up to {worst} levels")
    share = float((levels > 0).float().mean())
    shape = tuple(ref_frames.shape)
    return max_abs, rel, f"uint8 frames {shape}: max diff {worst} level, {share:.2e} of values differ"


def stored_form(outputs: Tensors) -> Tensors:
    """What the fixtures keep of a stage's outputs (size budget): every 16th sample of the signals (as
    float32), every VIDEO_FRAME_STRIDE-th frame of the decoded clips and of the uint8 output frames
    (whose full shape is kept as `frames_shape`); features and latents in full."""
    kept = {}
    for key, value in outputs.items():
        if "/s" in key or key.endswith("/mix"):
            kept[key] = value[::16].float().clone()
        elif key.startswith("video_"):
            kept[key] = value[:, ::VIDEO_FRAME_STRIDE].clone()
        elif key == FRAMES_KEY:
            kept[key] = value[::VIDEO_FRAME_STRIDE].clone()
            kept["frames_shape"] = torch.tensor(value.shape)
        else:
            kept[key] = value
    return kept
