"""Startup checks and the `health` report (the resident pipeline itself: service/resident.py).

Checks: every module of the package imports; numpy/scipy/torch (and the other core packages) are the
versions in requirements.lock; PyAV can encode and decode an H.264 + AAC mp4; the weights are complete
(`weights/manifest.verify`); a GPU with enough memory for MULTITALK_MAX_RESOLUTION. On RunPod they run as
the SDK's fitness checks (a failure stops the worker before it takes a job); the image build runs the ones
that need no weights or GPU:

    python -m multitalk_worker.startup --build
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import pkgutil
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import multitalk_worker
from multitalk_worker.config import Settings, SettingsError, settings_from_process
from multitalk_worker.errors import WorkerError
from multitalk_worker.registry import MODELS, Adapter, get_model
from multitalk_worker.residency import adapter_model, resident_adapters
from multitalk_worker.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from multitalk_worker.service.resident import PipelineHolder

logger = logging.getLogger(__name__)

LOCKED_PACKAGES = (
    "numpy",
    "scipy",
    "torch",
    "diffusers",
    "transformers",
    "av",
    "pydantic",
    "boto3",
    "runpod",
)
# Every third-party module the package imports (tests/test_dependencies.py keeps this in step with src/), and
# three that its dependencies load at run time (scipy, sentencepiece, huggingface_hub): the build check
# imports each, so a runtime dependency missing from requirements.lock fails the image build.
THIRD_PARTY_MODULES = (
    "torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "httpx2",
    "tokenizers", "sentencepiece", "ftfy", "regex", "numpy", "scipy", "soxr", "pyloudnorm", "av", "PIL",
    "pi_heif", "skimage", "pydantic", "boto3", "botocore", "requests", "urllib3", "certifi", "runpod",
    "fastapi", "starlette", "uvicorn", "tqdm", "onnxruntime",
)  # fmt: skip
# GPU memory the startup check asks for: the measured peak of a clip with every network resident, plus margin.
# 480p: 58.5 GiB (reference engine, H100, bench/RESULTS.md run F; H200, run I2: 58.5 GiB allocated, 61.6
# reserved; fast engine with FA3 53.5, fp8 tier 37.8). 720p: 69.7 GiB (reference engine, H100, run H6).
GPU_MEMORY_GIB = {"480p": 60.0, "720p": 72.0}
# With MULTITALK_OFFLOAD, jobs ran under a 24 GiB cap (bench/RESULTS.md runs H1, H5): peak 11.3 GiB at 480p,
# 16.4 GiB at 720p. Asked for: 20 GiB, below what a 24 GB card reports (its driver keeps part of it).
GPU_MEMORY_GIB_OFFLOAD = {"480p": 20.0, "720p": 20.0}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


# ----------------------------------------------------------------------------- checks


def check_imports() -> Check:
    """Import every module of the package and every third-party module it uses."""
    names = [
        info.name
        for info in pkgutil.walk_packages(multitalk_worker.__path__, "multitalk_worker.")
        if not info.name.endswith("__main__")  # importing it would run it
    ]
    failures = []
    for name in [*THIRD_PARTY_MODULES, *names]:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import failure is the finding
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    if failures:
        return Check("imports", False, "; ".join(failures))
    return Check(
        "imports", True, f"{len(names)} package modules and {len(THIRD_PARTY_MODULES)} libraries import"
    )


def locked_versions(lock_file: Path) -> dict[str, str]:
    """`name==version` pins of a requirements lock file, names normalised (PEP 503: lower case, runs of `-_.`
    as one -); other lines (comments, `-r other.lock`, a pin's `--hash` line) are not pins."""
    pins = {}
    for line in lock_file.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if "==" in text:
            name, version = text.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.split(";")[0].split()[0]
    return pins


def find_lock_file(lock_file: Path) -> Path:
    """MULTITALK_LOCK_FILE as a path to read: an absolute path as it is; a relative one in the working
    directory, else in the checkout the package runs from (src/multitalk_worker -> the repository root), so a
    server started outside the repository root still finds requirements.lock. Unfound: the path as given."""
    if lock_file.is_absolute() or lock_file.exists():
        return lock_file
    in_checkout = Path(multitalk_worker.__file__).resolve().parents[2] / lock_file
    return in_checkout if in_checkout.is_file() else lock_file


def check_versions(lock_file: Path) -> Check:
    """The installed core packages are the locked versions (a local tag like +cpu is allowed)."""
    lock_file = find_lock_file(lock_file)
    try:
        pins = locked_versions(lock_file)
    except OSError as exc:
        return Check(
            "versions", False, f"cannot read lock file {lock_file} ({exc.strerror}); set MULTITALK_LOCK_FILE"
        )
    problems, found = [], []
    for name in LOCKED_PACKAGES:
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} not installed")
            continue
        if name not in pins:
            problems.append(f"{name} not pinned in {lock_file.name}")
        elif installed.split("+")[0] != pins[name]:
            problems.append(f"{name} {installed} installed, {pins[name]} locked")
        found.append(f"{name} {installed}")
    return Check("versions", not problems, "; ".join(problems) if problems else ", ".join(found))


