"""What a LongCat-Video-Avatar folder must contain, and `verify` for it (spec
longcat-avatar-inference.md §2.1, §2.2, §2.11): the model folder K (`LongCat-Video-Avatar-1.5/` or
`LongCat-Video-Avatar/`) and the base folder B = K/../LongCat-Video beside it, as the reference reads them.

    K (1.5)  base_model/             config.json, index, 6 shards                 the DiT
             lora/dmd_lora.safetensors                                            the distilled preset only
             whisper-large-v3/       config.json, preprocessor_config.json, model.safetensors
             vocal_separator/Kim_Vocal_2.onnx                                     optional (the vocal stage)
             base_model_int8/        optional: verified when present, never downloaded
    K (1.0)  avatar_single/, avatar_multi/ (config.json, index, shards), chinese-wav2vec2-base/,
             vocal_separator/Kim_Vocal_2.onnx
    B        tokenizer/ (tokenizer_config.json, tokenizer.json or spiece.model), text_encoder/ (config.json,
             index, shards), vae/ (config.json, diffusion_pytorch_model.safetensors)

Not listed because we do not read them: K/scheduler and B/scheduler (our schedule is the registry's shift,
pipeline/longcat_sampling.py), B/dit and B/lora (the base model's own DiT and LoRAs, spec §2.1), Whisper's
tokenizer, fp32 shards, .bin and flax copies, the 1.0 fairseq checkpoint. `LONGCAT_MANIFESTS` is the one
list: `weights download` fetches it, `verify` checks it, the loader may import it.

The INT8 DiT (`base_model_int8/`, 15.9 GB) is never downloaded: weights/longcat.py can read it, but no setting
or preset of ours selects it, so fetching it would only fill the volume; a folder that has it is verified.

Tensors are checked from headers only: the DiT folders by `weights/longcat.verify_dits`, Whisper and wav2vec2
against their folder's config.json, umT5 and the VAE against B's config.json files, the DMD LoRA's keys and
shapes against the DiT's Linear layers. Problems name files relative to K (B's as `../LongCat-Video/...`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

from multitalk_worker.errors import CheckpointError, InvalidInput, ModelLoadFailed, ModelMissing
from multitalk_worker.models.longcat.config import LongCatAvatarConfig
from multitalk_worker.pipeline.vocals import VOCAL_DIR, VOCAL_MODEL
from multitalk_worker.registry import get_model
from multitalk_worker.weights import diffusers_layout
from multitalk_worker.weights.checkpoint import (
    Component,
    Problem,
    TensorFile,
    check_component,
    empty_model,
)
from multitalk_worker.weights.longcat import (
    CONFIG_FILE,
    INDEX_FILE,
    build_empty,
    verify_dits,
)
from multitalk_worker.weights.longcat_lora import _TAIL, LORA_FILE, PREFIX, module_path
from multitalk_worker.weights.manifest import RequiredFile, VerifyReport, unique_problems
from multitalk_worker.weights.wav2vec import WAV2VEC_DIR, check_wav2vec
from multitalk_worker.weights.whisper import WHISPER_DIR, check_whisper

BASE_DIR = "LongCat-Video"  # B, beside K (the reference's `K/../LongCat-Video`)
BASE_REPO = "meituan-longcat/LongCat-Video"
TEXT_ENCODER_CONFIG = "text_encoder/config.json"
VAE_CONFIG = "vae/config.json"
VOCAL_FILE = f"{VOCAL_DIR}/{VOCAL_MODEL}"
DISTILL_PRESET = "longcat-distill"  # pipeline/presets.py: the one preset that runs with the DMD LoRA


@dataclass(frozen=True)
class LongCatFile:
    """One file the LongCat pipeline reads, in the model folder K or the base folder B. `presets`: only
    these job presets need it (the DMD LoRA); `optional`: its stage is skipped with a note when it is absent
    (the vocal separator, pipeline/vocals.py)."""

    folder: Literal["model", "base"]
    file: RequiredFile
    presets: tuple[str, ...] = ()
    optional: bool = False
    size: str = ""  # the published size as the spec reports it, for the docs

    @property
    def shown(self) -> str:
        """The path as messages give it, relative to K."""
        return self.file.path if self.folder == "model" else f"../{BASE_DIR}/{self.file.path}"

    def needed_by(self, preset: str) -> bool:
        return not self.optional and (not self.presets or preset in self.presets)


@dataclass(frozen=True)
class LongCatManifest:
    """Every file one LongCat-Video-Avatar version reads, and where it is published."""

    version: str  # weights/longcat.DIT_FOLDERS key
    repo: str  # K's Hugging Face repository
    files: tuple[LongCatFile, ...]

    def repo_of(self, entry: LongCatFile) -> str:
        return self.repo if entry.folder == "model" else BASE_REPO


def _model(
    path: str,
    what: str,
    *,
    size: str = "",
    alt: tuple[str, ...] = (),
    presets: tuple[str, ...] = (),
    optional: bool = False,
) -> LongCatFile:
    return LongCatFile("model", RequiredFile(path, what, alt), presets, optional, size)


def _base(path: str, what: str, *, size: str = "", alt: tuple[str, ...] = ()) -> LongCatFile:
    return LongCatFile("base", RequiredFile(path, what, alt), size=size)


def _dit(folder: str, size: str) -> tuple[LongCatFile, ...]:
    """A DiT folder: its config and index (the shards are the ones the index names)."""
    return (
        _model(f"{folder}/{CONFIG_FILE}", f"LongCat DiT config ({folder})"),
        _model(f"{folder}/{INDEX_FILE}", f"LongCat DiT index ({folder}; 6 shards)", size=size),
    )


BASE_FILES = (
    _base("tokenizer/tokenizer_config.json", "umT5 tokenizer config"),
    _base("tokenizer/tokenizer.json", "umT5 tokenizer", alt=("tokenizer/spiece.model",)),
    _base(TEXT_ENCODER_CONFIG, "umT5-XXL encoder config"),
    _base(diffusers_layout.TEXT_ENCODER_INDEX, "umT5-XXL encoder index (5 shards)", size="22.7 GB (fp32)"),
    _base(VAE_CONFIG, "Wan VAE config"),
    _base(diffusers_layout.VAE_FILE, "Wan VAE", size="507.6 MB (fp32)"),
)
VOCALS = _model(VOCAL_FILE, "MDX-Net vocal separator (the vocal stage)", optional=True)

LONGCAT_MANIFESTS: dict[str, LongCatManifest] = {
    "longcat-avatar": LongCatManifest(
        "1.5",
        "meituan-longcat/LongCat-Video-Avatar-1.5",
        (
            *_dit("base_model", "31.7 GB (bf16)"),
            _model(
                LORA_FILE,
                f"DMD distillation LoRA (preset {DISTILL_PRESET})",
                size="2.52 GB (fp32)",
                presets=(DISTILL_PRESET,),
            ),
            _model(f"{WHISPER_DIR}/config.json", "Whisper-large-v3 config"),
            _model(f"{WHISPER_DIR}/preprocessor_config.json", "Whisper feature extractor"),
            _model(f"{WHISPER_DIR}/model.safetensors", "Whisper-large-v3 weights", size="3.09 GB (fp16)"),
            VOCALS,
            *BASE_FILES,
        ),
    ),
    "longcat-avatar-1.0": LongCatManifest(
        "1.0",
        "meituan-longcat/LongCat-Video-Avatar",
        (
            *_dit("avatar_single", "about 31.7 GB (bf16)"),
            *_dit("avatar_multi", "about 31.7 GB (bf16)"),
            _model(f"{WAV2VEC_DIR}/config.json", "wav2vec2 config"),
            _model(f"{WAV2VEC_DIR}/preprocessor_config.json", "wav2vec2 feature extractor"),
            _model(
                f"{WAV2VEC_DIR}/pytorch_model.bin",
                "wav2vec2 weights",
                alt=(f"{WAV2VEC_DIR}/model.safetensors",),
            ),
            VOCALS,
            *BASE_FILES,
        ),
    ),
}


def longcat_manifest(model: str) -> LongCatManifest:
    """The manifest of a LongCat registry model; InvalidInput for any other model."""
    spec = get_model(model)
    if spec.family is None or spec.name not in LONGCAT_MANIFESTS:
        raise InvalidInput(
            f"model {model} is not a LongCat-Video-Avatar model; accepted: {', '.join(LONGCAT_MANIFESTS)}"
        )
    return LONGCAT_MANIFESTS[spec.name]


def base_folder(root: Path) -> Path:
    """B for the model folder K = `root`: `K/../LongCat-Video`."""
    return root.resolve().parent / BASE_DIR


def verify_longcat(
    path: str | Path, model: str, *, preset: str | None = None, base: str | Path | None = None
) -> VerifyReport:
    """Check K = `path` and B (default `K/../LongCat-Video`) for LongCat registry model `model` and job
    preset `preset` (default: the model's default preset): every file of the manifest, then every tensor
    from its header. A file that only other presets need, or that an optional stage reads, is a note."""
    manifest = longcat_manifest(model)
    spec = get_model(model)
    preset = preset or spec.default_preset
    if preset not in spec.presets:
        raise InvalidInput(f"model {model} has no preset {preset!r}; accepted: {', '.join(spec.presets)}")
    root = Path(path)
    base_root = Path(base) if base is not None else base_folder(root)
    report = VerifyReport(root, layout=f"LongCat-Video-Avatar {manifest.version}", preset=preset, model=model)
    report.notes.append(f"base folder {base_root}")
    absent = set()
    for entry in manifest.files:
        if _absent(root if entry.folder == "model" else base_root, entry):
            absent.add(entry.shown)
            _report_absent(entry, preset, spec.presets, report)
    dits = verify_dits(root, manifest.version)
    for check in dits:
        report.problems += check.problems
    config = next((c.config for c in dits if c.config is not None), None)

    def complete(folder: str) -> bool:  # every manifest file of `folder` is there: its tensors are checked
        return not any(shown.startswith(folder + "/") for shown in absent)

    _check_audio(root, [f for f in (WHISPER_DIR, WAV2VEC_DIR) if _lists(manifest, f) and complete(f)], report)
    _check_base(
        base_root, [f for f in ("text_encoder", "vae") if complete(f"../{BASE_DIR}/{f}")], config, report
    )
    if config is not None and _lists(manifest, LORA_FILE) and LORA_FILE not in absent:
        report.problems += lora_problems(root / LORA_FILE, LORA_FILE, build_empty(config))
    report.problems = unique_problems(report.problems)
    return report


def _lists(manifest: LongCatManifest, prefix: str) -> bool:
    return any(e.file.path.startswith(prefix) for e in manifest.files if e.folder == "model")


def _absent(folder: Path, entry: LongCatFile) -> bool:
    return not any((folder / name).is_file() for name in (entry.file.path, *entry.file.alternatives))


def _report_absent(entry: LongCatFile, preset: str, presets: tuple[str, ...], report: VerifyReport) -> None:
    """An absent file: a problem when `preset` needs it, else a note saying what is unavailable."""
    either = " or ".join(
        entry.shown.removesuffix(entry.file.path) + n for n in (entry.file.path, *entry.file.alternatives)
    )
    if entry.needed_by(preset):
        detail = f"{entry.file.what}: need {either}"
        if entry.presets:
            others = ", ".join(p for p in presets if p not in entry.presets)
            detail += f"; preset {preset} needs it (presets {others} run without it)"
        report.problems.append(Problem("missing_file", entry.shown, None, detail))
    elif entry.optional:
        report.notes.append(
            f"no {entry.shown}: {entry.file.what} skipped (the audio as sent drives the model)"
        )
    else:
        report.notes.append(f"no {entry.shown}: presets {', '.join(entry.presets)} unavailable")


def _check_audio(root: Path, folders: list[str], report: VerifyReport) -> None:
    """The audio encoder's tensors against its folder's config.json."""
    checks: dict[str, Callable[[Path], list[Problem]]] = {
        WHISPER_DIR: check_whisper,
        WAV2VEC_DIR: check_wav2vec,
    }
    for folder in folders:
        try:
            report.problems += checks[folder](root / folder)
        except (ModelMissing, CheckpointError, ModelLoadFailed, OSError, ValueError) as err:
            report.problems.append(Problem("bad_file", f"{folder}/config.json", None, _message(err)))


def _check_base(base: Path, names: list[str], dit: LongCatAvatarConfig | None, report: VerifyReport) -> None:
    """umT5 and the VAE of B (those in `names`) against B's own config.json files; their widths against the
    DiT's config."""
    prefix = f"../{BASE_DIR}/"
    parts: dict[str, tuple[Callable[[Path], Component], Callable[[Path], nn.Module]]] = {
        "text_encoder": (diffusers_layout.text_encoder_component, _empty_text_encoder),
        "vae": (diffusers_layout.vae_component, _empty_vae),
    }
    for name in names:
        open_component, build = parts[name]
        try:
            model = build(base / name)
        except (OSError, ValueError, TypeError, KeyError) as err:
            report.problems.append(Problem("bad_file", f"{prefix}{name}/config.json", None, _message(err)))
            continue
        component = open_component(base)
        try:
            problems = check_component(component, model)
        finally:
            component.close()
        report.problems += [dataclasses.replace(p, file=prefix + p.file) for p in problems]
        if dit is not None:
            report.problems += _width_problems(name, model, dit, prefix)


def _empty_text_encoder(folder: Path) -> nn.Module:
    with empty_model():
        return UMT5EncoderModel(UMT5Config.from_pretrained(folder, local_files_only=True))


def _empty_vae(folder: Path) -> nn.Module:
    config = cast(dict[str, Any], AutoencoderKLWan.load_config(str(folder)))  # typed as a tuple; a dict here
    with empty_model():
        return cast(AutoencoderKLWan, AutoencoderKLWan.from_config(config))  # no `return_unused_kwargs`


def _width_problems(name: str, model: nn.Module, dit: LongCatAvatarConfig, prefix: str) -> list[Problem]:
    """umT5's width must be the DiT's caption width, the VAE's latent channels its input channels."""
    if isinstance(model, UMT5EncoderModel):
        what, have, want = "d_model", int(model.config.d_model), dit.caption_channels
    elif isinstance(model, AutoencoderKLWan):
        what, have, want = "z_dim", int(model.config["z_dim"]), dit.in_channels
    else:
        return []
    if have == want:
        return []
    detail = f"{what} {have}, the DiT's config needs {want}"
    return [Problem("bad_file", f"{prefix}{name}/config.json", None, detail)]


def lora_problems(path: Path, name: str, dit: nn.Module) -> list[Problem]:
    """The DMD LoRA from its header (spec §2.7): every key in the reference's grammar, each module complete
    (down, up or up blocks 0..n-1, alpha_scale) and shaped for the DiT Linear it targets."""
    try:
        shapes = TensorFile(path, name).shapes()
    except (ModelMissing, CheckpointError) as err:
        return [Problem("bad_file", name, None, _message(err))]
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    problems = []
    for key, shape in shapes.items():
        match = _TAIL.fullmatch(key)
        if match is None or not match["name"].startswith(PREFIX):
            problems.append(Problem("unexpected_tensor", name, key, "not a LongCat LoRA key"))
            continue
        modules.setdefault(match["name"], {})[match["tail"]] = shape
    for module, parts in sorted(modules.items()):
        problems += _lora_module_problems(name, module, parts, dit)
    return problems


def _lora_module_problems(
    name: str, module: str, parts: dict[str, tuple[int, ...]], dit: nn.Module
) -> list[Problem]:
    target = module_path(module)
    try:
        layer = dit.get_submodule(target)
    except AttributeError:
        layer = None
    if not isinstance(layer, nn.Linear):
        return [Problem("unexpected_tensor", name, module, f"{target} is not a Linear of the DiT")]
    blocks = sorted(k for k in parts if k.startswith("lora_up.blocks."))
    ups = [parts[k] for k in blocks] or [parts[k] for k in ("lora_up.weight",) if k in parts]
    missing = [t for t in ("lora_down.weight", "alpha_scale") if t not in parts] + (
        [] if ups else ["lora_up"]
    )
    if missing:
        return [Problem("missing_tensor", name, module, f"incomplete LoRA module: no {', '.join(missing)}")]
    down, n = parts["lora_down.weight"], len(ups)
    rank = down[0] // n
    fits = (
        down == (rank * n, layer.in_features)
        and layer.out_features % n == 0
        and all(up == (layer.out_features // n, rank) for up in ups)
        and parts["alpha_scale"] == ()
    )
    if fits:
        return []
    detail = (
        f"down {list(down)}, up {[list(u) for u in ups]}, alpha_scale {list(parts['alpha_scale'])} "
        f"do not fit Linear({layer.in_features}, {layer.out_features})"
    )
    return [Problem("wrong_shape", name, module, detail)]


def _message(err: Exception) -> str:
    return str(getattr(err, "message", None) or err)
