"""Our side of LongCat-Video-Avatar's audio and sampling parity: the same stages through multitalk_worker.

Shared by tools/parity_longcat_audio.py (against the live reference checkout) and
tests/test_parity_longcat_audio.py (against the stored reference outputs), so both run the same code. The
stage names and their inputs are defined here; `signal(...)` makes each stage's audio from its parameters
alone (the fixtures store its SHA-256, not the samples).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperForConditionalGeneration

from multitalk_worker.models.audio_encoder import audio_features
from multitalk_worker.models.whisper_encoder import whisper_features
from multitalk_worker.pipeline import longcat_sampling as ls
from multitalk_worker.pipeline.longcat_audio import AUDIO_V10, AUDIO_V15, stream_tracks, track_features
from multitalk_worker.pipeline.longcat_segments import (
    SEGMENT_FRAMES,
    plan_segments,
    rendered_frames,
    segment_windows,
    window_indices,
)
from multitalk_worker.weights.wav2vec import load_wav2vec
from multitalk_worker.weights.whisper import load_whisper

Tensors = dict[str, Tensor]
CPU = torch.device("cpu")
WHISPER_DIR = "longcat_audio/whisper-large-v3"  # under tests/fixtures/parity/
WAV2VEC_DIR = "wav2vec/chinese-wav2vec2-base"  # the MultiTalk fixtures' tiny wav2vec2

# Tiny whisper-large-v3: the real mel bins, window and 32 encoder layers (LongCat pools 33 states), width 8.
TINY_WHISPER = {
    "num_mel_bins": 128,
    "d_model": 8,
    "encoder_layers": 32,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 16,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 16,
    "max_source_positions": 1500,
    "max_target_positions": 16,
    "vocab_size": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
}

# stage -> (version, seconds of each person's audio, audio_type or None, segments S, others stream)
AUDIO_STAGES: dict[str, tuple[str, tuple[float, ...], str | None, int, bool]] = {
    "whisper_3s_padded": ("1.5", (3.0,), None, 1, False),
    "whisper_30s": ("1.5", (30.0,), None, 1, False),
    "whisper_31s_s3": ("1.5", (31.0,), None, 3, False),
    "whisper_2p_add_others": ("1.5", (2.5, 1.5), "add", 2, True),
    "whisper_2p_para": ("1.5", (4.0, 4.0), "para", 1, False),
    "wav2vec_3s_padded": ("1.0", (3.0,), None, 1, False),
    "wav2vec_7s": ("1.0", (7.0,), None, 1, False),
}
NOISE_SEED = 1234  # v1.0's noise floor: the reference's global NumPy RNG seeded alike
WINDOW_SEGMENTS = 3

# (mode, steps, shift, enhance_hf) of every schedule stage
SCHEDULES: dict[str, tuple[ls.ScheduleMode, int, float, bool]] = {
    "sched_distill_v15": ("distill", 8, 7.0, False),
    **{f"sched_default_{n}_s{int(s)}": ("default", n, s, False) for n in (8, 30, 50) for s in (7.0, 12.0)},
    "sched_enhance_hf_50_s7": ("default", 50, 7.0, True),
    "sched_enhance_hf_50_s12": ("default", 50, 12.0, True),
    "sched_distill_v1_50_s12": ("distill_v1", 50, 12.0, False),
    "sched_distill_v1_30_s12": ("distill_v1", 30, 12.0, False),
}
TOLERANCE_F32 = 1e-5  # max |ours − ref| / max |ref| of the float32 feature stages


def signal(seconds: float, seed: int) -> np.ndarray:
    """Speech-like test audio at 16 kHz, float32: a gliding tone with a syllable envelope, plus noise."""
    gen = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * 16000))) / 16000.0
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    tone = np.sin(2 * np.pi * (180.0 + 40.0 * np.sin(2 * np.pi * 0.5 * t)) * t)
    return (0.2 * envelope * tone + 0.01 * gen.standard_normal(t.shape)).astype(np.float32)


def stage_signals(stage: str, seed: int) -> list[np.ndarray]:
    seconds = AUDIO_STAGES[stage][1]
    return [signal(s, seed + 17 * i) for i, s in enumerate(seconds)]


def digest(arrays: list[np.ndarray]) -> Tensor:
    """SHA-256 of the stage's input samples, as uint8 [32]."""
    sha = hashlib.sha256()
    for array in arrays:
        sha.update(np.ascontiguousarray(array).tobytes())
    return torch.frombuffer(bytearray(sha.digest()), dtype=torch.uint8)


