"""Settings: the worker's configuration, built once from the environment.

`Settings.from_env(mapping)` is pure (it reads only the mapping it is given); `settings_from_process()` is
the one place in the package that reads `os.environ`. Every variable is declared once in `ENV_VARS`
(name, type, default, meaning); docs/settings.md is checked against that table by the tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TINY_WEIGHTS = "tiny"
RESOLUTIONS: tuple[str, ...] = ("480p", "720p")
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")
ENGINE_NAMES: tuple[str, ...] = ("reference", "fast")
MODEL_NAMES: tuple[str, ...] = (
    "multitalk",
    "infinitetalk",
    "longcat-avatar",
    "longcat-avatar-1.0",
)  # registry.MODELS (checked by a test)
VIDEO_CRF = 23  # H.264 quality of the output: the reference's final encode


class SettingsError(ValueError):
    """An environment variable has a value the worker cannot use. Stops the worker at startup."""


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: the documentation row and how to parse it."""

    name: str
    attr: str  # attribute of Settings; "s3.x" for S3Settings
    kind: Literal["str", "path", "int", "float", "bool", "secret", "choice", "flag"]
    default: str | None  # as written in the environment; None: unset
    meaning: str
    choices: tuple[str, ...] = ()


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar(
        "MULTITALK_WEIGHTS",
        "weights",
        "str",
        "/runpod-volume/multitalk",
        "`tiny` selects the built-in tiny model (random weights, tests); else the weights folder.",
    ),
    EnvVar(
        "MULTITALK_DEVICE",
        "device",
        "str",
        "auto",
        "torch device for the pipeline; `auto`: `cuda` if present, else `cpu`.",
    ),
    EnvVar(
        "MULTITALK_ENGINE",
        "engine",
        "choice",
        "reference",
        "`reference`: the reference's numerics (parity path); `fast`: cuDNN attention, fp32 RoPE, fused "
        "reference map, compiled blocks, bf16 VAE (bench/RESULTS.md has its speed and error).",
        ENGINE_NAMES,
    ),
    EnvVar(
        "MULTITALK_FP8",
        "fp8",
        "bool",
        "false",
        "float8 linears in the DiT blocks (torchao; Hopper GPUs): faster, a lower-quality tier.",
    ),
    EnvVar(
        "MULTITALK_OFFLOAD",
        "offload",
        "bool",
        "false",
        "low-memory mode: the DiT and umT5 blocks stay in host memory and visit the GPU one block at a "
        "time (for 24 GB GPUs; needs about 50 GB of host memory; bench/RESULTS.md has its cost).",
    ),
    EnvVar(
        "MULTITALK_LORAS",
        "loras",
        "str",
        None,
        "LoRAs merged at load, comma-separated `PATH` or `PATH=SCALE` (scale default 1.0), e.g. a "
        "lightx2v or FusioniX file for the `lightx2v`/`fusionx`/`fast` presets.",
    ),
    EnvVar(
        "MULTITALK_MAX_RESOLUTION",
        "max_resolution",
        "choice",
        "720p",
        "Largest resolution this worker accepts; the startup GPU-memory check is made for it.",
        RESOLUTIONS,
    ),
    EnvVar(
        "MULTITALK_MIN_GPU_MEMORY_GIB",
        "min_gpu_memory_gib",
        "float",
        None,
        "GPU memory the startup check requires; unset: the built-in estimate for MULTITALK_MAX_RESOLUTION.",
    ),
    EnvVar(
        "MULTITALK_VOLUME_ROOT",
        "volume_root",
        "path",
        "/runpod-volume",
        "The only directory that path inputs may name and that `volume` delivery writes under.",
    ),
    EnvVar(
        "MULTITALK_OUTPUT_DIR",
        "output_dir",
        "str",
        "outputs",
        "Default folder (relative to the volume root) for `volume` delivery.",
    ),
    EnvVar(
        "MULTITALK_WORK_DIR",
        "work_dir",
        "path",
        None,
        "Where per-job scratch folders are made; unset: the system temp dir.",
    ),
    EnvVar(
        "MULTITALK_CHECKPOINTS",
        "checkpoints",
        "bool",
        "true",
        "Write a checkpoint after every clip, so that a job sent again with the same id and inputs continues "
        "from its last finished clip (after a lost worker or a restart).",
    ),
    EnvVar(
        "MULTITALK_CHECKPOINT_DIR",
        "checkpoint_dir",
        "path",
        None,
        "Where job checkpoints live (one folder per job id); unset: `.multitalk/checkpoints` under the "
        "volume root when it exists (a retry on another RunPod worker finds it), else under the scratch dir.",
    ),
    EnvVar(
        "MULTITALK_CHECKPOINT_TTL_S",
        "checkpoint_ttl_s",
        "float",
        "86400",
        "Seconds an unfinished job's checkpoint is kept after its last clip; a finished job's is removed "
        "at once.",
    ),
    EnvVar(
        "MULTITALK_MAX_INPUT_MB",
        "max_input_mb",
        "float",
        "100",
        "Size cap per input file (image or audio), in MB (10^6 bytes).",
    ),
    EnvVar(
        "MULTITALK_FETCH_TIMEOUT_S",
        "fetch_timeout_s",
        "float",
        "60",
        "Time limit per input download, in seconds.",
    ),
    EnvVar(
        "MULTITALK_ALLOW_LOOPBACK",
        "allow_loopback",
        "bool",
        "false",
        "Allow URL inputs on loopback addresses (local tests only). Private and link-local stay refused.",
    ),
    EnvVar(
        "MULTITALK_CA_BUNDLE",
        "ca_bundle",
        "path",
        None,
        "CA bundle (PEM) for https inputs; unset: certifi's bundle.",
    ),
    EnvVar(
        "MULTITALK_VIDEO_CRF",
        "video_crf",
        "int",
        str(VIDEO_CRF),
        "H.264 quality of the output: 0 lossless (large files) to 51; 23 is the reference's final encode.",
    ),
    EnvVar(
        "MULTITALK_MAX_DURATION_S",
        "max_duration_s",
        "float",
        "40",
        "Longest video a job may ask for, in seconds (the streaming limit is 1000 frames = 40 s).",
    ),
    EnvVar(
        "MULTITALK_MODEL",
        "default_model",
        "choice",
        "multitalk",
        "Model of a job that names none: `multitalk` (image to video) or `infinitetalk` (image or video).",
        MODEL_NAMES,
    ),
    EnvVar(
        "MULTITALK_ADAPTERS",
        "adapters",
        "str",
        "all",
        "Audio adapters kept resident, comma-separated registry names (`multitalk`, `single`, `multi`); "
        "`all`: every adapter file present in the weights folder (tiny: all three).",
    ),
    EnvVar(
        "MULTITALK_INFINITETALK_MAX_DURATION_S",
        "infinitetalk_max_duration_s",
        "float",
        "600",
        "Longest InfiniteTalk video (and source video) a job may ask for, in seconds (at most 600: "
        "the registry's 15000 frames).",
    ),
    EnvVar(
        "MULTITALK_LONGCAT_MAX_DURATION_S",
        "longcat_max_duration_s",
        "float",
        "600",
        "Longest LongCat-Video-Avatar video a job may ask for, in seconds (at most 600: the registry's 15000 "
        "frames at 25 fps for 1.5, 9600 at 16 fps for 1.0).",
    ),
    EnvVar(
        "MULTITALK_MAX_BASE64_MB",
        "max_base64_mb",
        "float",
        "10",
        "Largest base64 video returned in the job result, in MB of base64 text (RunPod /run: 10 MB).",
    ),
    EnvVar(
        "MULTITALK_S3_BUCKET", "s3.bucket", "str", None, "Bucket for `s3` delivery (and `auto` when set)."
    ),
    EnvVar("MULTITALK_S3_PREFIX", "s3.prefix", "str", "multitalk/", "Key prefix for uploaded videos."),
    EnvVar(
        "MULTITALK_S3_ENDPOINT_URL",
        "s3.endpoint_url",
        "str",
        None,
        "S3-compatible endpoint (R2, MinIO, ...); unset: AWS.",
    ),
    EnvVar("MULTITALK_S3_REGION", "s3.region", "str", "us-east-1", "Region used to sign S3 requests."),
    EnvVar(
        "MULTITALK_S3_ACCESS_KEY_ID",
        "s3.access_key_id",
        "secret",
        None,
        "S3 access key id; unset: boto3's default credential chain.",
    ),
    EnvVar("MULTITALK_S3_SECRET_ACCESS_KEY", "s3.secret_access_key", "secret", None, "S3 secret access key."),
    EnvVar(
        "MULTITALK_S3_SESSION_TOKEN",
        "s3.session_token",
        "secret",
        None,
        "S3 session token (temporary credentials only).",
    ),
    EnvVar(
        "MULTITALK_S3_URL_EXPIRY_S",
        "s3.url_expiry_s",
        "int",
        "3600",
        "Lifetime of the presigned download URL, in seconds.",
    ),
    EnvVar(
        "MULTITALK_S3_PART",
        "s3.part",
        "bool",
        "true",
        "With `s3` delivery, upload the part so far (the finished clips as one mp4) to `<key>.part` after "
        "each clip and give its presigned URL in the progress updates; deleted once the video is delivered.",
    ),
    EnvVar(
        "MULTITALK_QUEUE_SIZE",
        "queue_size",
        "int",
        "8",
        "Local HTTP API: jobs that may wait behind the running one; a job beyond that is refused (429).",
    ),
    EnvVar(
        "MULTITALK_JOB_TTL_S",
        "job_ttl_s",
        "float",
        "3600",
        "Local HTTP API: seconds a finished job's status and video are kept, then deleted.",
    ),
    EnvVar(
        "MULTITALK_API_DATA_DIR",
        "api_data_dir",
        "path",
        None,
        "Local HTTP API: the folder of its job database (`jobs.db`), finished videos (`results/`) and, when "
        "MULTITALK_CHECKPOINT_DIR is unset, checkpoints (`checkpoints/`): jobs survive a restart; unset: "
        "`$XDG_DATA_HOME/multitalk-worker` (default `~/.local/share/multitalk-worker`).",
    ),
    EnvVar(
        "MULTITALK_ALLOWED_HOSTS",
        "allowed_hosts",
        "str",
        "localhost,127.0.0.1,::1",
        "Local HTTP API: comma-separated host names the `Host` header may name (DNS-rebinding guard).",
    ),
    EnvVar(
        "MULTITALK_API_TOKEN",
        "api_token",
        "secret",
        None,
        "Local HTTP API: bearer token every request but `GET /health` must carry; required to listen "
        "beyond loopback.",
    ),
    EnvVar(
        "MULTITALK_FETCH_WEIGHTS",
        "fetch_weights",
        "bool",
        "false",
        "Download missing weights from the Hugging Face Hub into MULTITALK_WEIGHTS at first start.",
    ),
    EnvVar(
        "MULTITALK_LOG_LEVEL",
        "log_level",
        "choice",
        "INFO",
        "Log level of the worker and of the runpod SDK.",
        LOG_LEVELS,
    ),
    EnvVar(
        "MULTITALK_REVISION_FILE",
        "revision_file",
        "path",
        "/app/REVISION",
        "File holding the git revision (written at build).",
    ),
    EnvVar(
        "MULTITALK_LOCK_FILE",
        "lock_file",
        "path",
        "requirements.lock",
        "Lock file the startup version check reads; a relative path: in the working directory, else in the "
        "checkout the package runs from.",
    ),
    EnvVar(
        "RUNPOD_WEBHOOK_GET_JOB",
        "on_runpod",
        "flag",
        None,
        "Set by RunPod on its workers; when present the worker sends progress updates to the queue.",
    ),
    EnvVar(
        "WORLD_SIZE",
        "world_size",
        "int",
        "1",
        "Set by torchrun: above 1, the worker's processes share each job (docs/multi-gpu.md).",
    ),
    EnvVar("RANK", "rank", "int", "0", "Set by torchrun: this process's rank; rank 0 serves RunPod."),
    EnvVar("LOCAL_RANK", "local_rank", "int", "0", "Set by torchrun: the rank on this machine (its GPU)."),
    EnvVar("LOCAL_WORLD_SIZE", "local_world_size", "int", "1", "Set by torchrun: processes on this machine."),
)


