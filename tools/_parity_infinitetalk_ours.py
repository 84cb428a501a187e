"""InfiniteTalk parity: shared definitions (weight layout, source video, runs) and our side of every stage.

Shared by tools/parity.py --model infinitetalk (against the live reference, see
tools/_parity_infinitetalk_cases.py) and tests/test_parity_infinitetalk.py (against the stored reference
outputs), so both run exactly the same code. The weights are the parity tiny model (tools/_parity_ours.py)
in the layout the InfiniteTalk reference reads (its spec 2.1): a Wan folder with seven
`diffusion_pytorch_model-0000i-of-00007.safetensors` shards, Wan's own index and config.json, plus the two
adapter files `single/infinitetalk.safetensors` and `multi/infinitetalk.safetensors` (float32, the
8·L + 10 audio keys). They live under `<root>/infinitetalk/`; the T5, CLIP, VAE and wav2vec2 folders are
the MultiTalk stages' (`<root>/t5`, ...), the same files for both models.
"""

from __future__ import annotations

import hashlib
import json
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from _parity_ours import (
    F32_TOLERANCE,
    PARITY,
    audio_proj_forward,
    cast_dit_inputs,
    compare,
    dit_forward,
    load_dit,
)
from _parity_pipeline_ours import (
    EXAMPLES,
    NEGATIVE_PROMPT,
    PROMPT,
    SPEECH_A,
    SPEECH_B,
    _recording,
    compare_pipeline,
    parity_bundle,
    speech_files,
    stored_form,
)
from safetensors.torch import load_file, save_file
from torch import Tensor

from multitalk_worker.errors import CheckpointError
from multitalk_worker.pipeline import conditioning
from multitalk_worker.pipeline import pipeline as pipeline_module
from multitalk_worker.pipeline.request import GenerationRequest, SamplingParams, Speaker
from multitalk_worker.pipeline.video import VideoSource
from multitalk_worker.registry import INFINITETALK
from multitalk_worker.timeline import FPS
from multitalk_worker.weights.loader import ModelBundle

Tensors = dict[str, Tensor]

