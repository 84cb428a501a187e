"""`weights download DIR`: fetch a model folder from the Hugging Face Hub, only the files its manifest lists.

What to fetch is the manifest of the layout and registry model (weights/manifest.py `manifest`, plus
`WAV2VEC_MANIFEST`) and the shards that the manifest's index files name; where each file comes from: the
layout's Wan repository (`BASE_REPOS`), each adapter file's `hub_repo` (registry.py), wav2vec2's repository.
Adding a Wan-based model is adding its registry entry. A LongCat-Video-Avatar model fetches the files of
weights/longcat_manifest.py: DIR from its own repository, DIR/../LongCat-Video from LongCat-Video's (only
what the pipeline reads: not Whisper's other weight copies, not LongCat-Video's dit/ and lora/, never the
1.5 INT8 DiT, which no setting of ours loads).

For each file the Hub's HEAD answer gives its size: a local file of that size is kept, a missing one is
downloaded (huggingface_hub resumes an interrupted download from its `.incomplete` part), one of another size
(truncated, or a different file) is fetched again. Then the folder is verified (`weights verify --model`).
huggingface_hub honours `HF_ENDPOINT` (a mirror) and `HF_TOKEN`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from multitalk_worker.config import Settings
from multitalk_worker.errors import InputFetchFailed, InvalidInput, ModelMissing
from multitalk_worker.registry import DEFAULT_MODEL, get_model
from multitalk_worker.weights import LAYOUTS
from multitalk_worker.weights.longcat_manifest import BASE_DIR, BASE_REPO, longcat_manifest
from multitalk_worker.weights.manifest import WAV2VEC_MANIFEST, RequiredFile, VerifyReport, manifest, verify
from multitalk_worker.weights.wav2vec import WAV2VEC_DIR

logger = logging.getLogger(__name__)

BASE_REPOS = {"original": "Wan-AI/Wan2.1-I2V-14B-480P", "diffusers": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"}
WAV2VEC_REPO = "TencentGameMate/chinese-wav2vec2-base"


@dataclass(frozen=True)
class Part:
    """Files of one manifest from one base repository, with per-file exceptions, into `into/` locally."""

    manifest: tuple[RequiredFile, ...]
    repo: str
    into: str = ""
    overrides: dict[str, str] = field(default_factory=dict)  # local path (in `into`) -> repository

    def repo_of(self, path: str) -> str:
        return self.overrides.get(path, self.repo)


def sources_for(model: str, layout: str) -> tuple[Part, ...]:
    """The model folder (the Wan base with the model's adapter files from their own repositories), then
    wav2vec2 in `chinese-wav2vec2-base/`. A LongCat-Video-Avatar model: its own repository into the folder
    and LongCat-Video's into `../LongCat-Video` (`layout` does not apply)."""
    if layout not in LAYOUTS:
        raise InvalidInput(f"layout {layout!r} is not accepted; use one of {', '.join(LAYOUTS)}")
    spec = get_model(model)
    if spec.family is not None:
        return longcat_sources(model)
    adapters = {adapter.file: adapter.hub_repo for adapter in spec.adapters}
    return (
        Part(manifest(layout, spec.name), BASE_REPOS[layout], overrides=adapters),
        Part(WAV2VEC_MANIFEST, WAV2VEC_REPO, into=WAV2VEC_DIR),
    )


def longcat_sources(model: str) -> tuple[Part, ...]:
    """The files of weights/longcat_manifest.py: K's from the model's repository, B's from LongCat-Video's."""
    manifest = longcat_manifest(model)
    files = {where: tuple(e.file for e in manifest.files if e.folder == where) for where in ("model", "base")}
    return Part(files["model"], manifest.repo), Part(files["base"], BASE_REPO, into=f"../{BASE_DIR}")


@dataclass
class DownloadReport:
    root: Path
    fetched: list[str] = field(default_factory=list)
    refetched: list[str] = field(default_factory=list)  # present with the wrong size
    kept: list[str] = field(default_factory=list)
    verify: VerifyReport | None = None

    def handled(self) -> set[str]:
        return {*self.fetched, *self.refetched, *self.kept}

    def __str__(self) -> str:
        lines = [
            f"{self.root}: {len(self.fetched)} fetched, {len(self.refetched)} fetched again (wrong size), "
            f"{len(self.kept)} already complete"
        ]
        lines += [f"  fetched  {name}" for name in self.fetched]
        lines += [f"  again    {name}" for name in self.refetched]
        if self.verify is not None:
            lines.append(str(self.verify))
        return "\n".join(lines)


def download(
    root: Path, *, model: str = DEFAULT_MODEL, layout: str = "original", endpoint: str | None = None
) -> DownloadReport:
    """Fetch what is missing or incomplete under `root`, then verify it. Raises InputFetchFailed when the
    Hub (or the mirror) cannot serve a file; the report's `verify` says whether the folder is complete."""
    parts = sources_for(model, layout)
    root.mkdir(parents=True, exist_ok=True)
    report = DownloadReport(root)
    for part in parts:
        for required in part.manifest:
            local = _fetch_one_of(root, part, required, endpoint, report)
            if local.endswith(".index.json"):
                for shard in _shards(root / part.into / local, local):
                    _fetch(root, part, shard, endpoint, report)
    report.verify = verify(root, model=model)
    return report


def _fetch_one_of(
    root: Path, part: Part, required: RequiredFile, endpoint: str | None, report: DownloadReport
) -> str:
    """The first of the file's names that the repository has; returns that local path."""
    from huggingface_hub.errors import EntryNotFoundError

    names = (required.path, *required.alternatives)
    for name in names:
        try:
            _fetch(root, part, name, endpoint, report)
            return name
        except EntryNotFoundError:
            logger.info("%s has no %s; trying the next name", part.repo_of(name), name)
    raise ModelMissing(f"{part.repo_of(names[0])} has none of {', '.join(names)} ({required.what})")


def _shards(index: Path, name: str) -> list[str]:
    """The files an index's weight_map names, relative to the part's root (the index's own folder)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelMissing(f"{name} is not a safetensors index ({exc})") from None
    folder = str(Path(name).parent)
    prefix = "" if folder == "." else folder + "/"
    return sorted({prefix + str(file) for file in weight_map.values()})


def _fetch(root: Path, part: Part, name: str, endpoint: str | None, report: DownloadReport) -> None:
    """Keep a local file of the Hub's size; fetch (again) otherwise. `name` is relative to `part.into`."""
    import httpx2  # huggingface_hub's HTTP client: its transport errors (refused, timeout) pass through
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    repo = part.repo_of(name)
    folder = root / part.into
    local = folder / name
    shown = f"{part.into}/{name}" if part.into else name
    if shown in report.handled():  # e.g. multitalk.safetensors: in the manifest and in MeiGen's index
        return
    try:
        size = get_hf_file_metadata(hf_hub_url(repo, name, endpoint=endpoint)).size
        if local.is_file() and size is not None and local.stat().st_size == size:
            report.kept.append(shown)
            return
        again = local.is_file()
        logger.info("fetching %s from %s%s", shown, repo, " again (wrong size)" if again else "")
        path = Path(hf_hub_download(repo, name, local_dir=folder, endpoint=endpoint, force_download=again))
    except EntryNotFoundError:
        raise
    except (HfHubHTTPError, OSError) as exc:
        raise InputFetchFailed(f"fetching {name} from {repo} failed: {type(exc).__name__}: {exc}") from None
    except httpx2.TransportError as exc:
        raise InputFetchFailed(
            f"cannot reach {endpoint or constants.ENDPOINT} for {repo}/{name} ({type(exc).__name__}: {exc}); "
            "check the network, or set HF_ENDPOINT to a mirror"
        ) from None
    if size is not None and path.stat().st_size != size:
        raise InputFetchFailed(
            f"{shown} from {repo}: {path.stat().st_size} bytes written, the Hub has {size}"
        )
    (report.refetched if again else report.fetched).append(shown)


def ensure_weights(settings: Settings, endpoint: str | None = None, model: str | None = None) -> None:
    """MULTITALK_FETCH_WEIGHTS: at start, fetch whatever the manifest of `model` (default MULTITALK_MODEL)
    lists and the folder lacks (original layout unless the folder already holds a Diffusers one; LongCat:
    MULTITALK_WEIGHTS and ../LongCat-Video beside it), then require it to verify."""
    if not settings.fetch_weights or settings.tiny_model:
        return
    model = model or settings.default_model
    root = Path(settings.weights)
    layout = "diffusers" if (root / "model_index.json").is_file() else "original"
    logger.info("MULTITALK_FETCH_WEIGHTS: completing %s (%s layout) from the Hub", root, layout)
    report = download(root, model=model, layout=layout, endpoint=endpoint)
    logger.info("%s", report)
    if report.verify is not None and not report.verify.ok:
        raise ModelMissing(f"{root} is incomplete after the download:\n{report.verify}")
