"""Wire contract v1: the job input and result of the RunPod worker and the local HTTP API.

One name per field, unknown keys rejected, units and bounds in the schema (`job_input_json_schema()` prints
it). Input sources are strings; `parse_source` classifies them (https URL, s3:// URI, data URI, bare base64,
or a path under the volume root). `parse_job_input(raw, limits)` is the only way in, for every door (the
RunPod worker, the local API, the CLI): it returns a typed model or raises InvalidInput / DurationTooLong,
never anything else. `limits` is what this worker accepts, built once from the settings and the model
registry (`JobLimits.from_settings`); there are no defaults a caller could forget.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from multitalk_worker.config import ENV_VARS, Settings
from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline.presets import PRESETS
from multitalk_worker.pipeline.request import (
    ACCEPTED_IMAGES,
    DEFAULT_BACKGROUND,
    ColorReference,
    ImageOrientation,
    Resolution,
    SourceFps,
)
from multitalk_worker.registry import MODELS, MULTITALK, ModelName, all_adapters, models_taking
from multitalk_worker.timeline import check_length, duration_limit_s
from multitalk_worker.url_policy import check_url

SCHEMA_VERSION = "1"
MAX_DURATION_S = duration_limit_s(MULTITALK.max_frames)
LONGEST_DURATION_S = max(duration_limit_s(spec.max_frames, spec.fps) for spec in MODELS.values())  # any model
ModelField = Literal[tuple(MODELS)]
AdapterField = Literal[tuple(sorted({a.name for a in all_adapters().values()}))]
MAX_SOURCE_CHARS = (
    30_000_000  # larger than any RunPod payload (20 MB); the real cap is the size check on fetch
)
TINY_RESOLUTION: Resolution = "tiny"
RESOLUTION_ORDER = ("tiny", "480p", "720p")

PresetName = Literal[tuple(PRESETS)]
SourceKind = Literal["url", "s3", "data", "base64", "path"]
_BASE64_RE = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")
_MIN_BARE_BASE64 = 64


@dataclass(frozen=True)
class InputSource:
    """One input, classified. `value` is the URL, s3 URI, path, or base64 text (data URIs: the payload)."""

    kind: SourceKind
    value: str
    media_type: str | None = None  # from a data URI

    def describe(self) -> str:
        """A log- and error-safe description: never the payload, never a URL's query string."""
        if self.kind == "url":
            parts = urlsplit(self.value)
            return f"https://{parts.hostname}{parts.path}"
        if self.kind in ("s3", "path"):
            return self.value
        return f"{self.kind} input ({len(self.value)} characters)"


def parse_source(text: str) -> InputSource:
    """Classify an input string. Raises ValueError naming the accepted forms."""
    if not text or "\x00" in text:
        raise ValueError("empty or NUL-containing source")
    lowered = text[:16].lower()
    if lowered.startswith("https://"):
        check_url(text)  # the policy of every hop (a UrlRefused is a ValueError)
        return InputSource("url", text)
    if lowered.startswith("s3://"):
        parts = urlsplit(text)
        if not parts.netloc or not parts.path.strip("/"):
            raise ValueError("s3 URI must be s3://bucket/key")
        return InputSource("s3", text)
    if lowered.startswith("data:"):
        return _parse_data_uri(text)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise ValueError("only https:// URLs and s3:// URIs are accepted (no http or other schemes)")
    if len(text) >= _MIN_BARE_BASE64 and _BASE64_RE.fullmatch(text):
        return InputSource("base64", text)
    if len(text) > 4096:
        raise ValueError("not a URL, data URI, valid base64 or path")
    return InputSource("path", text)


def _parse_data_uri(text: str) -> InputSource:
    header, sep, payload = text.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ValueError("data URI must be data:<media type>;base64,<payload>")
    media_type = header[5:-7].split(";")[0].strip().lower() or None
    return InputSource("data", payload, media_type)


