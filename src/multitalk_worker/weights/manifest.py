"""What each layout must contain, and `verify`: every missing file, missing shard, and missing, unexpected or
wrongly shaped tensor, found from safetensors headers and memory-mapped .pth files (nothing is loaded).

Exact byte sizes of the real files are not known (spec 8 gives approximate sizes only), so files are checked
by presence and tensors by shape. The one exact number the spec knows, the Wan I2V-14B index `total_size`
(the bytes of the Wan DiT tensors in float32), is compared with the shards' headers and reported as a note:
a correct checkpoint stored in another dtype is still loadable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from multitalk_worker.errors import CheckpointError, InvalidInput, ModelLoadFailed, ModelMissing
from multitalk_worker.models.configs import MultiTalkConfig
from multitalk_worker.models.transformer import MultiTalkTransformer
from multitalk_worker.registry import DEFAULT_MODEL, MODELS, Adapter, get_model
from multitalk_worker.weights import diffusers_layout, original
from multitalk_worker.weights.adapters import (
    adapter_component,
    available_adapters,
    is_audio_key,
    skipped_notes,
)
from multitalk_worker.weights.checkpoint import (
    Component,
    Problem,
    Shape,
    check_plan,
    empty_model,
    expected_shapes,
)
from multitalk_worker.weights.loader import (
    Layout,
    base_source,
    detect_config,
    detect_layout,
    empty_models,
    encoder_sources,
)
from multitalk_worker.weights.wav2vec import (
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    WAV2VEC_DIR,
    WEIGHT_FILES,
    check_wav2vec,
)

WAN_I2V_14B_TOTAL_SIZE = 65_579_515_136  # `total_size` of Wan2.1-I2V-14B's own index (spec 8.1)


@dataclass(frozen=True)
class RequiredFile:
    """A file a layout needs; any one of `path` and `alternatives` will do."""

    path: str
    what: str
    alternatives: tuple[str, ...] = ()


# Per layout: the DiT's base files, then (after the adapter files of the model) the other networks' files.
DIT_MANIFESTS: dict[Layout, tuple[RequiredFile, ...]] = {
    "original": (
        RequiredFile(original.CONFIG_FILE, "Wan DiT config"),
        RequiredFile(
            original.DIT_INDEX,
            "DiT index (Wan's own or MeiGen's) or, with no index, the shards",
            (f"{original.DIT_SHARD_STEM}-00001-of-00007.safetensors",),
        ),
    ),
    "diffusers": (
        RequiredFile(diffusers_layout.MODEL_INDEX, "pipeline index"),
        RequiredFile("transformer/config.json", "DiT config"),
        RequiredFile(diffusers_layout.TRANSFORMER_INDEX, "DiT index"),
    ),
}
ENCODER_MANIFESTS: dict[Layout, tuple[RequiredFile, ...]] = {
    "original": (
        RequiredFile(original.T5_FILE, "umT5-XXL encoder"),
        RequiredFile(original.CLIP_FILE, "open-clip ViT-H/14"),
        RequiredFile(original.VAE_FILE, "Wan VAE"),
        RequiredFile(f"{original.TOKENIZER_DIR}/tokenizer_config.json", "umT5 tokenizer config"),
        RequiredFile(
            f"{original.TOKENIZER_DIR}/tokenizer.json",
            "umT5 tokenizer",
            (f"{original.TOKENIZER_DIR}/spiece.model",),
        ),
    ),
    "diffusers": (
        RequiredFile(diffusers_layout.TEXT_ENCODER_INDEX, "umT5 encoder index"),
        RequiredFile(diffusers_layout.IMAGE_ENCODER_FILE, "CLIP vision tower"),
        RequiredFile(diffusers_layout.VAE_FILE, "Wan VAE"),
        RequiredFile("tokenizer/tokenizer_config.json", "umT5 tokenizer config"),
        RequiredFile("tokenizer/tokenizer.json", "umT5 tokenizer", ("tokenizer/spiece.model",)),
    ),
}


def model_adapters(model: str = DEFAULT_MODEL, adapter: str | None = None) -> tuple[Adapter, ...]:
    """The adapters `verify` checks: every adapter of `model` (registry order), or the one named."""
    spec = get_model(model)
    return spec.adapters if adapter is None else (spec.adapter(adapter),)


def manifest(
    layout: Layout, model: str = DEFAULT_MODEL, adapter: str | None = None
) -> tuple[RequiredFile, ...]:
    """Every file a folder of `layout` needs for registry model `model` (all its adapters, or one)."""
    adapters = tuple(RequiredFile(a.file, f"{a.what} ({a.hub_repo})") for a in model_adapters(model, adapter))
    return (*DIT_MANIFESTS[layout], *adapters, *ENCODER_MANIFESTS[layout])


WAV2VEC_MANIFEST = (
    RequiredFile(CONFIG_FILE, "wav2vec2 config"),
    RequiredFile(PREPROCESSOR_FILE, "wav2vec2 feature extractor"),
    RequiredFile(WEIGHT_FILES[0], "wav2vec2 weights", WEIGHT_FILES[1:]),
)


@dataclass
class VerifyReport:
    """Everything wrong with one model folder; `ok` when nothing is."""

    root: Path
    layout: str | None = None
    preset: str | None = None
    model: str | None = None
    adapters: tuple[str, ...] = ()  # the adapter files checked
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.root}: layout {self.layout or '?'}, preset {self.preset or '?'}"
        head += f", model {self.model or '?'}"
        if self.adapters:
            head += f" (adapters {', '.join(self.adapters)})"
        lines = [head, *(f"  problem  {p}" for p in self.problems), *(f"  note     {n}" for n in self.notes)]
        lines.append("  OK" if self.ok else f"  {len(self.problems)} problem(s)")
        return "\n".join(lines)


def missing_files(root: Path, manifest: tuple[RequiredFile, ...], prefix: str = "") -> list[Problem]:
    problems = []
    for required in manifest:
        if not any((root / name).is_file() for name in (required.path, *required.alternatives)):
            either = " or ".join((required.path, *required.alternatives))
            problems.append(
                Problem("missing_file", prefix + required.path, None, f"{required.what}: need {either}")
            )
    return problems


def _as_problem(err: ModelMissing | CheckpointError | ModelLoadFailed, file: str) -> Problem:
    if isinstance(err, ModelMissing):
        return Problem("missing_file", file, None, err.message)
    return Problem("bad_file", getattr(err, "file", None) or file, getattr(err, "key", None), err.message)


def verify(
    path: str | Path,
    *,
    config: MultiTalkConfig | None = None,
    wav2vec_path: str | Path | None = None,
    model: str = DEFAULT_MODEL,
    adapter: str | None = None,
) -> VerifyReport:
    """Check a model folder for registry model `model` completely: the Wan base, every adapter file of the
    model (or only `adapter`), the encoders, and the wav2vec2 folder (default `<path>/chinese-wav2vec2-base`).
    Reads headers only. An unknown model or adapter name is an InvalidInput. A LongCat-Video-Avatar model
    (a family of its own folders) is checked by weights/longcat_manifest.py, for its default job preset."""
    if get_model(model).family is not None:
        if config is not None or wav2vec_path is not None or adapter is not None:
            raise InvalidInput(f"--preset, --wav2vec and --adapter name Wan files; model {model} has none")
        from multitalk_worker.weights.longcat_manifest import verify_longcat  # it imports this module

        return verify_longcat(path, model)
    root = Path(path)
    adapters = model_adapters(model, adapter)
    report = VerifyReport(root, model=model, adapters=tuple(a.file for a in adapters))
    try:
        layout = detect_layout(root)
    except ModelMissing as err:
        report.problems.append(Problem("missing_file", str(root), None, err.message))
        return report
    report.layout = layout
    report.problems += [
        p for p in missing_files(root, manifest(layout, model, adapter)) if not p.file.endswith("index.json")
    ]
    try:
        config = config or detect_config(root, layout)
    except (ModelMissing, ModelLoadFailed) as err:
        report.problems.append(_as_problem(err, "config.json"))
        return report
    report.preset = config.name
    _check_dit(root, layout, config, adapters, report)
    _check_encoders(root, layout, config, report)
    _check_wav2vec(Path(wav2vec_path) if wav2vec_path is not None else root / WAV2VEC_DIR, report)
    report.problems = unique_problems(report.problems)
    return report


def unique_problems(problems: list[Problem]) -> list[Problem]:
    """The first report of each (kind, file, key): a file both listed and opened is reported once."""
    first: dict[tuple[str, str, str | None], Problem] = {}
    for problem in problems:
        first.setdefault((problem.kind, problem.file, problem.key), problem)
    return list(first.values())


def _check_component(
    report: VerifyReport, name: str, open_component: Callable[[], Component], expected: Mapping[str, Shape]
) -> Component | None:
    """Add the problems and notes of one component against `expected` to `report`."""
    try:
        component = open_component()
    except (ModelMissing, CheckpointError) as err:
        report.problems.append(_as_problem(err, name))
        return None
    expected = {k: v for k, v in expected.items() if k not in component.tied}
    try:
        report.problems += check_plan(component.plan, expected, component.home)
        report.notes += component.plan.notes
    finally:
        component.close()
    return component


def _check_dit(
    root: Path, layout: Layout, config: MultiTalkConfig, adapters: tuple[Adapter, ...], report: VerifyReport
) -> None:
    """The Wan base once, then each adapter file on its own (each missing one reported by file)."""
    with empty_model():
        dit = MultiTalkTransformer(config.dit)
    shapes = expected_shapes(dit)
    base_shapes = {k: v for k, v in shapes.items() if not is_audio_key(k)}
    base = _check_component(report, "dit", lambda: base_source(layout)(root), base_shapes)
    if base is not None:
        report.notes += skipped_notes(base.plan, tuple(a.file for a in adapters))
    audio = {k: v for k, v in shapes.items() if is_audio_key(k)}
    for adapter in adapters:
        _check_component(report, adapter.file, lambda a=adapter: adapter_component(root, a.file), audio)
    others = [a for a in available_adapters(root) if a not in adapters]
    if others:
        models = {name for name, spec in MODELS.items() for a in others if a in spec.adapters}
        files = ", ".join(a.file for a in others)
        report.notes.append(f"not checked: {files} (--model {' / '.join(sorted(models))})")
    if layout == "original" and config.dit.dim == 5120 and (root / original.DIT_INDEX).is_file():
        report.notes += _total_size_notes(root)


def _check_encoders(root: Path, layout: Layout, config: MultiTalkConfig, report: VerifyReport) -> None:
    models = empty_models(config)
    for name, open_component in encoder_sources(layout).items():
        expected = expected_shapes(models.by_name()[name])
        _check_component(report, name, lambda o=open_component: o(root), expected)


def _total_size_notes(root: Path) -> list[str]:
    """Compare the index's total_size with the Wan I2V-14B figure (informational)."""
    try:
        total = json.loads((root / original.DIT_INDEX).read_text())["metadata"]["total_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{original.DIT_INDEX} has no metadata.total_size"]
    if total == WAN_I2V_14B_TOTAL_SIZE:
        return [f"index total_size {total} is Wan's own float32 index"]
    return [f"index total_size {total} (Wan's own float32 index: {WAN_I2V_14B_TOTAL_SIZE})"]


def _check_wav2vec(folder: Path, report: VerifyReport) -> None:
    missing = missing_files(folder, WAV2VEC_MANIFEST, prefix=f"{folder.name}/")
    report.problems += missing
    if missing:
        return
    try:
        report.problems += check_wav2vec(folder)
    except (ModelMissing, CheckpointError) as err:
        report.problems.append(_as_problem(err, folder.name))