def write_tiny_whisper(folder: Path, seed: int) -> None:
    """A tiny whisper-large-v3 folder as published: WhisperForConditionalGeneration's config.json and its
    float16 model.safetensors (`model.encoder.*`, `model.decoder.*`), and preprocessor_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**TINY_WHISPER))
    with torch.no_grad():  # weights large enough that every state differs visibly
        for name, param in model.named_parameters():
            if name.endswith("embed_positions.weight"):
                continue
            param.copy_(torch.randn_like(param) * (0.3 if param.ndim > 1 else 0.1))
    config = model.config.to_dict() | {
        "architectures": ["WhisperForConditionalGeneration"],
        "torch_dtype": "float16",  # the published file's key and value
    }
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.half().contiguous() for k, v in model.state_dict().items() if k != "proj_out.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    WhisperFeatureExtractor(feature_size=128).save_pretrained(folder)


MDX_SHAPE = (1, 4, 3072, 256)  # Kim_Vocal_2's input and output: batch, channel x (re, im), bins, frames


def write_tiny_mdx(path: Path, seed: int) -> None:
    """A stand-in for Kim_Vocal_2.onnx with its input name and shape: a per-bin mask in [0, 1] on each of
    the 4 spectrogram planes (`output = input · mask`). Needs the `onnx` package (dev)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    mask = np.random.default_rng(seed).uniform(0.0, 1.0, (1, 4, MDX_SHAPE[2], 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "mask"], ["output"])],
        "tiny_mdx",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, MDX_SHAPE[2], MDX_SHAPE[3]])],
        [
            helper.make_tensor_value_info(
                "output", TensorProto.FLOAT, ["batch", 4, MDX_SHAPE[2], MDX_SHAPE[3]]
            )
        ],
        [numpy_helper.from_array(mask, "mask")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def vocal_input(seconds: float, seed: int) -> np.ndarray:
    """A stereo 44.1 kHz "song" float32 [2, n]: a voice-like tone on both channels over a low hum and
    noise, peaking above 0.9 (so the peak limiter acts)."""
    gen = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * 44100))) / 44100.0
    voice = 0.6 * np.sin(2 * np.pi * 220.0 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * t))
    hum = 0.4 * np.sin(2 * np.pi * 55.0 * t)
    left = voice + hum + 0.02 * gen.standard_normal(t.shape)
    right = voice - hum + 0.02 * gen.standard_normal(t.shape)
    return np.stack([left, right]).astype(np.float32)


VOCAL_SECONDS = 3.0  # 2 overlapping MDX chunks (261 120 samples every 195 840) after the padding
VOCAL_THIN = 16  # the stored 44.1 kHz stem keeps every 16th sample
VOCAL_MODEL = "longcat_audio/vocal_separator/Kim_Vocal_2.onnx"  # written by write_tiny_mdx, not stored


def run_vocal_stage(model_dir: Path, seed: int) -> Tensors:
    """Our separator on the tiny model in `model_dir/vocal_separator/`: the 44.1 kHz stem (thinned) and
    the 16 kHz vocal the audio path reads."""
    from multitalk_worker.pipeline.vocals import load_vocal_separator

    separator = load_vocal_separator(model_dir)
    mix = vocal_input(VOCAL_SECONDS, seed)
    return {
        "stem": torch.from_numpy(separator.separate(mix)[:, ::VOCAL_THIN].copy()),
        "vocals_16k": torch.from_numpy(separator.vocals_16k(mix)),
    }


def _layout(stage: str) -> str:
    return "parallel" if AUDIO_STAGES[stage][2] == "para" else "sequential"