def check_media() -> Check:
    """PyAV writes a 2-frame H.264 + AAC mp4 and decodes it back (the worker's output path)."""
    from multitalk_worker.media import probe_mp4, write_mp4

    try:
        with tempfile.TemporaryDirectory(prefix="multitalk-media-check-") as folder:
            path = Path(folder) / "check.mp4"
            frames = np.zeros((2, 16, 16, 3), np.uint8)
            write_mp4(path, frames, np.zeros(1280, np.float32), 16_000, 25)
            info = probe_mp4(path)
    except WorkerError as exc:
        return Check("media", False, exc.message)
    ok = info.frames == 2 and info.has_audio
    import av

    return Check(
        "media", ok, f"PyAV {av.__version__}, FFmpeg {av.ffmpeg_version_info}: mp4 round trip {info}"
    )


def check_weights(settings: Settings, *, full: bool) -> Check:
    """tiny: built in. A folder: presence (health) or the full manifest check of files and tensor shapes
    (Wan models: each resident adapter; a LongCat model: its folder and ../LongCat-Video)."""
    if settings.tiny_model:
        return Check("weights", True, "built-in tiny model (random weights)")
    root = Path(settings.weights)
    if not root.is_dir():
        return Check(
            "weights", False, f"weights folder {root} does not exist (MULTITALK_WEIGHTS; docs/deploy.md)"
        )
    if not full:
        return Check("weights", True, f"{root} present (verified at startup)")
    from multitalk_worker.weights.manifest import verify

    spec = get_model(settings.default_model)
    if not spec.adapters:  # LongCat-Video-Avatar: its folder and ../LongCat-Video, for its default preset
        report = verify(root, model=spec.name)
        return Check("weights", report.ok, str(report).replace("\n", "; "))
    try:
        adapters = resident_adapters(settings)
    except WorkerError as exc:
        return Check("weights", False, exc.message)
    if not adapters:  # the default model's full report names every missing file
        report = verify(root, model=settings.default_model)
        return Check("weights", False, "no audio adapter file; " + str(report).replace("\n", "; "))
    details, ok = [], True
    for adapter in adapters:
        report = verify(root, model=adapter_model(adapter.name)[0], adapter=adapter.name)
        ok = ok and report.ok
        details.append(f"{adapter.name}: " + str(report).replace("\n", "; "))
    return Check("weights", ok, " | ".join(details))


def check_gpu(settings: Settings) -> Check:
    """A CUDA device with at least the memory the largest accepted resolution needs (CPU: tiny model only)."""
    import torch

    device = resolve_device(settings.device)
    if device == "cpu":
        ok = settings.tiny_model
        return Check("gpu", ok, "cpu device (tiny model only)" if ok else "no CUDA device for the real model")
    if not torch.cuda.is_available():
        return Check("gpu", False, f"device {device} asked for, but CUDA is not available")
    props = torch.cuda.get_device_properties(torch.device(device))
    total = props.total_memory / 2**30
    need = gpu_memory_needed_gib(settings)
    mode = " with offload" if settings.offload else ""
    detail = f"{props.name}, {total:.1f} GiB; {need:g} GiB needed for {settings.max_resolution}{mode}"
    return Check("gpu", total >= need, detail)


# Float8 matrix units and FA3's fp8 kernels: Hopper (compute capability 9.0) or newer.
FP8_MIN_CAPABILITY = (9, 0)


def check_fp8(settings: Settings) -> Check:
    """MULTITALK_FP8=true needs torchao (the `fp8` extra, in the image) and a CUDA GPU of compute capability
    FP8_MIN_CAPABILITY or newer: checked at start, so a worker that cannot run the tier refuses before any
    job."""
    import importlib.util

    import torch

    missing = []
    if importlib.util.find_spec("torchao") is None:  # found, not imported: its import is slow and noisy
        missing.append("torchao is not installed (the `fp8` extra)")
    device = resolve_device(settings.device)
    if device == "cpu" or not torch.cuda.is_available():
        missing.append(f"no CUDA device (device {device})")
    else:
        capability = torch.cuda.get_device_capability(torch.device(device))
        if capability < FP8_MIN_CAPABILITY:
            name = torch.cuda.get_device_name(torch.device(device))
            missing.append(f"{name} is compute capability {capability[0]}.{capability[1]}")
    need = "MULTITALK_FP8=true needs torchao and a Hopper or newer GPU (compute capability 9.0+)"
    if missing:
        return Check("fp8", False, f"{need}: {'; '.join(missing)}; unset MULTITALK_FP8 to run in bf16")
    return Check("fp8", True, "torchao installed, GPU of compute capability 9.0+")