def decode_base64(text: str) -> bytes:
    """Decode a base64 payload strictly. Raises ValueError."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None


Source = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_SOURCE_CHARS,
        description="https URL, s3://bucket/key, data:<type>;base64,<...>, bare base64 (>= 64 chars), "
        "or a path under the worker's volume root (MULTITALK_VOLUME_ROOT)",
    ),
]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
RegionBox = Annotated[list[Unit], Field(min_length=4, max_length=4)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SpeakerInput(_Strict):
    audio: Source
    region: RegionBox | Literal["left", "right", "full"] | None = Field(
        None,
        description="where this speaker is: [x0, y0, x1, y1] normalised to the image (0..1, x right, "
        "y down), or left/right/full; unset: the pipeline's default layout",
    )

    @field_validator("region")
    @classmethod
    def _check_box(cls, value: object) -> object:
        if isinstance(value, list) and not (value[0] < value[2] and value[1] < value[3]):
            raise ValueError("region box needs x0 < x1 and y0 < y1")
        return value


class AdvancedInput(_Strict):
    """Overrides of the preset. Unset fields take the preset's value."""

    steps: int | None = Field(default=None, ge=1, le=100, description="denoising steps per clip")
    text_guidance: float | None = Field(
        default=None, ge=0.0, le=20.0, description="text CFG scale (1: no text CFG)"
    )
    audio_guidance: float | None = Field(default=None, ge=0.0, le=20.0, description="audio CFG scale")
    shift: float | None = Field(
        default=None, gt=0.0, le=30.0, description="timestep shift of the flow schedule"
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**32 - 1, description="noise seed; unset: a random seed, reported"
    )
    teacache_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="TeaCache threshold; 0 turns TeaCache off (useful range 0.2-0.5)",
    )
    color_correction: float | None = Field(
        default=None, ge=0.0, le=1.0, description="colour-correction strength"
    )
    apg: bool | None = Field(default=None, description="adaptive projected guidance instead of plain CFG")


class OutputInput(_Strict):
    delivery: Literal["auto", "s3", "base64", "volume"] = Field(
        default="auto", description="auto: s3 when the worker has a bucket, else base64"
    )
    key: str | None = Field(
        default=None,
        min_length=1,
        max_length=900,
        pattern=r"^[A-Za-z0-9!_.*'()/-]+\.mp4$",
        description="s3 only: object key under the worker's prefix; unset: <job id>.mp4",
    )
    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z0-9_./-]+\.mp4$",
        description="volume only: file path relative to the volume root; "
        "unset: <MULTITALK_OUTPUT_DIR>/<job id>.mp4",
    )

    @model_validator(mode="after")
    def _check_fields(self) -> OutputInput:
        if self.key is not None and self.delivery not in ("s3", "auto"):
            raise ValueError("output.key applies to delivery s3 only")
        if self.path is not None and self.delivery != "volume":
            raise ValueError("output.path applies to delivery volume only")
        for name, value in (("key", self.key), ("path", self.path)):
            if value is not None and (value.startswith("/") or ".." in value.split("/")):
                raise ValueError(f"output.{name} must be relative and must not contain '..'")
        return self