def run_audio_stage(stage: str, fixtures: Path, seed: int) -> Tensors:
    """Every stream's features over the whole padded track, and the windows of every segment."""
    version, _, audio_type, segments, others = AUDIO_STAGES[stage]
    signals = stage_signals(stage, seed)
    if version == "1.5":
        encoder, extractor = load_whisper(fixtures / WHISPER_DIR, device=CPU)
        config = AUDIO_V15

        def encode(prepared: np.ndarray, frames: int) -> Tensor:
            return whisper_features(encoder, extractor, prepared, frames)

    else:
        model, w2v_extractor = load_wav2vec(fixtures / WAV2VEC_DIR, device=CPU)
        config = AUDIO_V10

        def encode(prepared: np.ndarray, frames: int) -> Tensor:
            return audio_features(model, w2v_extractor, prepared, frames=frames)

    tracks = stream_tracks(signals, _layout(stage), others) if audio_type else signals
    noise = np.random.RandomState(NOISE_SEED)
    out: Tensors = {}
    features = []
    for index, track in enumerate(tracks):
        features.append(track_features(track, segments, config, encode, noise))
        out[f"features_{index}"] = features[-1]
    frames = rendered_frames(max(segments, WINDOW_SEGMENTS))
    for segment in plan_segments(frames, frames).segments:
        index = window_indices(segment.start, SEGMENT_FRAMES, config.stride, features[0].shape[0])
        windows = segment_windows(features, segment, config.stride)  # [P, 93, 5, groups, C]
        if not torch.equal(windows, torch.stack([track[index] for track in features])):
            raise RuntimeError("segment_windows is not the gather of window_indices")
        out[f"indices_{segment.index}"] = index.to(torch.int32)
    return out


def run_schedule_stage(stage: str) -> Tensors:
    mode, steps, shift, hf = SCHEDULES[stage]
    schedule = ls.make_schedule(mode, steps, shift)
    if hf:
        schedule = ls.enhance_hf(schedule)
    return {
        "timesteps": schedule.timesteps,
        "sigmas": schedule.sigmas,
        "model_timesteps": schedule.model_timesteps.float(),
    }


def run_step_stage(inputs: Tensors) -> Tensors:
    """One Euler step per schedule position, and the split guidance, on the stored tensors."""
    schedule = ls.make_schedule("default", 50, 12.0)
    out = {}
    for step in (0, 17, 49):
        out[f"step_{step}"] = ls.euler_step(inputs["latent"], inputs["velocity"], schedule, step)
    preds = {"cond": inputs["cond"], "drop_text": inputs["drop_text"], "uncond": inputs["uncond"]}
    out["guided"] = ls.combine(preds, 4.0, 2.5)
    return out


def compare(ours: Tensors, ref: Tensors) -> tuple[float, float]:
    """(max |ours − ref|, max over tensors of max |ours − ref| / max |ref|) of a stage; inf on a key or
    shape mismatch."""
    if set(ours) != set(ref):
        return float("inf"), float("inf")
    worst, relative = 0.0, 0.0
    for key, expected in ref.items():
        got = ours[key]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            return float("inf"), float("inf")
        error = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
        scale = expected.double().abs().max().item() if got.numel() else 0.0
        worst = max(worst, error)
        relative = max(relative, error / scale if scale else error)
    return worst, relative


VOCAL_PCM_STEP = 2.0**-15  # one 16-bit step: the vocal is read back from a 16-bit WAV


def vocal_check(ours: Tensors, ref: Tensors) -> tuple[float, float, bool]:
    """(max |Δ|, relative, ok) of the vocal stage: the stem within TOLERANCE_F32, the 16 kHz vocal within
    one 16-bit step (a last-bit difference of the stem can move a sample across a step of the writer's
    truncation; measured 6.2e-6 < 3.05e-5)."""
    stem = compare({"stem": ours["stem"]}, {"stem": ref["stem"]})
    read = compare({"vocals_16k": ours["vocals_16k"]}, {"vocals_16k": ref["vocals_16k"]})
    ok = stem[1] <= TOLERANCE_F32 and read[0] <= VOCAL_PCM_STEP
    return max(stem[0], read[0]), max(stem[1], read[1]), ok


def manifest(seed: int) -> str:
    return json.dumps({"seed": seed, "tolerance_f32": TOLERANCE_F32}, indent=1)
