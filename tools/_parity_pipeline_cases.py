"""Reference side of the two pipeline-level parity stages (see tools/_parity_pipeline_ours.py for ours).

* Speech: the reference's own `audio_prepare_single` / `audio_prepare_multi` / `loudness_norm` /
  `get_embedding`, compiled alone from the entry script (generate_multitalk.py), on the committed example
  tracks (and a 22.05 kHz stereo copy of one), with the reference Wav2Vec2Model loaded from the parity
  wav2vec2 folder.
  `librosa.load` is the real librosa (0.11, soxr_hq) when installed; otherwise a stand-in that reads 16-bit
  PCM WAV at its own 16 kHz rate exactly as libsndfile does (x / 32768), which is all librosa does for the
  16 kHz files; the 22.05 kHz case then fails with "install librosa".
* Generation: `MultiTalkPipeline.generate` from wan/multitalk.py (the class and its helpers compiled alone
  from the source: the module's imports pull in FSDP, quantisation, LoRA and video-writing packages that
  `generate` does not use). The object is made without its __init__ (which loads the 14B checkpoints);
  the attributes `generate` reads are set to the reference's own modules built at parity size and loaded
  from the parity weight files: WanModel, T5EncoderModel (with our tiny tokenizer saved as a Hugging Face
  tokenizer folder, read by the reference's HuggingfaceTokenizer), CLIPModel, WanVAE. Replaced for the CPU:
  `torch_gc` (CUDA cache calls) is a no-op, `offload_model=False` (it calls torch.cuda.synchronize),
  torchvision's `center_crop` (torchvision is not installed) is computed exactly as torchvision does, and the
  480p bucket table is swapped for our tiny one (same selection rule) so 81-frame clips run in seconds.
  Noise comes from the CPU default generator that `generate` seeds itself (`torch.manual_seed(seed)`).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import math
import os
import random
import subprocess
import tempfile
import types
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyloudnorm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _parity_cases import (
    CLIP_FILE,
    T5_FILE,
    VAE_FILE,
    _swap,
    build_reference_dit,
    clip_reference_kwargs,
    read_dit_weights,
    t5_reference_kwargs,
)
from _parity_ours import CLIP_DIR, DIT_DIR, PARITY, T5_DIR, VAE_DIR, WAV2VEC_DIR
from _parity_pipeline_ours import (
    EXAMPLES,
    FRAMES_KEY,
    FRAMES_PER_CLIP,
    GENERATE_RUNS,
    MOTION_FRAMES,
    NEGATIVE_PROMPT,
    PROMPT,
    REFERENCE_MODE,
    SPEECH_CASES,
    GenerateRun,
    speech_files,
)
from _parity_reference import Reference, partial_module_fn, reference_runtime
from PIL import Image
from torch import Tensor, nn

from multitalk_worker.pipeline.image import BUCKETS_TINY
from multitalk_worker.tiny import build_tiny_tokenizer

Tensors = dict[str, Tensor]


def _definitions(path: Path, names: tuple[str, ...], namespace: dict[str, Any]) -> dict[str, Any]:
    """Compile top-level functions/classes of a script alone into `namespace` (not its imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in names]
    if {n.name for n in nodes} != set(names):
        raise RuntimeError(f"{path}: missing definitions {set(names) - {n.name for n in nodes}}")
    code = compile(ast.Module(body=nodes, type_ignores=[]), filename=str(path), mode="exec")
    exec(code, namespace)  # noqa: S102 - the reference's definitions, compiled from the checkout
    return namespace


# --------------------------------------------------------------------------- speech


def _librosa() -> types.ModuleType:
    try:
        import librosa

        return librosa
    except ImportError:
        return types.SimpleNamespace(load=_load_wav_16k)  # type: ignore[return-value]