def gpu_memory_needed_gib(settings: Settings) -> float:
    """What the startup check asks of the GPU: MULTITALK_MIN_GPU_MEMORY_GIB, else the measured need of the
    largest accepted resolution in this memory mode."""
    if settings.min_gpu_memory_gib is not None:
        return settings.min_gpu_memory_gib
    table = GPU_MEMORY_GIB_OFFLOAD if settings.offload else GPU_MEMORY_GIB
    return 0.0 if settings.tiny_model else table[settings.max_resolution]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- reports


def read_revision(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def worker_version(settings: Settings) -> dict[str, str]:
    return {
        "version": multitalk_worker.__version__,
        "revision": read_revision(settings.revision_file),
        "schema": SCHEMA_VERSION,
    }


def health_report(settings: Settings, holder: PipelineHolder) -> dict[str, Any]:
    """Everything the startup checks look at, without secrets (settings appear with secrets masked)."""
    checks = [
        check_imports(),
        check_versions(settings.lock_file),
        check_media(),
        check_weights(settings, full=False),
        check_gpu(settings),
        *([check_fp8(settings)] if settings.fp8 else []),
    ]
    return {
        "status": "ok" if all(c.ok for c in checks) else "unhealthy",
        "worker": worker_version(settings),
        "checks": [asdict(c) for c in checks],
        "pipeline": {
            "loaded": holder.pipeline is not None,
            "load_s": holder.load_s,
            "jobs_served": holder.jobs_served,
            "adapters": holder.adapters.describe() if holder.adapters is not None else None,
        },
        "adapters": [
            {"model": adapter_model(a.name)[0], "adapter": a.name, "file": a.file}
            for a in _resident_or_empty(settings)
        ],
        "models": served_models(settings),
        "settings": settings.public_dict(),
    }


def served_models(settings: Settings) -> list[dict[str, Any]]:
    """The models a job may name on this worker (the page's model list): a family with adapters, each model
    with a resident adapter; a model without adapters (LongCat-Video-Avatar) alone, on a worker whose
    MULTITALK_MODEL names it. Name, the sources it takes, its resident adapters, frame rate, presets and
    whether it is MULTITALK_MODEL (a job naming no model runs that one)."""
    default = get_model(settings.default_model)
    resident = _resident_or_empty(settings) if default.adapters else []
    specs = (
        [default]
        if not default.adapters
        else [spec for spec in MODELS.values() if any(a in resident for a in spec.adapters)]
    )
    return [
        {
            "model": spec.name,
            "sources": list(spec.sources),
            "adapters": [a.name for a in spec.adapters if a in resident],
            "fps": spec.fps,
            "presets": list(spec.presets),
            "default_preset": spec.default_preset,
            "default": spec.name == settings.default_model,
        }
        for spec in specs
    ]


def _resident_or_empty(settings: Settings) -> list[Adapter]:
    try:
        return resident_adapters(settings)
    except WorkerError:  # the weights check reports the folder's problem
        return []


def register_fitness_checks(settings: Settings, holder: PipelineHolder) -> None:
    """Register the startup checks with the runpod SDK; the last one loads the pipeline."""
    import runpod

    def as_fitness(check: Callable[[], Check], name: str) -> Callable[[], None]:
        def run() -> None:
            result = check()
            if not result.ok:
                raise RuntimeError(f"{result.name}: {result.detail}")
            logger.info("startup check %s: %s", result.name, result.detail)

        run.__name__ = name
        return run

    def load_pipeline() -> None:
        holder.load()

    for name, check in (
        ("check_imports", check_imports),
        ("check_versions", lambda: check_versions(settings.lock_file)),
        ("check_media", check_media),
        ("check_weights", lambda: check_weights(settings, full=True)),
        ("check_gpu", lambda: check_gpu(settings)),
        *([("check_fp8", lambda: check_fp8(settings))] if settings.fp8 else []),
    ):
        runpod.serverless.register_fitness_check(as_fitness(check, name))
    runpod.serverless.register_fitness_check(load_pipeline)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multitalk_worker.startup", description=__doc__)
    parser.add_argument("--build", action="store_true", help="run the checks that need no weights or GPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_process()
    except SettingsError as exc:
        logger.error("bad setting: %s", exc)
        return 2
    if args.build:
        checks = [check_imports(), check_versions(settings.lock_file), check_media()]
        report: dict[str, Any] = {"checks": [asdict(c) for c in checks], "worker": worker_version(settings)}
    else:
        from multitalk_worker.service.resident import PipelineHolder

        report = health_report(settings, PipelineHolder(settings))
        checks = [Check(**c) for c in report["checks"]]
    for check in checks:
        (logger.info if check.ok else logger.error)(
            "%s %s: %s", "ok  " if check.ok else "FAIL", check.name, check.detail
        )
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