IT_DIR = "infinitetalk"  # under the parity root: the DiT folder of this model
SHARDS = tuple(f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors" for i in range(1, 8))
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"  # Wan's own (no audio keys)
ADAPTER_FILES = {a.name: a.file for a in INFINITETALK.adapters}  # single/..., multi/...
MOTION_FRAMES = INFINITETALK.motion_frames  # 9: the reference CLI's --motion_frame in every README command
SOURCE_VIDEO = "source_25fps.mp4"  # under IT_DIR: the video-to-video source (H.264, 25 fps)
SOURCE_FRAMES, SOURCE_H, SOURCE_W = 100, 70, 90  # odd aspect: the 48x64 bucket is a resize plus a crop
TINT_FROM = 60  # source frames from here on are tinted warm (colour correction must still follow frame 0)
LONG_SPEECH = "speech_aba.wav"  # speech_a + speech_b + speech_a (11.7 s): four clips under a 10 s cap


def adapter_for(persons: int) -> str:
    """The adapter file (relative to the DiT folder) the reference is given for `persons` speakers."""
    return INFINITETALK.adapter(persons=persons).file


# --------------------------------------------------------------------------- inputs


def source_frame(i: int) -> np.ndarray:
    """Frame `i` of the synthetic source, uint8 [H, W, 3]: a smooth colour field that drifts with i, a
    square that moves with i, and i in binary as seven 12x8 blocks along the top (frames differ visibly);
    frames from TINT_FROM on are tinted warm."""
    y, x = np.mgrid[0:SOURCE_H, 0:SOURCE_W].astype(np.float64)
    phase = 2 * np.pi * i / SOURCE_FRAMES
    r = 0.35 + 0.3 * x / SOURCE_W + 0.1 * np.sin(phase)
    g = 0.3 + 0.4 * y / SOURCE_H
    b = 0.5 + 0.25 * np.sin(2 * np.pi * x / SOURCE_W + phase)
    img = np.stack([r, g, b], axis=-1)
    top, left = 20 + (i * 3) % 40, 10 + (i * 5) % 60
    img[top : top + 12, left : left + 12] = (0.9, 0.85, 0.8)
    for bit in range(7):
        img[0:8, 4 + 12 * bit : 14 + 12 * bit] = 0.9 if (i >> bit) & 1 else 0.1
    if i >= TINT_FROM:
        img = img * np.array([1.3, 1.0, 0.6])
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def write_source_video(path: Path) -> Path:
    """SOURCE_FRAMES frames at exactly 25 fps, H.264 (libx264, CRF 12, yuv420p), no audio."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"crf": "12", "preset": "medium"})
        stream.width, stream.height, stream.pix_fmt = SOURCE_W, SOURCE_H, "yuv420p"
        for i in range(SOURCE_FRAMES):
            frame = av.VideoFrame.from_ndarray(source_frame(i), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def it_speech_files(work: Path) -> Path:
    """The MultiTalk speech files (speech_files) plus LONG_SPEECH, made with the stdlib wave module."""
    speech_files(work)
    pcm = b""
    for src in (SPEECH_A, SPEECH_B, SPEECH_A):
        with wave.open(str(src)) as f:
            params, pcm = f.getparams(), pcm + f.readframes(f.getnframes())
    with wave.open(str(work / LONG_SPEECH), "wb") as out:
        out.setparams(params)
        out.writeframes(pcm)
    return work


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class ItRun:
    """One streaming run of the InfiniteTalk clip loop (81-frame clips, 9 motion frames, colour correction
    on). `source` is an image under examples/ or SOURCE_VIDEO; `speech` the files of each person."""

    name: str
    source: str
    speech: tuple[str, ...]  # under the work folder (it_speech_files)
    text_scale: float
    audio_scale: float = 4.0
    steps: int = 3
    shift: float = 7.0
    color_correction: float = 1.0
    max_duration_s: float | None = None  # None: the whole audio (Fmax = 1000, the reference's default)

    @property
    def persons(self) -> int:
        return len(self.speech)

    @property
    def is_video(self) -> bool:
        return self.source == SOURCE_VIDEO

    def max_frames(self) -> int:
        """Fmax as the reference is given it (`--max_frame_num`)."""
        return INFINITETALK.max_frames if self.max_duration_s is None else round(self.max_duration_s * FPS)


PARA_A = "speech_a_cut.wav"  # speech_a cut to speech_b's length (speech_files): `para` needs equal lengths
IT_RUNS = (
    # image to video, one person (single adapter), La = 102: two clips, N = 102
    ItRun("it_i2v_1p", "person.png", ("speech_a.wav",), text_scale=5.0),
    # image to video, two persons in parallel (multi adapter, default masks), La = 87: two clips, N = 87
    ItRun("it_i2v_2p", "two_people.png", (PARA_A, "speech_b.wav"), text_scale=5.0),
    # video to video on the 25 fps source, one person, text 1 / audio 2 (2 passes), capped at 3.6 s:
    # La = 102, Fmax = 90, two clips (references frames 0 and 72), N = 90
    ItRun("it_v2v_1p", SOURCE_VIDEO, ("speech_a.wav",), 1.0, 2.0, max_duration_s=3.6),
    # video to video, two persons (multi adapter), La = 87: two clips, N = 87
    ItRun("it_v2v_2p", SOURCE_VIDEO, (PARA_A, "speech_b.wav"), text_scale=5.0),
    # frame selection: La = 292 capped at 10 s (Fmax = 250), one step: four clips whose references are
    # source frames 0, 72, then 144 and 216 clamped to the last frame (99); N = 250
    ItRun("it_frames", SOURCE_VIDEO, (LONG_SPEECH,), 1.0, 2.0, steps=1, max_duration_s=10.0),
)


def source_path(run: ItRun, dit_root: Path) -> Path:
    return dit_root / SOURCE_VIDEO if run.is_video else EXAMPLES / run.source


# --------------------------------------------------------------------------- comparison helpers


def digests(state: Tensors) -> Tensors:
    """SHA-256 of each tensor's bytes (dtype and shape folded in), as uint8 [32] tensors: the stored
    form of a loaded state dict, compared bitwise."""
    out = {}
    for key, value in state.items():
        t = value.detach().contiguous().cpu()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[key] = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()
    return out


def compare_states(ours: Tensors, reference: Tensors) -> tuple[float, float]:
    """Two loaded state dicts (or their digests): the same keys, and (max |a - b| over the tensors that
    are present as values, or 0/1 per digest; the number of tensors whose bytes differ)."""
    if ours.keys() != reference.keys():
        missing, extra = sorted(reference.keys() - ours.keys()), sorted(ours.keys() - reference.keys())
        raise KeyError(f"state keys differ: missing {missing[:3]}, extra {extra[:3]}")
    ours_d, ref_d = (
        digests(ours) if _is_state(ours) else ours,
        digests(reference) if _is_state(reference) else reference,
    )
    differ = [k for k in reference if not torch.equal(ours_d[k], ref_d[k])]
    max_abs = 0.0
    if _is_state(ours) and _is_state(reference):
        max_abs = max(float((ours[k].double() - reference[k].double()).abs().max()) for k in reference)
    else:
        max_abs = float(bool(differ))
    return max_abs, float(len(differ))


def _is_state(tensors: Tensors) -> bool:
    """True unless every value is a stored digest (uint8 [32])."""
    return not all(v.dtype == torch.uint8 and tuple(v.shape) == (32,) for v in tensors.values())


# --------------------------------------------------------------------------- our side: loading, the DiT

LOAD_DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
MISSING_KEY = "blocks.1.norm_x.bias"  # one of the adapter's keys, dropped
EXTRA_KEY = "blocks.0.audio_cross_attn.extra.weight"  # not a key of the model, added


def our_state(dit_root: Path, adapter: str, dtype: torch.dtype) -> Tensors:
    """Our DiT's state after loading the folder (Wan shards + `adapter`) in `dtype`."""
    model = load_dit(dit_root, PARITY.dit, dtype, adapter)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def broken_adapter_folder(dit_root: Path, out: Path, fault: str) -> Path:
    """A copy of the DiT folder (links to the base files) whose single adapter misses MISSING_KEY
    (`fault` "missing") or carries EXTRA_KEY ("extra")."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*SHARDS, WAN_INDEX, "config.json"):
        if not (out / name).exists():
            (out / name).symlink_to((dit_root / name).resolve())
    state = load_file(str(dit_root / ADAPTER_FILES["single"]))
    if fault == "missing":
        state = {k: v for k, v in state.items() if k != MISSING_KEY}
    elif fault == "extra":
        state = state | {EXTRA_KEY: torch.zeros(4, 4)}
    else:
        raise ValueError(f"unknown fault {fault!r}")
    adapter = out / ADAPTER_FILES["single"]
    adapter.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(adapter), metadata={"format": "pt"})
    return out


FAULT_KEYS = {"missing": MISSING_KEY, "extra": EXTRA_KEY}
COLLIDING_KEY = "blocks.0.norm_x.weight"  # an adapter key also put into the last Wan shard (and its index)


def colliding_folder(dit_root: Path, out: Path) -> Path:
    """A copy of the DiT folder whose last shard also holds COLLIDING_KEY (all 2.0), listed in the index:
    the reference reads the adapter after the shards, so the adapter's value wins (its spec 2.2 step 3)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*SHARDS[:-1], "config.json", *ADAPTER_FILES.values()):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        if not (out / name).exists():
            (out / name).symlink_to((dit_root / name).resolve())
    last = load_file(str(dit_root / SHARDS[-1]))
    shape = load_file(str(dit_root / ADAPTER_FILES["single"]))[COLLIDING_KEY].shape
    save_file(
        last | {COLLIDING_KEY: torch.full(shape, 2.0)}, str(out / SHARDS[-1]), metadata={"format": "pt"}
    )
    index = json.loads((dit_root / WAN_INDEX).read_text())
    index["weight_map"][COLLIDING_KEY] = SHARDS[-1]
    (out / WAN_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return out


def our_collision(dit_root: Path, work: Path) -> Tensors:
    """COLLIDING_KEY of our bf16 DiT loaded from colliding_folder (single adapter)."""
    state = our_state(colliding_folder(dit_root, work / "colliding"), ADAPTER_FILES["single"], torch.bfloat16)
    return {"value": state[COLLIDING_KEY].float()}


def our_refusals(dit_root: Path, work: Path) -> Tensors:
    """1 per fault if our loader refuses the broken adapter with a CheckpointError naming the key."""
    out = {}
    for fault, key in FAULT_KEYS.items():
        folder = broken_adapter_folder(dit_root, work / f"broken_{fault}", fault)
        try:
            our_state(folder, ADAPTER_FILES["single"], torch.bfloat16)
            out[fault] = torch.tensor(0)
        except CheckpointError as exc:
            out[fault] = torch.tensor(int(key in str(exc)))
    return out


def run_dit_stage(stage: str, dit_root: Path, inputs: Tensors) -> Tensors:
    """it_dit_<P>p_<f32|bf16> and it_audio_proj_<P>p_bf16 on our DiT with the adapter for P persons."""
    persons = int(stage.split("_")[-2].removesuffix("p"))
    dtype = LOAD_DTYPES[stage.split("_")[-1]]
    model = load_dit(dit_root, PARITY.dit, dtype, adapter_for(persons))
    if stage.startswith("it_audio_proj_"):
        return {"tokens": audio_proj_forward(model, inputs["audio"]).float()}
    return {"out": dit_forward(model, inputs, dtype)}


__all__ = ["PROMPT", "cast_dit_inputs", "compare", "digests", "source_frame", "write_source_video"]


# --------------------------------------------------------------------------- stages

BF16_TOLERANCE, BF16_TWO_PERSON_TOLERANCE = 2e-2, 5e-2  # as the MultiTalk DiT stages (tools/parity.py)
EXACT = 0.0  # bitwise: the number of differing tensors / flags must be 0
LOAD_STAGES = ("it_load_single_bf16", "it_load_single_f32", "it_load_multi_bf16")
IT_TOLERANCES: dict[str, float] = {
    **{stage: EXACT for stage in LOAD_STAGES},
    "it_load_refuses": EXACT,
    "it_load_collision": EXACT,
    "it_dit_1p_f32": F32_TOLERANCE,
    "it_dit_1p_bf16": BF16_TOLERANCE,
    "it_audio_proj_1p_bf16": BF16_TOLERANCE,
    "it_dit_2p_f32": F32_TOLERANCE,
    "it_dit_2p_bf16": BF16_TWO_PERSON_TOLERANCE,
    "it_audio_proj_2p_bf16": BF16_TOLERANCE,
    **{run.name: F32_TOLERANCE for run in IT_RUNS},
}
RUN_STAGES = {run.name: run for run in IT_RUNS}


def stage_persons(stage: str) -> int | None:
    """The person count a stage is about (None: both)."""
    if stage in RUN_STAGES:
        return RUN_STAGES[stage].persons
    if stage.startswith(("it_dit_", "it_audio_proj_")):
        return int(stage.split("_")[-2].removesuffix("p"))
    return None


def run_it_stage(stage: str, root: Path, inputs: Tensors, work: Path) -> Tensors:
    """Our outputs of one InfiniteTalk stage from the weights under `root` (root/IT_DIR for the DiT)."""
    dit_root = root / IT_DIR
    if stage in LOAD_STAGES:
        name, tag = stage.split("_")[2:]
        return our_state(dit_root, ADAPTER_FILES[name], LOAD_DTYPES[tag])
    if stage == "it_load_refuses":
        return our_refusals(dit_root, work)
    if stage == "it_load_collision":
        return our_collision(dit_root, work)
    if stage.startswith(("it_dit_", "it_audio_proj_")):
        return run_dit_stage(stage, dit_root, inputs)
    return run_generate(root, work, RUN_STAGES[stage], int(inputs["seed"]))


def compare_it(stage: str, ours: Tensors, reference: Tensors) -> tuple[float, float, str | None]:
    """(max_abs_err, the stage's error measure, a note). Loads: the number of tensors that differ; the
    refusal flags: the number that differ; DiT: rel_err; runs: rel_err over the float outputs, and a
    failure if the frame indices or the output frames' shape differ, or a uint8 level by more than 1."""
    if stage in LOAD_STAGES:
        max_abs, differ = compare_states(ours, reference)
        return max_abs, differ, f"{len(reference)} tensors, {int(differ)} differ"
    if stage == "it_load_refuses":
        if ours.keys() != reference.keys():
            raise KeyError(f"faults {sorted(ours)} vs reference {sorted(reference)}")
        differ = [k for k in reference if int(ours[k]) != int(reference[k])]
        refused = {k: bool(int(reference[k])) for k in reference}
        return (
            float(bool(differ)),
            float(len(differ)),
            f"reference refuses {refused}; ours differ on {differ}",
        )
    if stage in RUN_STAGES:
        return compare_run(ours, reference)
    max_abs, rel = compare(ours, reference)
    return max_abs, rel, None


def compare_run(ours: Tensors, reference: Tensors) -> tuple[float, float, str | None]:
    """A generation run: the frame indices read from the source exactly, then compare_pipeline (float
    outputs rel_err, output frames' shape exactly and their uint8 levels within one)."""
    ours, reference = dict(ours), dict(reference)
    ours_ids, ref_ids = ours.pop("frame_ids", None), reference.pop("frame_ids")
    if ours_ids is None or not torch.equal(ours_ids, ref_ids):
        got = None if ours_ids is None else ours_ids.tolist()
        raise ValueError(f"source frame indices {got} vs reference {ref_ids.tolist()}")
    max_abs, rel, note = compare_pipeline(ours, reference)
    return max_abs, rel, f"frame indices {ref_ids.tolist()}; {note}"


CLIP_FRAMES_KEPT = slice(None, None, 80)  # of each decoded clip the fixtures keep frames 0 and 80 (size)


def it_stored_form(stage: str, outputs: Tensors) -> Tensors:
    """What the fixtures keep: digests of loaded states; runs thinned (stored_form: every 16th output
    frame; of the decoded clips only their first and last frame); the rest in full."""
    if stage in LOAD_STAGES:
        return digests(outputs)
    if stage in RUN_STAGES:
        kept = {k: (v[:, CLIP_FRAMES_KEPT] if k.startswith("video_") else v) for k, v in outputs.items()}
        return {k: v.clone().contiguous() for k, v in stored_form(kept).items()}
    return {k: v.clone().contiguous() for k, v in outputs.items()}


# --------------------------------------------------------------------------- our side: the clip loop


def it_bundle(root: Path, persons: int) -> ModelBundle:
    """parity_bundle with the InfiniteTalk DiT (root/IT_DIR, the adapter for `persons`)."""
    adapter = INFINITETALK.adapter(persons=persons)
    dit = load_dit(root / IT_DIR, PARITY.dit, torch.float32, adapter.file)
    return replace(parity_bundle(root, dit), model=INFINITETALK.name, adapter=adapter.name)


@contextmanager
def _recording_conditioner(record: dict[str, list[Any]]) -> Iterator[None]:
    """Wrap InfiniteTalkConditioner.conditions: per clip, the reference frame it read (the pixels of its
    `reference_pixels` call and the source frame they are: -1 for an image) and the clean latent."""
    cls = conditioning.InfiniteTalkConditioner
    conditions, reference_pixels = cls.conditions, cls.reference_pixels
    frames: list[tuple[Tensor, int]] = []

    def pixels(self: Any, start: int) -> Tensor:
        out = reference_pixels(self, start)
        frames.append((out[0, :, 0].float().clone(), _source_index(self.source, start)))
        return out

    def wrapped(self: Any, clip: Any) -> Any:
        frames.clear()
        out = conditions(self, clip)
        if len(frames) != 1:
            raise RuntimeError(f"clip {clip.index} read {len(frames)} reference frames, expected 1")
        record["ref_frames"].append(frames[0][0])
        record["frame_ids"].append(frames[0][1])
        record["motion"].append(out.clean_latent[0].float().clone())
        return out

    cls.conditions, cls.reference_pixels = wrapped, pixels
    try:
        yield
    finally:
        cls.conditions, cls.reference_pixels = conditions, reference_pixels


def _source_index(source: Any, index: int) -> int:
    """The source frame `source.frame(index)` returned: -1 for an image; a video read in reference mode
    gives frame `index`, or its last frame once held."""
    if not isinstance(source, VideoSource):
        return -1
    held = source.held_from is not None and index >= source.held_from
    return source.decoded_frames - 1 if held else index


def run_generate(root: Path, work: Path, run: ItRun, seed: int) -> Tensors:
    """Our TalkingVideoPipeline on the run's source and speech (source_fps="reference": the reference's
    reading of a 25 fps source). Returns the keys of the reference's generate_case: per clip `latent_<k>`,
    `video_<k>`, `ref_frame_<k>`, `motion_<k>`; `frame_ids`, `frames` (uint8 [N, H, W, 3])."""
    it_speech_files(work)
    source = source_path(run, root / IT_DIR)
    request = GenerationRequest(
        model=INFINITETALK.name,
        image=None if run.is_video else source,
        video=source if run.is_video else None,
        speakers=tuple(Speaker(audio=work / f) for f in run.speech),
        prompt=PROMPT,
        audio_mode="parallel",
        negative_prompt=NEGATIVE_PROMPT,
        resolution="tiny",
        image_orientation="stored",  # the reference ignores EXIF
        max_duration_s=run.max_duration_s,
        sampling=SamplingParams(
            steps=run.steps,
            text_guidance=run.text_scale,
            audio_guidance=run.audio_scale,
            shift=run.shift,
            seed=seed,
            color_correction=run.color_correction,
        ),
        source_fps="reference",
    )
    record: dict[str, list[Any]] = {
        "latents": [],
        "videos": [],
        "ref_frames": [],
        "frame_ids": [],
        "motion": [],
    }
    pipe = pipeline_module.TalkingVideoPipeline(it_bundle(root, run.persons))
    with (
        _recording("vae_decode", lambda args, _: record["latents"].append(args[1][0].float().clone())),
        _recording("match_colors", lambda _, video: record["videos"].append(video.float().clone())),
        _recording_conditioner(record),
    ):
        result = pipe(request)
    out: Tensors = {}
    for k, latent in enumerate(record["latents"]):
        out[f"latent_{k}"] = latent
        out[f"video_{k}"] = record["videos"][k]
        out[f"ref_frame_{k}"] = record["ref_frames"][k]
        out[f"motion_{k}"] = record["motion"][k]
    out["frame_ids"] = torch.tensor(record["frame_ids"])
    out["frames"] = torch.from_numpy(result.frames)
    return out