def _load_wav_16k(path: str, sr: int = 16000) -> tuple[np.ndarray, int]:
    """librosa.load for a mono 16-bit PCM WAV already at `sr`: float32 x / 32768 (libsndfile's scaling).
    Other files (the 22.05 kHz stereo case) need the real librosa: its resampler is what is checked."""
    with wave.open(path) as f:
        if (f.getframerate(), f.getsampwidth(), f.getnchannels()) != (sr, 2, 1):
            raise RuntimeError(f"parity: {Path(path).name} is not mono 16-bit {sr} Hz; install librosa")
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return (pcm.astype(np.float32) / 32768.0), sr


def reference_audio(ref: Reference) -> dict[str, Any]:
    namespace: dict[str, Any] = {"np": np, "os": os, "pyln": pyloudnorm, "librosa": _librosa()}
    namespace["subprocess"] = subprocess
    names = ("loudness_norm", "audio_prepare_single", "audio_prepare_multi", "extract_audio_from_video")
    return _definitions(ref.script, names, namespace)


def reference_wav2vec(ref: Reference, folder: Path) -> tuple[Any, Any]:
    """As the reference's custom_init, with eager attention (see _parity_cases.wav2vec_case)."""
    from transformers import Wav2Vec2FeatureExtractor

    encoder = ref.wav2vec2.Wav2Vec2Model.from_pretrained(
        str(folder), local_files_only=True, attn_implementation="eager"
    )
    encoder.feature_extractor._freeze_parameters()
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    return extractor, encoder.eval()


def speech_case(ref: Reference, root: Path, work: Path) -> tuple[Tensors, Tensors]:
    """Reference signals and features for every speech case (keys as `_parity_pipeline_ours.run_speech`).
    `<case>/mix` is the soundtrack as written to sum.wav (soundfile clips to [-1, 1] for 16-bit PCM)."""
    speech_files(work)
    fns = reference_audio(ref)
    extractor, encoder = reference_wav2vec(ref, root / WAV2VEC_DIR)
    signals, features = {}, {}
    for case in SPEECH_CASES:
        paths = [str(work / f) for f in case.files]
        if len(paths) == 1:
            tracks = [fns["audio_prepare_single"](paths[0])]
            mix = tracks[0]
        else:
            s1, s2, mix = fns["audio_prepare_multi"](paths[0], paths[1], REFERENCE_MODE[case.mode])
            tracks = [s1, s2]
        for p, track in enumerate(tracks, 1):
            signals[f"{case.name}/s{p}"] = torch.from_numpy(np.asarray(track))
            with reference_runtime():
                emb = ref.get_embedding(track, extractor, encoder, sr=16000, device="cpu")
            features[f"{case.name}/f{p}"] = emb.float()
        signals[f"{case.name}/mix"] = torch.from_numpy(np.clip(np.asarray(mix), -1.0, 1.0))
    return signals, features


# --------------------------------------------------------------------------- generation


def center_crop(img: Tensor, output_size: tuple[int, int] | list[int]) -> Tensor:
    """torchvision.transforms.functional.center_crop for a tensor no smaller than the crop."""
    height, width = img.shape[-2:]
    crop_h, crop_w = output_size
    if crop_h > height or crop_w > width:
        raise RuntimeError("parity: center_crop with padding is not needed here")
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return img[..., top : top + crop_h, left : left + crop_w]


class _RecordingVAE:
    """The reference WanVAE, recording the latents handed to decode (the final latent of each clip)."""

    def __init__(self, vae: Any, latents: list[Tensor]) -> None:
        self.vae, self.latents = vae, latents

    def encode(self, videos: Any) -> Any:
        return self.vae.encode(videos)

    def decode(self, zs: list[Tensor]) -> Any:
        self.latents.extend(z.float().clone() for z in zs)
        return self.vae.decode(zs)


