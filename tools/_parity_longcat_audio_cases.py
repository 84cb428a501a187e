"""The reference side of LongCat-Video-Avatar's audio and sampling parity (meituan-longcat/LongCat-Video
@ 6b3f4b8), run from a checkout that is not modified.

What runs, and how it is reached without the checkout's GPU imports:

* the scheduler: `longcat_video.modules.scheduling_flow_match_euler_discrete` imported as is;
* `LongCatVideoAvatarPipeline` methods (`get_timesteps_sigmas`, `get_audio_embedding_whisper`,
  `get_audio_embedding_wav2vec2`, `_loudness_norm`, `_add_noise_floor`, `_smooth_transients` and the two
  step-count properties) compiled from the class's source into a bare class (the module imports the DiT,
  the VAE and flash-attention at import time); the continuation's `enhance_hf` block and the guidance
  expression are the `if enhance_hf:` statement of `generate_avc` and the `noise_pred = ...` statement of
  `generate_ai2v`, compiled from the source and run on our inputs;
* the demo scripts' `audio_prepare_multi` (padding, `para`/`add`) and the window statements of the single
  script's `generate` (`indices`, `audio_start_idx`, `audio_end_idx`, `center_indices`, `audio_emb`, in
  source order; the ones inside its segment loop once per continuation);
* `audio_process.get_audio_encoder` / `get_audio_feature_extractor` and `Wav2Vec2ModelWrapper`, with
  `audio_process/torch_utils.py` replaced by its `linear_interpolation` alone (the module imports video and
  distributed packages) and `Wav2Vec2Mode._autoset_attn_implementation` (gone from transformers 5)
  answering the config unchanged; transformers >= 5 collects hidden states through hooks, so the
  reference subclass's forward gets the library's `capture_outputs` as in tools/_parity_reference.py;
* `WhisperModel.from_pretrained` loads float32 weights, as transformers 4.41 (the reference's pin) does
  (transformers 5 would keep the checkpoint's float16 and run the encoder in it).

The global NumPy RNG is seeded before each v1.0 stage (the reference never seeds it) so that its noise
floor is reproducible; our side seeds `np.random.RandomState` alike.
"""

from __future__ import annotations

import ast
import importlib
import math
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from _parity_longcat_audio_ours import (  # noqa: E402
    AUDIO_STAGES,
    NOISE_SEED,
    SCHEDULES,
    WAV2VEC_DIR,
    WHISPER_DIR,
    WINDOW_SEGMENTS,
    Tensors,
    digest,
    stage_signals,
)
from _parity_reference import _namespace_package, _restore_hidden_state_capture  # noqa: E402

PIPELINE_METHODS = (
    "num_timesteps",
    "num_distill_sample_steps",
    "get_timesteps_sigmas",
    "_loudness_norm",
    "_add_noise_floor",
    "_smooth_transients",
    "get_audio_embedding",
    "get_audio_embedding_whisper",
    "get_audio_embedding_wav2vec2",
)
WINDOW_NAMES = {"indices", "audio_start_idx", "audio_end_idx", "center_indices", "audio_emb"}


@dataclass
class LongCatReference:
    root: Path
    scheduler_cls: type
    pipe_cls: type
    audio_prepare_multi: Any
    get_audio_encoder: Any
    get_audio_feature_extractor: Any
    enhance_hf: types.CodeType
    guidance: types.CodeType
    windows_first: types.CodeType
    windows_next: types.CodeType


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _function(tree: ast.AST, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def _compile(nodes: list[ast.stmt], path: Path) -> types.CodeType:
    module = ast.fix_missing_locations(ast.Module(body=nodes, type_ignores=[]))
    return compile(module, filename=str(path), mode="exec")


def _pipeline_class(path: Path, namespace: dict[str, Any]) -> type:
    """The pipeline's audio and schedule methods on a bare class (no DiT, VAE or text encoder)."""
    cls = next(n for n in ast.walk(_tree(path)) if isinstance(n, ast.ClassDef))
    body = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in PIPELINE_METHODS]
    bare = ast.ClassDef(
        name="AvatarAudio", bases=[], keywords=[], body=body, decorator_list=[], type_params=[]
    )
    ast.copy_location(bare, cls)
    exec(_compile([bare], path), namespace)  # noqa: S102 - reference methods, compiled from the checkout
    return namespace["AvatarAudio"]