class GenerateInput(_Strict):
    action: Literal["generate"] = "generate"
    image: Source | None = Field(None, description=f"reference image ({ACCEPTED_IMAGES})")
    image_orientation: ImageOrientation = Field(
        "exif",
        description="image only: exif (shown as a viewer shows it, EXIF Orientation applied) or stored (the "
        "stored pixels, EXIF ignored, as the reference does)",
    )
    image_background: str = Field(
        DEFAULT_BACKGROUND,
        pattern=r"^#[0-9a-fA-F]{6}$",
        description="image only: the colour (#rrggbb) transparent pixels are put on",
    )
    video: Source | None = Field(
        None,
        description="source video to dub (MP4/MOV, WebM/MKV, AVI, ...; model infinitetalk); give exactly "
        "one of image and video",
    )
    source_fps: SourceFps | None = Field(
        None,
        description="video only: resample (place the source on the 25 fps timeline by timestamp) or "
        "reference (read frame n as output frame n, as the reference does; right for 25 fps sources only); "
        "unset: resample",
    )
    color_reference: ColorReference | None = Field(
        None,
        description="video only: first (correct colours towards the source's first frame, as the "
        "reference) or clip (each clip's own reference frame, for sources with several shots); unset: first",
    )
    model: ModelField | None = Field(  # type: ignore[valid-type]
        None,
        description="multitalk (image to video) or infinitetalk (image to video, or dubbing a video); "
        "unset: the worker's MULTITALK_MODEL",
    )
    adapter: AdapterField | None = Field(  # type: ignore[valid-type]
        None,
        description="audio adapter: multitalk (model multitalk), single or multi (infinitetalk); unset: "
        "the model's adapter for the number of speakers (one: single, two: multi)",
    )
    speakers: list[SpeakerInput] = Field(min_length=1, max_length=2, description="one or two speech tracks")
    audio_mode: Literal["parallel", "sequential"] = Field(
        "parallel",
        description="two speakers: parallel (both tracks at once) or sequential (one after the other)",
    )
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000, description="unset: the reference's default")
    resolution: Literal["480p", "720p", "tiny"] = Field(
        "480p",
        description="bucket family; `tiny` only on the built-in tiny model; unset: 480p, or tiny "
        "on the tiny model",
    )
    max_duration_s: float | None = Field(
        None,
        gt=0.0,
        le=LONGEST_DURATION_S,
        description=f"cap on the video length in seconds; unset: the audio length. At most "
        f"{MAX_DURATION_S:g} s for multitalk and {LONGEST_DURATION_S:g} s for infinitetalk (the worker's "
        "settings may lower both)",
    )
    preset: PresetName | None = Field(  # type: ignore[valid-type]
        None,
        description="named sampling settings (steps, guidance, shift); see docs/api.md. Unset: the model's "
        "default (default for multitalk and infinitetalk, longcat-distill for longcat-avatar, longcat-1.0 "
        "for longcat-avatar-1.0)",
    )
    vocal_separation: bool | None = Field(
        None,
        description="longcat models: drive the model with the separated vocals (the reference's MDX-Net "
        "stage). Unset: on when the model folder has vocal_separator/Kim_Vocal_2.onnx; true: required "
        "(MODEL_MISSING without it); false: the audio as sent",
    )
    segment_length: Literal["audio", "whole_segments"] | None = Field(
        None,
        description="longcat models: the video follows the audio (audio, the default) or keeps the "
        "reference's whole 93 + 80*(S-1) frames (whole_segments)",
    )
    advanced: AdvancedInput = Field(default_factory=AdvancedInput)
    output: OutputInput = Field(default_factory=OutputInput)
    validate_only: bool = Field(False, description="fetch and check the inputs, return the plan, no GPU work")

    _sources: dict[str, InputSource] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _classify_sources(self) -> GenerateInput:
        """Each input string classified once, here; the fetcher takes the classified source (`source`)."""
        texts = {"image": self.image, "video": self.video}
        texts |= {f"speakers[{i}].audio": speaker.audio for i, speaker in enumerate(self.speakers)}
        for label, text in texts.items():
            if text is not None:
                try:
                    self._sources[label] = parse_source(text)
                except ValueError as exc:
                    raise ValueError(f"{label}: {exc}") from None
        return self

    def source(self, label: str) -> InputSource:
        """The classified source of `image`, `video` or `speakers[i].audio`."""
        return self._sources[label]

    @model_validator(mode="after")
    def _check_speakers(self) -> GenerateInput:
        if len(self.speakers) == 1 and self.audio_mode != "parallel":
            raise ValueError("audio_mode sequential needs two speakers")
        if (self.image is None) == (self.video is None):
            raise ValueError("give exactly one of image (a picture to animate) and video (a video to dub)")
        for name in ("source_fps", "color_reference"):
            if self.video is None and getattr(self, name) is not None:
                raise ValueError(f"{name} applies to a video source; an image is the same in every clip")
        for name in ("image_orientation", "image_background"):
            if self.video is not None and name in self.model_fields_set:
                raise ValueError(f"{name} applies to an image source; a video is read as it plays")
        return self

    def model_name(self, default_model: str) -> ModelName:
        """The job's model: its own, else the worker's default (a registry name)."""
        return MODELS[self.model or default_model].name

    def adapter_name(self, default_model: str) -> str | None:
        """The job's adapter: its own, else its model's adapter for the number of speakers; None for a model
        without adapters (LongCat-Video-Avatar), which refuses one."""
        spec = MODELS[self.model_name(default_model)]
        if not spec.adapters and self.adapter is None:
            return None
        return spec.adapter(self.adapter, persons=len(self.speakers)).name

    def preset_name(self, default_model: str) -> str:
        """The job's preset: its own, else its model's default (registry.py)."""
        return self.preset or MODELS[self.model_name(default_model)].default_preset


