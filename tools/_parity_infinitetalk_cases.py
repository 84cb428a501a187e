"""Reference side of the InfiniteTalk parity stages (MeiGen-AI/InfiniteTalk; ours: _parity_infinitetalk_ours).

`InfiniteTalkPipeline` (wan/multitalk.py) is compiled alone from the checkout's source, with its helpers
(`resize_and_centercrop`, `timestep_transform`, `to_param_dtype_fp32only`), and built by its **own
`__init__`**, which reads the seven Wan shards and the adapter file and loads them strictly into a bf16 or
float32 WanModel: that is the adapter-load stage. Replaced for the CPU and the tiny model (in the namespace
the class is compiled into; the checkout is not modified):

* `WanModel(**config.json)` builds the reference WanModel at parity size with the tiny projector modules
  swapped in (`_parity_cases.build_reference_dit`; config.json cannot carry the tiny text/audio widths);
* `T5EncoderModel`, `CLIPModel` and `WanVAE` return the reference's own encoders at parity size loaded from
  the parity weight files (`_parity_pipeline_cases._reference_encoders`; their `device="cuda:0"` would need
  a GPU); the VAE records its encode inputs and its decode inputs (each clip's final latent);
* `extract_specific_frames` and `is_video` are the checkout's own (compiled from wan/utils/utils.py), with
  `decord.VideoReader` replaced by a PyAV reader that decodes every frame to RGB24 and reports their count
  as `_num_frame` (decord 0.6.0 is on PyPI but is not a dependency here). Measured: on the committed
  25 fps H.264 source (100 frames) and on the reference's own examples/single/ref_video.mp4 (375 frames),
  decord 0.6.0's `vr[i].asnumpy()` and this reader return identical frames (max |diff| 0 over every frame,
  and the same `_num_frame`); the source frame each call returns is recorded (every clip's reference);
* `get_video_codec` (ffprobe, absent here) reads the codec name with PyAV; `convert_video_to_h264` (AV1
  only) is not reachable with an H.264 source and raises;
* `match_and_blend_colors` records each clip's colour-corrected video; `torch_gc` is a no-op;
  `offload_model=False`; torchvision's `center_crop` as in _parity_pipeline_cases; the 480p bucket table
  is our tiny one; noise from the CPU default generator that `generate_infinitetalk` seeds itself.

Speech goes through the checkout's own `audio_prepare_single` / `audio_prepare_multi` / `get_embedding`
(generate_infinitetalk.py) and is handed over as `.pt` embeddings, as generate_infinitetalk.py does.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import logging
import math
import os
import random
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _parity_cases import (
    build_reference_dit,
    dit_inputs,
    reference_audio_proj,
    reference_forward,
    seed_weights,
    write_wan_config,
)
from _parity_infinitetalk_ours import (
    ADAPTER_FILES,
    COLLIDING_KEY,
    FAULT_KEYS,
    IT_DIR,
    IT_RUNS,
    MOTION_FRAMES,
    SHARDS,
    SOURCE_VIDEO,
    WAN_INDEX,
    ItRun,
    adapter_for,
    broken_adapter_folder,
    colliding_folder,
    it_speech_files,
    source_path,
    write_source_video,
)
from _parity_ours import PARITY, cast_dit_inputs
from _parity_pipeline_cases import (
    _definitions,
    _reference_encoders,
    _tiny_buckets,
    center_crop,
    reference_audio,
    reference_wav2vec,
)
from _parity_pipeline_ours import NEGATIVE_PROMPT, PROMPT, WAV2VEC_DIR
from _parity_reference import Reference, reference_runtime
from diffusers.models.modeling_utils import ContextManagers, no_init_weights
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from multitalk_worker.models.configs import DiTConfig
from multitalk_worker.timeline import FRAMES_PER_CLIP
from multitalk_worker.weights.original import is_audio_key

Tensors = dict[str, Tensor]
Case = tuple[Tensors, Tensors]


# --------------------------------------------------------------------------- weights


def write_infinitetalk_weights(folder: Path, cfg: DiTConfig, ref: Reference, seed: int) -> Tensors:
    """The Wan base (the seed's tiny DiT without its audio keys) as seven shards with Wan's index and
    config.json, and the two adapters: the audio keys of the tiny DiT drawn with seeds +50 (single) and
    +60 (multi). Returns the base state."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in seed_weights(build_reference_dit(ref, cfg), seed).items() if not is_audio_key(k)}
    keys = sorted(base)
    weight_map = {}
    for shard, part in zip(SHARDS, np.array_split(np.array(keys, dtype=object), len(SHARDS)), strict=True):
        save_file({k: base[k] for k in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map |= {k: shard for k in part}
    total = sum(v.numel() * v.element_size() for v in base.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / WAN_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    write_wan_config(folder, cfg)
    for offset, name in ((50, "single"), (60, "multi")):
        state = seed_weights(build_reference_dit(ref, cfg), seed + offset)
        path = folder / ADAPTER_FILES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v for k, v in state.items() if is_audio_key(k)}, str(path), metadata={"format": "pt"})
    return base


# --------------------------------------------------------------------------- the reference's CPU stand-ins


class _FrameReader:
    """decord.VideoReader for what `extract_specific_frames` uses: `_num_frame` and `vr[i].asnumpy()`
    (RGB uint8), negative indices from the end. Every frame is decoded with PyAV (rgb24). `read` (a class
    attribute, set by frame_functions) collects the index of every frame returned."""

    read: list[int] = []

    def __init__(self, path: str, ctx: Any = None) -> None:
        with av.open(path) as container:
            self._frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        self._num_frame = len(self._frames)

    def __getitem__(self, index: int) -> Any:
        self.read.append(index % self._num_frame)
        frame = self._frames[index]
        return types.SimpleNamespace(asnumpy=frame.copy)


def _video_codec(path: str) -> str:
    """get_video_codec without ffprobe: the first video stream's codec name ('' if none)."""
    try:
        with av.open(path) as container:
            return container.streams.video[0].codec_context.name if container.streams.video else ""
    except av.FFmpegError:
        return ""


def _unavailable(what: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"parity: {what} is not available in the CPU parity run")

    return call


def frame_functions(ref: Reference, frame_ids: list[int]) -> dict[str, Any]:
    """`extract_specific_frames` / `is_video` from wan/utils/utils.py over the PyAV reader; the index of the
    source frame each call returns (after the reference's clamp to the last frame) is appended to
    `frame_ids`, -1 for an image."""
    namespace: dict[str, Any] = {"os": os, "gc": __import__("gc"), "Image": Image}
    reader = type("VideoReader", (_FrameReader,), {"read": frame_ids})
    namespace |= {"VideoReader": reader, "cpu": lambda i: None}
    fns = _definitions(
        ref.root / "wan" / "utils" / "utils.py", ("is_video", "extract_specific_frames"), namespace
    )
    extract = fns["extract_specific_frames"]

    def recorded(video_path: str, frame_id: int) -> Image.Image:
        before = len(frame_ids)
        frame = extract(video_path, frame_id)
        if len(frame_ids) == before:  # an image: the same picture for every index
            frame_ids.append(-1)
        return frame

    return {"extract_specific_frames": recorded, "is_video": fns["is_video"]}


class _RecordingVAE:
    """The reference WanVAE; records encode inputs (per call) and decode inputs (final latents)."""

    def __init__(self, vae: Any, record: dict[str, list[Tensor]]) -> None:
        self.vae, self.record = vae, record

    def encode(self, videos: Any) -> Any:
        out = self.vae.encode(videos)
        self.record["encode_in"].append(torch.stack(list(videos)).float().clone())
        self.record["encode_out"].append(torch.stack(out).float().clone())
        return out

    def decode(self, zs: list[Tensor]) -> Any:
        self.record["latents"].extend(z.float().clone() for z in zs)
        return self.vae.decode(zs)


# --------------------------------------------------------------------------- the pipeline object


def _config(dtype: torch.dtype) -> types.SimpleNamespace:
    """The fields of wan/configs' infinitetalk-14B config that __init__ and generate_infinitetalk read,
    at parity size (file names as the real config; the encoders are supplied, see the module doc)."""
    return types.SimpleNamespace(
        num_train_timesteps=1000,
        param_dtype=dtype,
        text_len=PARITY.text_encoder.text_len,
        t5_dtype=torch.float32,
        t5_checkpoint="models_t5_umt5-xxl-enc-bf16.pth",
        t5_tokenizer="google/umt5-xxl",
        vae_checkpoint="Wan2.1_VAE.pth",
        vae_stride=(4, 8, 8),
        patch_size=PARITY.dit.patch_size,
        clip_dtype=torch.float32,
        clip_checkpoint="models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        clip_tokenizer="xlm-roberta-large",
        sample_neg_prompt=NEGATIVE_PROMPT,
    )


def _wan_model_factory(ref: Reference, cfg: DiTConfig) -> Callable[..., nn.Module]:
    def wan_model(weight_init: bool = True, **config: Any) -> nn.Module:
        expected = {
            "dim": cfg.dim,
            "ffn_dim": cfg.ffn_dim,
            "num_layers": cfg.num_layers,
            "in_dim": cfg.in_dim,
        }
        if any(config.get(k) != v for k, v in expected.items()):
            raise RuntimeError(f"parity: config.json {config} is not the parity DiT")
        return build_reference_dit(ref, cfg)

    return wan_model


def infinitetalk_class(
    ref: Reference, encoders: tuple[Any, Any, Any] | None, record: dict[str, list[Any]]
) -> type:
    """InfiniteTalkPipeline compiled from wan/multitalk.py into a namespace of CPU stand-ins (module doc).
    `encoders` = (T5, CLIP, VAE) of the reference at parity size; None for load-only use."""
    utils = ref.multitalk_utils

    def match_and_blend_colors(*args: Any, **kwargs: Any) -> Tensor:
        out = utils.match_and_blend_colors(*args, **kwargs)
        record["videos"].append(out[0].float().clone())
        return out

    t5, clip, vae = encoders if encoders is not None else (None, None, None)
    namespace: dict[str, Any] = {
        "torch": torch, "np": np, "math": math, "random": random, "os": os, "json": json,
        "logging": logging, "importlib": importlib, "types": types, "Image": Image, "F": F, "nn": nn,
        "dist": dist, "partial": functools.partial, "contextmanager": contextlib.contextmanager,
        "tqdm": None,  # progress=False
        "transforms": types.SimpleNamespace(functional=types.SimpleNamespace(center_crop=center_crop)),
        "MomentumBuffer": utils.MomentumBuffer,
        "adaptive_projected_guidance": utils.adaptive_projected_guidance,
        "match_and_blend_colors": match_and_blend_colors,
        "load_file": load_file,
        "no_init_weights": no_init_weights,
        "ContextManagers": ContextManagers,
        # __init__ creates accelerate.init_empty_weights() and never enters it
        "accelerate": types.SimpleNamespace(init_empty_weights=contextlib.nullcontext),
        "shard_model": _unavailable("FSDP"),
        "WanModel": _wan_model_factory(ref, PARITY.dit),
        "T5EncoderModel": lambda **kw: t5,
        "CLIPModel": lambda **kw: clip,
        "WanVAE": lambda **kw: _RecordingVAE(vae, record) if vae is not None else None,
        "WanLoraWrapper": _unavailable("LoRA"),
        "get_video_codec": _video_codec,
        "convert_video_to_h264": _unavailable("the AV1 transcode (ffmpeg)"),
    }  # fmt: skip
    namespace |= frame_functions(ref, record["frame_ids"])
    names = ("torch_gc", "to_param_dtype_fp32only", "resize_and_centercrop", "timestep_transform")
    _definitions(ref.root / "wan" / "multitalk.py", (*names, "InfiniteTalkPipeline"), namespace)
    namespace["torch_gc"] = lambda: None  # torch.cuda.empty_cache / ipc_collect: CUDA only
    return namespace["InfiniteTalkPipeline"]


def _new_record() -> dict[str, list[Any]]:
    return {"videos": [], "latents": [], "encode_in": [], "encode_out": [], "frame_ids": []}


def reference_pipeline(
    ref: Reference,
    dit_root: Path,
    adapter: str,
    dtype: torch.dtype,
    encoders: tuple[Any, Any, Any] | None = None,
    record: dict[str, list[Any]] | None = None,
) -> Any:
    """InfiniteTalkPipeline(config, checkpoint_dir=dit_root, infinitetalk_dir=dit_root/adapter): its own
    __init__ (DiT in `dtype`, on the CPU: init_on_cpu, no FSDP/USP/LoRA/quant), then device = cpu."""
    cls = infinitetalk_class(ref, encoders, record if record is not None else _new_record())
    with reference_runtime():
        pipe = cls(
            config=_config(dtype),
            checkpoint_dir=str(dit_root),
            infinitetalk_dir=str(dit_root / adapter),
            init_on_cpu=True,
        )
    pipe.device = torch.device("cpu")
    return pipe


# --------------------------------------------------------------------------- stages


def load_cases(ref: Reference, dit_root: Path) -> dict[str, Case]:
    """The DiT state after __init__ (bf16 and float32; single and multi adapter), and whether __init__
    refuses an adapter with a key missing / an extra key (1 = refused with load_state_dict's error)."""
    cases: dict[str, Case] = {}
    for name, adapter in ADAPTER_FILES.items():
        for tag, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
            if name == "multi" and tag == "f32":
                continue  # the float32 load is the file values; once is enough
            state = reference_pipeline(ref, dit_root, adapter, dtype).model.state_dict()
            cases[f"it_load_{name}_{tag}"] = ({}, {k: v.clone() for k, v in state.items()})
    refused = {}
    for fault in FAULT_KEYS:
        broken = broken_adapter_folder(dit_root, dit_root.parent / f"broken_{fault}", fault)
        try:
            reference_pipeline(ref, broken, ADAPTER_FILES["single"], torch.bfloat16)
            refused[fault] = torch.tensor(0)
        except RuntimeError as exc:  # load_state_dict(strict=True): "Missing key(s)" / "Unexpected key(s)"
            expected = {"missing": "Missing key(s)", "extra": "Unexpected key(s)"}[fault]
            refused[fault] = torch.tensor(int(expected in str(exc)))
    cases["it_load_refuses"] = ({}, refused)
    colliding = colliding_folder(dit_root, dit_root.parent / "colliding")
    state = reference_pipeline(ref, colliding, ADAPTER_FILES["single"], torch.bfloat16).model.state_dict()
    cases["it_load_collision"] = ({}, {"value": state[COLLIDING_KEY].float()})
    return cases


def dit_cases(ref: Reference, dit_root: Path, persons: list[int], seed: int) -> dict[str, Case]:
    """One forward of the __init__-loaded DiT (float32 and bf16) with the adapter for P persons, and its
    audio projector in bf16 (InfiniteTalk's float32 output norm, spec 3.1)."""
    cfg = PARITY.dit
    cases: dict[str, Case] = {}
    for p in persons:
        inputs = dit_inputs(cfg, p, seed)
        for tag, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            model = reference_pipeline(ref, dit_root, adapter_for(p), dtype).model
            cases[f"it_dit_{p}p_{tag}"] = (inputs, {"out": reference_forward(model, cfg, inputs, dtype)})
            if tag == "bf16":
                audio = cast_dit_inputs(inputs, dtype)["audio"]
                tokens = reference_audio_proj(model, cfg, audio)
                cases[f"it_audio_proj_{p}p_bf16"] = ({"audio": audio}, {"tokens": tokens.to(dtype).float()})
    return cases


def generate_case(
    ref: Reference, root: Path, work: Path, run: ItRun, seed: int, encoders: tuple[Any, Any, Any]
) -> Tensors:
    """generate_infinitetalk on the run's source and the reference's own embeddings of its speech.
    Returns per clip `latent_<k>` (final latent), `video_<k>` (decoded, colour-corrected clip),
    `ref_frame_<k>` (the reference frame of `y`, [3, H, W] in [-1, 1]), `motion_<k>` (the clean motion
    latent written into x); `frame_ids` (the source frame each clip's reference is, -1 for an image,
    which the reference re-reads for every clip), `frames` (uint8 [N, H, W, 3], save_video_ffmpeg's rule)."""
    dit_root = root / IT_DIR
    record = _new_record()
    pipe = reference_pipeline(ref, dit_root, adapter_for(run.persons), torch.float32, encoders, record)
    cond_audio = {}
    for p, emb in enumerate(reference_embeddings(ref, root, work, run), 1):
        path = work / f"{run.name}_{p}.pt"
        torch.save(emb, path)
        cond_audio[f"person{p}"] = str(path)
    input_data = {"prompt": PROMPT, "cond_video": str(source_path(run, dit_root)), "cond_audio": cond_audio}
    with _tiny_buckets(ref), reference_runtime(), contextlib.redirect_stdout(io.StringIO()):
        video = pipe.generate_infinitetalk(
            input_data,
            size_buckget="infinitetalk-480",
            motion_frame=MOTION_FRAMES,
            frame_num=FRAMES_PER_CLIP,
            shift=run.shift,
            sampling_steps=run.steps,
            text_guide_scale=run.text_scale,
            audio_guide_scale=run.audio_scale,
            seed=seed,
            offload_model=False,
            max_frames_num=run.max_frames(),
            progress=False,
            color_correction_strength=run.color_correction,
            extra_args=types.SimpleNamespace(use_teacache=False, use_apg=False, size="infinitetalk-480"),
        )
    return _outputs(record, video, run)


def _outputs(record: dict[str, list[Any]], video: Tensor, run: ItRun) -> Tensors:
    clips = len(record["latents"])
    # two encodes per clip: y (reference frame + 80 zeros), then the motion frames
    y_in, motion = record["encode_in"][0::2], record["encode_out"][1::2]
    if len(y_in) != clips or len(motion) != clips:
        raise RuntimeError(f"parity: {len(record['encode_in'])} VAE encodes for {clips} clips")
    out: Tensors = {}
    for k in range(clips):
        out[f"latent_{k}"] = record["latents"][k]
        out[f"video_{k}"] = record["videos"][k]
        out[f"ref_frame_{k}"] = y_in[k][0, :, 0]  # [3, H, W]
        out[f"motion_{k}"] = motion[k][0]  # [16, Tm, h, w]
    out["frame_ids"] = torch.tensor(record["frame_ids"])
    frames = ((video.permute(1, 2, 3, 0).numpy() + 1) / 2 * 255).clip(0, 255).astype(np.uint8)
    out["frames"] = torch.from_numpy(frames)
    return out


def reference_embeddings(ref: Reference, root: Path, work: Path, run: ItRun) -> list[Tensor]:
    """audio_prepare_single (one person) or audio_prepare_multi(..., "para") and get_embedding from
    generate_infinitetalk.py, as its generate() does."""
    it_speech_files(work)
    fns = reference_audio(ref)
    extractor, encoder = reference_wav2vec(ref, root / WAV2VEC_DIR)
    paths = [str(work / f) for f in run.speech]
    if len(paths) == 1:
        tracks = [fns["audio_prepare_single"](paths[0])]
    else:
        s1, s2, _ = fns["audio_prepare_multi"](paths[0], paths[1], "para")
        tracks = [s1, s2]
    with reference_runtime():
        return [ref.get_embedding(t, extractor, encoder, sr=16000, device="cpu").float() for t in tracks]


def infinitetalk_cases(
    ref: Reference, root: Path, seed: int, persons: list[int], pipeline: bool = True
) -> dict[str, Case]:
    """Write the InfiniteTalk DiT folder and the source video under root/IT_DIR (the encoder folders must
    already be under root) and return every stage's inputs and reference outputs."""
    dit_root = root / IT_DIR
    write_infinitetalk_weights(dit_root, PARITY.dit, ref, seed)
    write_source_video(dit_root / SOURCE_VIDEO)
    cases = load_cases(ref, dit_root)
    cases |= dit_cases(ref, dit_root, persons, seed)
    if pipeline:
        import tempfile

        seed_input = {"seed": torch.tensor([seed])}
        with tempfile.TemporaryDirectory(prefix="parity-it-ref-") as tmp:
            work = Path(tmp)
            encoders = _reference_encoders(ref, root, work)
            for run in IT_RUNS:
                if run.persons in persons:
                    cases[run.name] = (seed_input, generate_case(ref, root, work, run, seed, encoders))
    return cases