def _window_statements(path: Path) -> tuple[types.CodeType, types.CodeType]:
    """The single script's window assignments: before its segment loop, and inside it."""
    generate = _function(_tree(path), "generate")
    loop = next(
        n for n in ast.walk(generate) if isinstance(n, ast.For) and ast.unparse(n.target) == "segment_idx"
    )

    def assigns(nodes: list[ast.stmt]) -> list[ast.stmt]:
        return [
            n
            for n in nodes
            if isinstance(n, ast.Assign) and any(ast.unparse(t) in WINDOW_NAMES for t in n.targets)
        ]

    first = [n for n in assigns(list(generate.body)) if n.lineno < loop.lineno]
    return _compile(first, path), _compile(assigns(loop.body), path)


def _statement(
    function: ast.FunctionDef, path: Path, test: str | None = None, target: str | None = None
) -> Any:
    for node in ast.walk(function):
        if test and isinstance(node, ast.If) and ast.unparse(node.test) == test:
            return _compile([node], path)
        if target and isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == target:
            if "text_guidance_scale" in ast.unparse(node.value):
                return _compile([node], path)
    raise LookupError(f"no {test or target} statement in {function.name}")


class _Float32Loads:
    """`cls.from_pretrained` as transformers 4.41 (the reference's pin) runs it: float32 weights whatever
    the checkpoint's dtype (transformers 5 keeps the float16 of whisper-large-v3's model.safetensors)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        return self.cls.from_pretrained(*args, dtype=torch.float32, **kwargs)


def load_longcat_reference(root: Path) -> LongCatReference:
    root = root.resolve()
    sys.path.insert(0, str(root))
    package = root / "longcat_video"
    _namespace_package("longcat_video", package)
    _namespace_package("longcat_video.audio_process", package / "audio_process")
    utils = types.ModuleType("longcat_video.audio_process.torch_utils")
    utils_ns: dict[str, Any] = {"F": F, "torch": torch}
    exec(
        _compile(
            [_function(_tree(package / "audio_process/torch_utils.py"), "linear_interpolation")], package
        ),
        utils_ns,
    )  # noqa: S102
    utils.linear_interpolation = utils_ns["linear_interpolation"]
    sys.modules[utils.__name__] = utils
    from transformers.models.wav2vec2 import modeling_wav2vec2

    original_init = modeling_wav2vec2.Wav2Vec2PositionalConvEmbedding.__init__
    wav2vec2 = importlib.import_module("longcat_video.audio_process.wav2vec2")
    modeling_wav2vec2.Wav2Vec2PositionalConvEmbedding.__init__ = original_init  # undo its import-time patch
    if not hasattr(wav2vec2.Wav2Vec2Mode, "_autoset_attn_implementation"):
        wav2vec2.Wav2Vec2Mode._autoset_attn_implementation = classmethod(lambda cls, config, **_: config)
    _restore_hidden_state_capture(wav2vec2.Wav2Vec2Mode)
    scheduler = importlib.import_module("longcat_video.modules.scheduling_flow_match_euler_discrete")
    import librosa
    import pyloudnorm
    import scipy.signal
    from einops import rearrange
    from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperModel

    namespace: dict[str, Any] = {
        "torch": torch, "np": np, "F": F, "math": math, "pyln": pyloudnorm, "ss": scipy.signal,
        "rearrange": rearrange, "librosa": librosa, "Wav2Vec2ModelWrapper": wav2vec2.Wav2Vec2ModelWrapper,
        "Wav2Vec2FeatureExtractor": Wav2Vec2FeatureExtractor, "WhisperModel": _Float32Loads(WhisperModel),
        "AutoFeatureExtractor": AutoFeatureExtractor,
    }  # fmt: skip
    pipeline_path = package / "pipeline_longcat_video_avatar.py"
    pipe_cls = _pipeline_class(pipeline_path, namespace)
    init_tree = _tree(package / "audio_process/__init__.py")
    for name in ("get_audio_encoder", "get_audio_feature_extractor"):
        exec(_compile([_function(init_tree, name)], package), namespace)  # noqa: S102
    multi = root / "run_demo_avatar_multi_audio_to_video.py"
    exec(_compile([_function(_tree(multi), "audio_prepare_multi")], multi), namespace)  # noqa: S102
    pipeline_tree = _tree(pipeline_path)
    first, following = _window_statements(root / "run_demo_avatar_single_audio_to_video.py")
    return LongCatReference(
        root=root,
        scheduler_cls=scheduler.FlowMatchEulerDiscreteScheduler,
        pipe_cls=pipe_cls,
        audio_prepare_multi=namespace["audio_prepare_multi"],
        get_audio_encoder=namespace["get_audio_encoder"],
        get_audio_feature_extractor=namespace["get_audio_feature_extractor"],
        enhance_hf=_statement(_function(pipeline_tree, "generate_avc"), pipeline_path, test="enhance_hf"),
        guidance=_statement(_function(pipeline_tree, "generate_ai2v"), pipeline_path, target="noise_pred"),
        windows_first=first,
        windows_next=following,
    )


def _pipe(ref: LongCatReference, model_type: str, encoder: Any = None, extractor: Any = None) -> Any:
    pipe = ref.pipe_cls()
    pipe.model_type = model_type
    pipe._num_timesteps = 1000
    pipe._num_distill_sample_steps = 8 if model_type == "avatar-v1.5" else 50
    pipe.audio_encoder, pipe.audio_feature_extractor = encoder, extractor
    return pipe


def schedule_case(ref: LongCatReference, stage: str) -> Tensors:
    """The scheduler's timesteps and sigmas after set_timesteps (and the enhance_hf block), and the bf16
    timesteps the pipeline hands the DiT (`t.expand(...).to(dit_dtype)`)."""
    mode, steps, shift, hf = SCHEDULES[stage]
    pipe = _pipe(ref, "avatar-v1.5" if mode == "distill" else "avatar-v1.0")
    scheduler = ref.scheduler_cls(shift=shift)
    sigmas = pipe.get_timesteps_sigmas(steps, use_distill=mode != "default")
    scheduler.set_timesteps(steps, sigmas=sigmas, device="cpu")
    timesteps = scheduler.timesteps
    if hf:
        space: dict[str, Any] = {
            "timesteps": timesteps,
            "np": np,
            "torch": torch,
            "device": "cpu",
            "self": pipe,
        }
        pipe.scheduler = scheduler
        exec(ref.enhance_hf, space | {"enhance_hf": True})  # noqa: S102
        timesteps = scheduler.timesteps
    model = torch.stack([t.expand(1).to(torch.bfloat16)[0] for t in timesteps]).float()
    return {"timesteps": timesteps.clone(), "sigmas": scheduler.sigmas.clone(), "model_timesteps": model}


def step_case(ref: LongCatReference, seed: int) -> tuple[Tensors, Tensors]:
    """scheduler.step on the negated prediction at steps 0, 17 and 49 of the 50-step shift-12 schedule,
    and the guidance expression of generate_ai2v."""
    gen = torch.Generator().manual_seed(seed + 300)
    shape = (1, 16, 3, 4, 6)
    inputs = {
        k: torch.randn(shape, generator=gen) for k in ("latent", "velocity", "cond", "drop_text", "uncond")
    }
    pipe = _pipe(ref, "avatar-v1.0")
    scheduler = ref.scheduler_cls(shift=12.0)
    scheduler.set_timesteps(50, sigmas=pipe.get_timesteps_sigmas(50), device="cpu")
    out: Tensors = {}
    for step in (0, 17, 49):
        scheduler._step_index = step
        t = scheduler.timesteps[step]
        out[f"step_{step}"] = scheduler.step(
            -inputs["velocity"], t, inputs["latent"].clone(), return_dict=False
        )[0]
    space = {
        "noise_pred_uncond": inputs["uncond"], "noise_pred_cond": inputs["cond"],
        "noise_pred_uncond_text": inputs["drop_text"],
        "text_guidance_scale": 4.0, "audio_guidance_scale": 2.5,
    }  # fmt: skip
    exec(ref.guidance, space)  # noqa: S102
    out["guided"] = space["noise_pred"]
    return inputs, out


def _write_wav(path: Path, samples: np.ndarray) -> str:
    soundfile.write(str(path), samples, 16000, subtype="FLOAT")
    return str(path)


def audio_case(ref: LongCatReference, stage: str, fixtures: Path, seed: int) -> tuple[Tensors, Tensors]:
    """The scripts' padding (audio_prepare_multi), the pipeline's get_audio_embedding per stream, and the
    single script's window statements for every segment."""
    version, _, audio_type, segments, others = AUDIO_STAGES[stage]
    signals = stage_signals(stage, seed)
    model_type, fps, stride = ("avatar-v1.5", 25, 1) if version == "1.5" else ("avatar-v1.0", 16, 2)
    folder = fixtures / (WHISPER_DIR if version == "1.5" else WAV2VEC_DIR)
    if version == "1.5":
        encoder = ref.get_audio_encoder(str(folder), model_type)
    else:
        wrapper = ref.get_audio_encoder.__globals__["Wav2Vec2ModelWrapper"]
        encoder = wrapper(str(folder), device="cpu")
        encoder.model.feature_extractor._freeze_parameters()
    pipe = _pipe(ref, model_type, encoder, ref.get_audio_feature_extractor(str(folder), model_type))
    duration = 93 / fps + (segments - 1) * (93 - 13) / fps  # the scripts' generate_duration
    with tempfile.TemporaryDirectory() as tmp:
        paths = [_write_wav(Path(tmp) / f"p{i}.wav", s) for i, s in enumerate(signals)]
        right = paths[1] if len(paths) > 1 else None
        left, right_ext, _ = ref.audio_prepare_multi(
            paths[0], right, duration, paths[0], right, 16000, audio_type or "para"
        )
    tracks = [left, right_ext] if audio_type else [left]
    if others:
        tracks.append(np.zeros_like(left))
    np.random.seed(NOISE_SEED)
    out: Tensors = {}
    full = []
    with torch.no_grad():
        for index, track in enumerate(tracks):
            full.append(
                pipe.get_audio_embedding(
                    track, fps=fps * stride, device="cpu", sample_rate=16000, model_type=model_type
                ).float()
            )
            out[f"features_{index}"] = full[-1]
    # The window statements gather `audio_emb = full_audio_emb[center_indices]`: the stored reference is
    # the clamped index table of each segment (the gather itself is checked on our side).
    space = {"torch": torch, "full_audio_emb": full[0], "audio_stride": stride, "num_frames": 93,
             "num_cond_frames": 13, "local_rank": "cpu"}  # fmt: skip
    exec(ref.windows_first, space)  # noqa: S102 - segment 0
    out["indices_0"] = space["center_indices"].to(torch.int32)
    for index in range(1, max(segments, WINDOW_SEGMENTS)):
        exec(ref.windows_next, space)  # noqa: S102 - one pass of the segment loop
        out[f"indices_{index}"] = space["center_indices"].to(torch.int32)
        if not torch.equal(space["audio_emb"][0], full[0][space["center_indices"]]):
            raise RuntimeError("the reference's windows are not its index table's gather")
    return {"signal_sha256": digest(signals)}, out