class ClipCounts(BaseModel):
    """How the job's clips were made: `generated` by this run, `resumed` from the checkpoint an earlier run
    of the same job id and inputs left (`resume`: what opening it found; None with checkpoints off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generated: int
    resumed: int
    resume: str | None
    checkpoint_bytes: int = Field(description="size of the last saved loop state (0 with checkpoints off)")


class JobResult(BaseModel):
    """A finished job's output (docs/api.md, "The result"): the video and where it went, the encoded file as
    checked, and `resolved`, the pipeline's report of what it made (every parameter as used)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    video: dict[str, object] = Field(
        description="delivery: s3 (url, key, expiry), volume (path), base64, local"
    )
    sha256: str = Field(description="of the mp4's bytes")
    bytes: int
    duration_s: float
    audio_duration_s: float
    width: int
    height: int
    fps: float
    frames: int
    seed: int = Field(description="the seed used (drawn when the job named none)")
    model: str
    adapter: str | None = Field(description="the audio adapter; null for a model without adapters (LongCat)")
    source: dict[str, object] = Field(description="the conditioning source: image, or a video and its cover")
    resolved: dict[str, object] = Field(description="every parameter as the pipeline used it")
    timings: dict[str, float | bool] = Field(description="seconds per stage; cold_start")
    clips: ClipCounts = Field(description="clips made by this run and clips resumed from a checkpoint")
    worker: dict[str, str] = Field(description="version, revision, schema")


class HealthInput(_Strict):
    action: Literal["health"]


JobInput = GenerateInput | HealthInput


def default_resolution(tiny_model: bool) -> Resolution:
    """The bucket family of a request that names none: the worker and the CLI share it."""
    return TINY_RESOLUTION if tiny_model else "480p"