def reference_pipeline_class(ref: Reference, videos: list[Tensor]) -> type:
    """MultiTalkPipeline and its helpers from wan/multitalk.py; colour-corrected clips go to `videos`."""
    utils = ref.multitalk_utils

    def match_and_blend_colors(*args: Any, **kwargs: Any) -> Tensor:
        out = utils.match_and_blend_colors(*args, **kwargs)
        videos.append(out[0].float().clone())
        return out

    namespace: dict[str, Any] = {
        "torch": torch,
        "np": np,
        "math": math,
        "random": random,
        "os": os,
        "importlib": importlib,
        "Image": Image,
        "F": F,
        "nn": nn,
        "dist": dist,
        "partial": functools.partial,
        "contextmanager": contextlib.contextmanager,
        "tqdm": None,  # progress=False
        "transforms": types.SimpleNamespace(functional=types.SimpleNamespace(center_crop=center_crop)),
        "MomentumBuffer": utils.MomentumBuffer,
        "adaptive_projected_guidance": utils.adaptive_projected_guidance,
        "match_and_blend_colors": match_and_blend_colors,
    }
    names = ("torch_gc", "resize_and_centercrop", "timestep_transform", "MultiTalkPipeline")
    _definitions(ref.root / "wan" / "multitalk.py", names, namespace)
    namespace["torch_gc"] = lambda: None  # torch.cuda.empty_cache / ipc_collect: CUDA only
    return namespace["MultiTalkPipeline"]


def _reference_encoders(ref: Reference, root: Path, work: Path) -> tuple[Any, Any, Any]:
    """T5EncoderModel, CLIPModel and WanVAE of the reference at parity size, loaded by their own code."""
    tokenizer_dir = work / "tokenizer"
    build_tiny_tokenizer(max_length=PARITY.text_encoder.text_len).save_pretrained(str(tokenizer_dir))

    class _NoTokenizer:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    c = PARITY.vae
    vae_kwargs = {"dim": c.base_dim, "dim_mult": list(c.dim_mult), "num_res_blocks": c.num_res_blocks}
    vae_kwargs["temperal_downsample"] = list(c.temperal_downsample)
    undo = [
        partial_module_fn(ref.t5, "umt5_xxl", **t5_reference_kwargs()),
        partial_module_fn(ref.clip, "clip_xlm_roberta_vit_h_14", **clip_reference_kwargs()),
        _swap(ref.clip, "HuggingfaceTokenizer", _NoTokenizer),
        partial_module_fn(ref.vae, "_video_vae", **vae_kwargs),
    ]
    cpu = torch.device("cpu")
    try:
        with reference_runtime():
            t5 = ref.t5.T5EncoderModel(
                text_len=PARITY.text_encoder.text_len,
                dtype=torch.float32,
                device=cpu,
                checkpoint_path=str(root / T5_DIR / T5_FILE),
                tokenizer_path=str(tokenizer_dir),
            )
            clip_file = str(root / CLIP_DIR / CLIP_FILE)
            clip = ref.clip.CLIPModel(
                dtype=torch.float32, device="cpu", checkpoint_path=clip_file, tokenizer_path="unused"
            )
            vae = ref.vae.WanVAE(
                z_dim=c.z_dim, vae_pth=str(root / VAE_DIR / VAE_FILE), dtype=torch.float32, device="cpu"
            )
    finally:
        for u in undo:
            u()
    return t5, clip, vae


def reference_pipeline(
    ref: Reference, root: Path, work: Path, videos: list[Tensor], latents: list[Tensor]
) -> Any:
    """A MultiTalkPipeline object with the attributes `generate` reads (as __init__ would set them for a
    single-GPU float32 run without offloading, TeaCache, quantisation or LoRA)."""
    cls = reference_pipeline_class(ref, videos)
    pipe = cls.__new__(cls)
    model = build_reference_dit(ref, PARITY.dit)
    model.load_state_dict(read_dit_weights(root / DIT_DIR), strict=True)
    t5, clip, vae = _reference_encoders(ref, root, work)
    attrs = {
        "device": torch.device("cpu"),
        "config": None,
        "rank": 0,
        "use_usp": False,
        "t5_cpu": False,
        "param_dtype": torch.float32,
        "num_train_timesteps": 1000,
        "num_timesteps": 1000,
        "use_timestep_transform": True,
        "vae_stride": (4, 8, 8),
        "patch_size": PARITY.dit.patch_size,
        "sp_size": 1,
        "sample_neg_prompt": NEGATIVE_PROMPT,
        "cpu_offload": False,
        "model_names": ["model"],
        "vram_management": False,
        "model": model,
        "text_encoder": t5,
        "clip": clip,
        "vae": _RecordingVAE(vae, latents),
    }
    for key, value in attrs.items():
        setattr(pipe, key, value)
    return pipe