@dataclass(frozen=True)
class S3Settings:
    bucket: str | None
    prefix: str
    endpoint_url: str | None
    region: str
    access_key_id: str | None = field(repr=False)
    secret_access_key: str | None = field(repr=False)
    session_token: str | None = field(repr=False)
    url_expiry_s: int
    part: bool  # MULTITALK_S3_PART


@dataclass(frozen=True)
class Settings:
    weights: str
    device: str
    engine: str
    fp8: bool
    offload: bool
    loras: str | None
    max_resolution: str
    min_gpu_memory_gib: float | None
    volume_root: Path
    output_dir: str
    work_dir: Path | None
    checkpoints: bool
    checkpoint_dir: Path | None
    checkpoint_ttl_s: float
    max_input_mb: float
    fetch_timeout_s: float
    allow_loopback: bool
    ca_bundle: Path | None
    max_duration_s: float
    video_crf: int
    default_model: str
    adapters: str
    infinitetalk_max_duration_s: float
    longcat_max_duration_s: float
    max_base64_mb: float
    s3: S3Settings
    queue_size: int
    job_ttl_s: float
    api_data_dir: Path | None
    allowed_hosts: str
    api_token: str | None = field(repr=False)
    fetch_weights: bool
    log_level: str
    revision_file: Path
    lock_file: Path
    on_runpod: bool
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int

    @property
    def tiny_model(self) -> bool:
        return self.weights == TINY_WEIGHTS

    @property
    def tiny_sizes(self) -> bool:
        """Resolution `tiny` is served: the built-in tiny model, or a model folder holding a model of its
        sizes (tests write the published layout at those sizes; the pipelines' `is_tiny` says the same of
        the loaded model). A real model folder is not: its jobs take 480p or 720p."""
        if self.tiny_model:
            return True
        from multitalk_worker.registry import get_model

        if get_model(self.default_model).family is None:
            return False
        from multitalk_worker.weights.longcat_bundle import is_tiny_folder

        return is_tiny_folder(Path(self.weights), self.default_model)

    @property
    def max_input_bytes(self) -> int:
        return int(self.max_input_mb * 1_000_000)

    @property
    def max_base64_bytes(self) -> int:
        return int(self.max_base64_mb * 1_000_000)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from `env` (pure: reads nothing else). Raises SettingsError naming the variable."""
        top: dict[str, Any] = {}  # each value of its variable's type (_parse); the table is the schema
        s3: dict[str, Any] = {}
        for var in ENV_VARS:
            group, _, name = var.attr.rpartition(".")
            (s3 if group == "s3" else top)[name] = _parse(var, env.get(var.name))
        top.update(torchrun_vars(env))
        settings = cls(s3=S3Settings(**s3), **top)
        _check_ranges(settings)
        return settings

    def public_dict(self) -> dict[str, object]:
        """Every setting by env name, secrets replaced by whether they are set. Safe to log and report."""
        out: dict[str, object] = {}
        for var in ENV_VARS:
            value = self.value_of(var)
            if var.kind == "secret":
                out[var.name] = "set" if value else "unset"
            else:
                out[var.name] = str(value) if isinstance(value, Path) else value
        return out

    def value_of(self, var: EnvVar) -> object:
        group, _, name = var.attr.rpartition(".")
        return getattr(self.s3 if group == "s3" else self, name)


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def torchrun_vars(env: Mapping[str, str]) -> dict[str, int]:
    """RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun sets them, by Settings field: the one
    reader of these variables (Settings, and the CLI's launch in distributed.py). A single process
    (WORLD_SIZE unset or 1) may leave the others unset; several need all four, and they must fit."""
    declared = {var.name: var for var in ENV_VARS}
    values = {name: int(str(_parse(declared[name], env.get(name)))) for name in TORCHRUN_VARS}
    unset = [name for name in TORCHRUN_VARS if not (env.get(name) or "").strip()]
    if values["WORLD_SIZE"] > 1 and unset:
        raise SettingsError(f"WORLD_SIZE={values['WORLD_SIZE']} with {', '.join(unset)} unset")
    rank, world, local_rank, local_world = (values[name] for name in TORCHRUN_VARS)
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise SettingsError(
            f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, "
            f"LOCAL_WORLD_SIZE={local_world} do not fit; use torchrun"
        )
    return {declared[name].attr: values[name] for name in TORCHRUN_VARS}


def settings_from_process() -> Settings:
    """Settings of this process. The only reader of os.environ in the package."""
    return Settings.from_env(os.environ)


def _check_ranges(settings: Settings) -> None:
    if settings.checkpoint_ttl_s <= 0:
        raise SettingsError("MULTITALK_CHECKPOINT_TTL_S must be > 0")
    s3 = settings.s3
    if (s3.access_key_id is None) != (s3.secret_access_key is None):
        raise SettingsError(
            "set both MULTITALK_S3_ACCESS_KEY_ID and MULTITALK_S3_SECRET_ACCESS_KEY, or neither"
        )
    if not 1 <= s3.url_expiry_s <= 604_800:
        raise SettingsError("MULTITALK_S3_URL_EXPIRY_S must be within 1..604800 (S3's presign limit: 7 days)")
    if not 0 <= settings.video_crf <= 51:
        raise SettingsError(f"MULTITALK_VIDEO_CRF must be within 0..51, got {settings.video_crf}")
    if not 0 < settings.max_duration_s <= 40:
        raise SettingsError("MULTITALK_MAX_DURATION_S must be within (0, 40] (1000 frames at 25 fps)")
    if not 0 < settings.infinitetalk_max_duration_s <= 600:
        raise SettingsError(
            "MULTITALK_INFINITETALK_MAX_DURATION_S must be within (0, 600] (15000 frames at 25 fps)"
        )
    if not 0 < settings.longcat_max_duration_s <= 600:
        raise SettingsError("MULTITALK_LONGCAT_MAX_DURATION_S must be within (0, 600] (10 minutes)")
    positive = {
        "MULTITALK_MAX_INPUT_MB": settings.max_input_mb,
        "MULTITALK_FETCH_TIMEOUT_S": settings.fetch_timeout_s,
        "MULTITALK_MAX_BASE64_MB": settings.max_base64_mb,
        "MULTITALK_JOB_TTL_S": settings.job_ttl_s,
    }
    for name, value in positive.items():
        if value <= 0:
            raise SettingsError(f"{name} must be > 0, got {value}")
    if not 0 <= settings.queue_size <= 10_000:
        raise SettingsError(f"MULTITALK_QUEUE_SIZE must be within 0..10000, got {settings.queue_size}")
    if settings.min_gpu_memory_gib is not None and settings.min_gpu_memory_gib < 0:
        raise SettingsError("MULTITALK_MIN_GPU_MEMORY_GIB must be >= 0")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse(var: EnvVar, raw: str | None) -> object:
    """Parse one variable; empty counts as unset. Raises SettingsError saying what is accepted."""
    if var.kind == "flag":
        return bool(raw)
    text = raw.strip() if raw is not None and raw.strip() else var.default
    if text is None:
        return None
    try:
        return _PARSERS[var.kind](var, text)
    except ValueError as exc:
        raise SettingsError(f"{var.name}={text!r}: {exc}") from None


def _parse_bool(var: EnvVar, text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")


def _parse_choice(var: EnvVar, text: str) -> str:
    value = text.upper() if var.name == "MULTITALK_LOG_LEVEL" else text
    if value not in var.choices:
        raise ValueError(f"expected one of {', '.join(var.choices)}")
    return value


def _parse_float(var: EnvVar, text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


_PARSERS: dict[str, Callable[[EnvVar, str], object]] = {
    "str": lambda var, text: text,
    "secret": lambda var, text: text,
    "path": lambda var, text: Path(text).expanduser(),
    "int": lambda var, text: int(text),
    "float": _parse_float,
    "bool": _parse_bool,
    "choice": _parse_choice,
}