def parse_json_body(body: bytes | str) -> object:
    """A request body (bytes off the wire, or text) as a JSON value. Raises InvalidInput saying what is wrong
    with the body: not UTF-8, or not JSON (truncated, ...), with the position. For the HTTP server and any
    caller holding raw text; `parse_job_input` then checks the value."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"body is not valid UTF-8 (byte {exc.start}); send UTF-8 JSON") from None
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            + (" (truncated?)" if exc.pos >= len(body.rstrip()) else "")
        ) from None
    except RecursionError:
        raise InvalidInput("body is nested too deeply") from None


@dataclass(frozen=True)
class JobLimits:
    """What this worker accepts, the same for every door: built once from the settings and the registry."""

    tiny_model: bool  # a tiny-size model (Settings.tiny_sizes): resolution `tiny` allowed, and the default
    max_resolution: str  # the largest bucket family served
    default_model: str  # the model of a job that names none
    duration_s: Mapping[str, float]  # per model: the longest video, in seconds (check_length's limit)
    duration_source: Mapping[str, str]  # per model: what sets that limit, for messages

    @classmethod
    def from_settings(cls, settings: Settings) -> JobLimits:
        """Each model's length limit: its registry entry's frames, lowered by the setting the entry names."""
        variable = {var.attr: var.name for var in ENV_VARS}
        return cls(
            tiny_model=settings.tiny_sizes,
            max_resolution=settings.max_resolution,
            default_model=settings.default_model,
            duration_s={
                name: min(
                    duration_limit_s(spec.max_frames, spec.fps),
                    float(getattr(settings, spec.duration_setting)),
                )
                for name, spec in MODELS.items()
            },
            duration_source={name: variable[spec.duration_setting] for name, spec in MODELS.items()},
        )

    def model(self, job: GenerateInput) -> str:
        """The job's model: its own, else this worker's default."""
        return job.model_name(self.default_model)

    def check_length(
        self,
        job: GenerateInput,
        *,
        media_s: float | None = None,
        what: str = "the audio",
        slack_s: float = 0.0,
        requested: bool = True,
        remedy: str = "",
        complete: bool = True,
    ) -> None:
        """timeline.check_length with the job's model's limit; `requested=False` judges `media_s` alone (a
        source video must fit whatever length the job asks for)."""
        model = self.model(job)
        check_length(
            self.duration_s[model],
            requested_s=job.max_duration_s if requested else None,
            media_s=media_s,
            what=what,
            slack_s=slack_s,
            source=self.duration_source[model],
            remedy=remedy,
            complete=complete,
        )


def parse_job_input(raw: object, limits: JobLimits) -> JobInput:
    """Validate a job's `input` against the wire contract and this worker's `limits`. Raises InvalidInput
    (or DurationTooLong) with every problem found.

    A job naming no model is a `limits.default_model` job. A string is diagnosed as the JSON text it probably
    was (a server handing over a raw body): not UTF-8, not JSON, or JSON inside a string; an object is needed
    either way."""
    if isinstance(raw, str | bytes):
        try:
            value = parse_json_body(raw)
        except InvalidInput as exc:  # "body is not valid JSON: ..." (a truncated body), "not valid UTF-8"
            message = f"job input must be a JSON object, got a string; as JSON text: {exc}"
            raise InvalidInput(message) from None
        raise InvalidInput(
            f"job input must be a JSON object, got a string holding JSON {_json_type(value)}; "
            "send the value itself, not its text"
        )
    if not isinstance(raw, dict):
        raise InvalidInput(f"job input must be a JSON object, got {_json_type(raw)}")
    action = raw.get("action", "generate")
    model: type[GenerateInput] | type[HealthInput]
    if action == "health":
        model = HealthInput
    elif action == "generate":
        model = GenerateInput
    else:
        raise InvalidInput("action must be 'generate' (default) or 'health'")
    try:
        job = model.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(format_validation_error(exc, model)) from None
    except RecursionError:
        raise InvalidInput("job input is nested too deeply") from None
    if isinstance(job, GenerateInput):
        if "resolution" not in raw:
            job = job.model_copy(update={"resolution": default_resolution(limits.tiny_model)})
        _check_model_fields(job, limits.default_model)
        _check_resolution(job, tiny_model=limits.tiny_model, max_resolution=limits.max_resolution)
        limits.check_length(job)  # the requested length; the media's are checked where they become known
    return job


def _check_model_fields(job: GenerateInput, default_model: str) -> None:
    """The model's rules: a video needs a model that takes one; the adapter must be one of the model's."""
    model = job.model_name(default_model)
    if job.video is not None and "video" not in MODELS[model].sources:
        raise InvalidInput(
            f"video: model {model} animates an image; send model {models_taking('video')} to dub a video"
        )
    job.adapter_name(default_model)  # an adapter of another model lists the accepted ones


def _check_resolution(job: GenerateInput, *, tiny_model: bool, max_resolution: str) -> None:
    if job.resolution == TINY_RESOLUTION and not tiny_model:
        raise InvalidInput(
            "resolution 'tiny' needs the built-in tiny model (MULTITALK_WEIGHTS=tiny); use 480p or 720p"
        )
    if job.resolution != TINY_RESOLUTION and RESOLUTION_ORDER.index(job.resolution) > RESOLUTION_ORDER.index(
        max_resolution
    ):
        raise InvalidInput(f"this worker serves resolutions up to {max_resolution}; got {job.resolution}")


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem, naming the field and what is accepted. Never echoes the input values."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False)[:12]:
        where = ".".join(str(part) for part in error["loc"])
        if not where:  # a rule over several fields: its message names them
            lines.append(error["msg"].removeprefix("Value error, "))
        elif error["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown field (accepted: {_accepted_fields(model, error['loc'][:-1])})")
        else:
            lines.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    more = exc.error_count() - len(lines)
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


def _accepted_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or isinstance(part, int):
            continue
        field = current.model_fields.get(str(part))
        current = _model_of(field.annotation) if field is not None else None
    return ", ".join(current.model_fields) if current is not None else "see the schema"


def _model_of(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _json_type(value: object) -> str:
    names = {
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def job_input_json_schema() -> dict[str, Any]:
    """JSON Schema of the generate input (docs/api.md is generated from the same models)."""
    return GenerateInput.model_json_schema()