@contextlib.contextmanager
def _tiny_buckets(ref: Reference) -> Iterator[None]:
    """The reference's 480p table replaced by our tiny table, in its format {key: ([H, W], 1)}."""
    table = {key: ([h, w], 1) for key, (h, w) in BUCKETS_TINY.items()}
    undo: Callable[[], Any] = _swap(ref.multitalk_utils, "ASPECT_RATIO_627", table)
    deterministic = torch.backends.cudnn.deterministic
    try:
        yield
    finally:
        undo()
        torch.backends.cudnn.deterministic = deterministic


def generate_case(
    ref: Reference, root: Path, work: Path, run: GenerateRun, seed: int, embeddings: list[Tensor]
) -> tuple[Tensors, Tensor]:
    """`generate` on the run's image and the reference's own embeddings of its speech (saved as .pt files
    as generate_multitalk.py does). Returns (latents and colour-corrected videos per clip, output frames
    as uint8 by the rule of save_video_ffmpeg)."""
    videos: list[Tensor] = []
    latents: list[Tensor] = []
    pipe = reference_pipeline(ref, root, work, videos, latents)
    cond_audio = {}
    for p, emb in enumerate(embeddings, 1):
        path = work / f"{run.name}_{p}.pt"
        torch.save(emb, path)
        cond_audio[f"person{p}"] = str(path)
    input_data = {"prompt": PROMPT, "cond_image": str(EXAMPLES / run.image), "cond_audio": cond_audio}
    with _tiny_buckets(ref), reference_runtime():
        video = pipe.generate(
            input_data,
            size_buckget="multitalk-480",
            motion_frame=MOTION_FRAMES,
            frame_num=FRAMES_PER_CLIP,
            shift=run.shift,
            sampling_steps=run.steps,
            text_guide_scale=run.text_scale,
            audio_guide_scale=run.audio_scale,
            n_prompt=NEGATIVE_PROMPT,
            seed=seed,
            offload_model=False,
            max_frames_num=1000,
            progress=False,
            color_correction_strength=run.color_correction,
            extra_args=types.SimpleNamespace(use_teacache=False, use_apg=False),
        )
    out = {f"latent_{k}": v for k, v in enumerate(latents)} | {f"video_{k}": v for k, v in enumerate(videos)}
    frames = ((video.permute(1, 2, 3, 0).numpy() + 1) / 2 * 255).clip(0, 255).astype(np.uint8)
    return out, torch.from_numpy(frames)


# --------------------------------------------------------------------------- stages


def pipeline_cases(ref: Reference, root: Path, seed: int) -> dict[str, tuple[Tensors, Tensors]]:
    """Reference inputs (the seed; the files are the committed examples) and outputs of every pipeline
    stage, from the weight folders under `root`. Each generation run uses the reference's own embeddings
    of its speech case."""
    seed_input = {"seed": torch.tensor([seed])}
    with tempfile.TemporaryDirectory(prefix="parity-ref-") as tmp:
        work = Path(tmp)
        signals, features = speech_case(ref, root, work)
        cases = {
            "audio_prepare_speech": (seed_input, signals),
            "audio_features_speech": (seed_input, features),
        }
        for run in GENERATE_RUNS:
            embeddings = [features[f"{run.speech}/f{p}"] for p in range(1, len(run.case.files) + 1)]
            outputs, frames = generate_case(ref, root, work, run, seed, embeddings)
            cases[run.name] = (seed_input, outputs | {FRAMES_KEY: frames})
    return cases
