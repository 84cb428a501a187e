"""Typed errors. Each class has a stable `code`; the worker maps exceptions to payloads in one place.

Engine code raises the most specific subclass with a message that says what was wrong and what is
accepted. Only `service/faults.py` turns exceptions into these (and the doors turn them into payloads).
"""

from __future__ import annotations

from typing import ClassVar


class WorkerError(Exception):
    """Base class. `code`, `stage` and `retryable` are part of the wire contract."""

    code: ClassVar[str] = "GENERATION_FAILED"
    default_stage: ClassVar[str] = "generate"
    retryable_by_default: ClassVar[bool] = False

    def __init__(self, message: str, *, stage: str | None = None, retryable: bool | None = None) -> None:
        """`retryable`: whether a retry of the same job can succeed; default: the class's. A fault that a
        retry meets again (a missing object, a refused permission) passes False."""
        super().__init__(message)
        self.message = message
        self.stage = stage or self.default_stage
        self.retryable = self.retryable_by_default if retryable is None else retryable

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "stage": self.stage, "retryable": self.retryable}


class InvalidInput(WorkerError):
    code = "INVALID_INPUT"
    default_stage = "validate"


class InputFetchFailed(WorkerError):
    code = "INPUT_FETCH_FAILED"
    default_stage = "fetch"
    retryable_by_default = True


class InputTooLarge(WorkerError):
    code = "INPUT_TOO_LARGE"
    default_stage = "fetch"


class AudioDecodeFailed(WorkerError):
    code = "AUDIO_DECODE_FAILED"
    default_stage = "audio"


class ImageDecodeFailed(WorkerError):
    code = "IMAGE_DECODE_FAILED"
    default_stage = "image"


class VideoDecodeFailed(WorkerError):
    """A source video that does not open, has no video stream, or has no decodable frame."""

    code = "VIDEO_DECODE_FAILED"
    default_stage = "input"


class DurationTooLong(WorkerError):
    code = "DURATION_TOO_LONG"
    default_stage = "validate"


class ModelMissing(WorkerError):
    code = "MODEL_MISSING"
    default_stage = "load"


class ModelLoadFailed(WorkerError):
    code = "MODEL_LOAD_FAILED"
    default_stage = "load"


class CheckpointError(ModelLoadFailed):
    """A tensor in a checkpoint is missing, unexpected or wrongly shaped. Names the file and the key."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        parts = (f"file {file}" if file else "", f"key {key}" if key else "")
        where = ", ".join(part for part in parts if part)
        super().__init__(f"{message} ({where})" if where else message)
        self.file = file
        self.key = key


class OutOfMemory(WorkerError):
    code = "OUT_OF_MEMORY"
    default_stage = "generate"
    retryable_by_default = True


class GenerationFailed(WorkerError):
    code = "GENERATION_FAILED"
    default_stage = "generate"


class OutputInvalid(WorkerError):
    code = "OUTPUT_INVALID"
    default_stage = "output"


class UploadFailed(WorkerError):
    code = "UPLOAD_FAILED"
    default_stage = "output"
    retryable_by_default = True


class OutputTooLarge(WorkerError):
    code = "OUTPUT_TOO_LARGE"
    default_stage = "output"


class Cancelled(WorkerError):
    code = "CANCELLED"
    default_stage = "generate"


class TimedOut(WorkerError):
    """The job outlived its policy (the local API's `policy.executionTimeout` or `policy.ttl`); the status is
    TIMED_OUT, as on RunPod. A retry with a longer limit may succeed."""

    code = "TIMED_OUT"
    default_stage = "generate"
    retryable_by_default = True


ERROR_CODES: tuple[str, ...] = (
    "INVALID_INPUT",
    "INPUT_FETCH_FAILED",
    "INPUT_TOO_LARGE",
    "AUDIO_DECODE_FAILED",
    "IMAGE_DECODE_FAILED",
    "VIDEO_DECODE_FAILED",
    "DURATION_TOO_LONG",
    "MODEL_MISSING",
    "MODEL_LOAD_FAILED",
    "OUT_OF_MEMORY",
    "GENERATION_FAILED",
    "OUTPUT_INVALID",
    "UPLOAD_FAILED",
    "OUTPUT_TOO_LARGE",
    "CANCELLED",
    "TIMED_OUT",
)