# --------------------------------------------------------------------------- vocal separation
from _parity_longcat_audio_ours import VOCAL_SECONDS, VOCAL_THIN  # noqa: E402


def _stub(name: str, **attrs: Any) -> None:
    if name not in sys.modules:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.SimpleNamespace(**attrs)  # type: ignore[assignment]


def vocal_case(separator_root: Path, model: Path, seed: int) -> Tensors:
    """audio-separator 0.30.2's MDX computation on the tiny ONNX model: `MDXSeparator.demix` (with its
    `run_model`, `initialize_model_settings` and `STFT`) bound to the separator's default settings and
    Kim_Vocal_2's model data, between the two `spec_utils.normalize` calls of `MDXSeparator.separate` and
    the one of its WAV writer; then the writer's int16 conversion, a 16-bit WAV and the demo's
    `librosa.load(vocal, sr=16000)`. Modules its files import but this path never calls (onnx2torch,
    audioread, pydub) are stubbed when missing."""
    import logging

    import librosa
    import onnxruntime
    from _parity_longcat_audio_ours import vocal_input

    sys.path.insert(0, str(separator_root))
    for name in ("onnx2torch", "audioread", "pydub"):
        _stub(name, AudioSegment=None, convert=None)
    mdx = importlib.import_module("audio_separator.separator.architectures.mdx_separator")
    spec_utils = importlib.import_module("audio_separator.separator.uvr_lib_v5.spec_utils")
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    sep = types.SimpleNamespace(
        hop_length=1024, segment_size=256, overlap=0.25, batch_size=1, enable_denoise=False,
        compensate=1.009, dim_f=3072, dim_t=2**8, n_fft=7680, torch_device=torch.device("cpu"),
        logger=logging.getLogger("mdx"),
        model_run=lambda spek: session.run(None, {"input": spek.cpu().numpy()})[0],
    )  # fmt: skip
    sep.stft = mdx.STFT(sep.logger, sep.n_fft, sep.hop_length, sep.dim_f, sep.torch_device)
    for method in ("initialize_model_settings", "run_model", "demix"):
        setattr(sep, method, types.MethodType(getattr(mdx.MDXSeparator, method), sep))
    mix = spec_utils.normalize(wave=vocal_input(VOCAL_SECONDS, seed), max_peak=0.9, min_peak=0.0)
    with torch.no_grad():
        stem = spec_utils.normalize(wave=sep.demix(mix), max_peak=0.9, min_peak=0.0)
    written = spec_utils.normalize(wave=stem.T.copy(), max_peak=0.9, min_peak=0.0)
    pcm = (written * 32767).astype(np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocals.wav"
        soundfile.write(str(path), pcm, 44100, subtype="PCM_16")
        vocals, _ = librosa.load(str(path), sr=16000)
    return {"stem": torch.from_numpy(stem[:, ::VOCAL_THIN].copy()), "vocals_16k": torch.from_numpy(vocals)}
