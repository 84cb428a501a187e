"""Deliver the output video to exactly one place, through one protocol: `Delivery.check()` before any
generation (a destination that cannot take the video refuses the job then, not after the GPU work),
`Delivery.deliver(video)` after. Implementations: S3 (boto3, any S3-compatible endpoint, presigned URL),
the volume (a file under MULTITALK_VOLUME_ROOT), base64 in the result (capped below RunPod's payload limit)
and local (the local API's own folder; it serves the file itself). `choose_delivery` reads the job's
`output` and the worker's settings; a new delivery is one class here and one branch there.

A delivery that can also show the part so far while the job runs is a `PartDelivery` (`part_delivery`):
S3, where the part is an object beside the video's key (`<key>.part`, overwritten per clip, deleted once
the video is delivered) with a presigned URL.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from multitalk_worker.config import Settings
from multitalk_worker.errors import InvalidInput, OutputTooLarge, UploadFailed
from multitalk_worker.io.s3 import bucket_exists, s3_reason, s3_retryable, upload_reason
from multitalk_worker.io.volume import volume_destination

logger = logging.getLogger(__name__)

VIDEO_CONTENT_TYPE = "video/mp4"
PART_SUFFIX = ".part"  # the part so far beside the video: keys end in .mp4, so no video's key is a part's
VOLUME_FILE_MODE = 0o644  # as the CLI's own files (open() under the usual umask 022)


class Delivery(Protocol):
    """Where a job's video goes. `plan`: what the plan reports (no secrets, no URL)."""

    @property
    def plan(self) -> dict[str, object]: ...

    def check(self) -> None:
        """Refuse a destination that cannot take the video, before any generation."""
        ...

    def deliver(self, video: Path) -> dict[str, object]:
        """Put `video` there; the result's `video` entry."""
        ...


@dataclass
class S3Delivery:
    settings: Settings
    key: str
    client: Callable[[], Any]  # the job's S3 client, made when first needed

    @property
    def plan(self) -> dict[str, object]:
        return {"delivery": "s3", "key": self.key}

    def check(self) -> None:
        """The bucket is configured and exists. Access is not judged here (credentials that may only put
        objects cannot HEAD a bucket); a refusal at upload time is reported then, not retryable."""
        bucket = self.settings.s3.bucket
        if not bucket:
            raise InvalidInput("delivery s3 needs MULTITALK_S3_BUCKET on the worker; use base64 or volume")
        if not bucket_exists(self.client(), bucket):
            message = f"output bucket {bucket}: no such bucket (MULTITALK_S3_BUCKET)"
            raise UploadFailed(message, stage="output", retryable=False)

    def deliver(self, video: Path) -> dict[str, object]:
        return deliver_s3(video, self.key, self.settings, self.client())

    @property
    def part_key(self) -> str:
        return self.key + PART_SUFFIX

    def deliver_part(self, video: Path) -> dict[str, object]:
        """Upload the part so far to `<key>.part` (replacing the previous one): `deliver_s3`'s entry."""
        return deliver_s3(video, self.part_key, self.settings, self.client())

    def remove_part(self) -> None:
        """Delete the part so far (S3 answers a delete of a missing key with success too). A failure is
        logged, not raised: the video is delivered by then."""
        bucket = self.settings.s3.bucket
        try:
            self.client().delete_object(Bucket=bucket, Key=self.part_key)
        except ClientError as exc:
            logger.warning("could not delete s3://%s/%s: %s", bucket, self.part_key, s3_reason(exc))
        except (BotoCoreError, Boto3Error) as exc:
            logger.warning("could not delete s3://%s/%s: %s", bucket, self.part_key, type(exc).__name__)


class PartDelivery(Protocol):
    """A delivery that also takes the part so far of a running job (service/part.py publishes it)."""

    def deliver_part(self, video: Path) -> dict[str, object]:
        """Put the part so far there, replacing the previous one; its `url` and `url_expires_at`."""
        ...

    def remove_part(self) -> None:
        """Remove the part so far (the video is delivered)."""
        ...


def part_delivery(delivery: Delivery, settings: Settings) -> PartDelivery | None:
    """`delivery` when it shows the part so far: S3 with MULTITALK_S3_PART on."""
    if isinstance(delivery, S3Delivery) and settings.s3.part:
        return delivery
    return None


@dataclass
class VolumeDelivery:
    settings: Settings
    path: str  # relative to the volume root

    @property
    def plan(self) -> dict[str, object]:
        return {"delivery": "volume", "path": self.path}

    def check(self) -> None:
        """The volume is there and the file's folder writable (a probe file is made and removed)."""
        if not self.settings.volume_root.is_dir():
            raise InvalidInput(f"delivery volume needs the volume root {self.settings.volume_root} to exist")
        volume_destination(self.path, self.settings)

    def deliver(self, video: Path) -> dict[str, object]:
        return deliver_volume(video, self.path, self.settings)


@dataclass
class Base64Delivery:
    settings: Settings

    @property
    def plan(self) -> dict[str, object]:
        return {"delivery": "base64"}

    def check(self) -> None:
        """Nothing to check before: the video's size is known only once it is encoded."""

    def deliver(self, video: Path) -> dict[str, object]:
        return deliver_base64(video, self.settings)


@dataclass
class LocalDelivery:
    path: Path  # the local API's file for this job

    @property
    def plan(self) -> dict[str, object]:
        return {"delivery": "local", "path": str(self.path)}

    def check(self) -> None:
        if not self.path.parent.is_dir():
            raise UploadFailed(f"the local API's folder {self.path.parent} is gone", retryable=False)

    def deliver(self, video: Path) -> dict[str, object]:
        shutil.move(video, self.path)
        return {"delivery": "local", "path": str(self.path)}


def choose_delivery(
    method: str,
    *,
    key: str | None,
    path: str | None,
    job_id: str,
    settings: Settings,
    local_video: Path | None,
    s3_client: Callable[[], Any],
) -> Delivery:
    """The job's delivery (`output.delivery`, `key`, `path`): `auto` is S3 when the worker has a bucket,
    else the local API's folder when there is one, else base64."""
    if method == "auto":
        method = "s3" if settings.s3.bucket else "local" if local_video is not None else "base64"
    if method == "local":
        assert local_video is not None
        return LocalDelivery(local_video)
    if method == "s3":
        return S3Delivery(settings, settings.s3.prefix + (key or f"{job_id}.mp4"), s3_client)
    if key is not None:
        raise InvalidInput("output.key applies to delivery s3, but this worker has no MULTITALK_S3_BUCKET")
    if method == "volume":
        return VolumeDelivery(settings, path or f"{settings.output_dir}/{job_id}.mp4")
    return Base64Delivery(settings)


def deliver_s3(video: Path, key: str, settings: Settings, client: Any) -> dict[str, object]:
    """Upload with content type video/mp4, confirm the stored size, return a presigned URL and its expiry."""
    bucket = settings.s3.bucket
    assert bucket, "S3Delivery.check() comes first"
    size = video.stat().st_size
    try:
        client.upload_file(str(video), bucket, key, ExtraArgs={"ContentType": VIDEO_CONTENT_TYPE})
        head = client.head_object(Bucket=bucket, Key=key)
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=settings.s3.url_expiry_s
        )
    except ClientError as exc:
        reason = s3_reason(exc)
        raise UploadFailed(f"upload to s3://{bucket}/{key}: {reason}", retryable=s3_retryable(exc)) from None
    except (BotoCoreError, Boto3Error) as exc:
        cause = exc.__cause__ or exc.__context__  # upload_file wraps S3's answer in S3UploadFailedError
        retryable = s3_retryable(cause) if isinstance(cause, ClientError) else None
        raise UploadFailed(
            f"upload to s3://{bucket}/{key}: {upload_reason(exc)}", retryable=retryable
        ) from None
    if int(head["ContentLength"]) != size or head.get("ContentType") != VIDEO_CONTENT_TYPE:
        raise UploadFailed(
            f"s3://{bucket}/{key}: stored object does not match the video (size or content type)"
        )
    expires = datetime.now(UTC) + timedelta(seconds=settings.s3.url_expiry_s)
    logger.info("uploaded video to s3://%s/%s (%d bytes)", bucket, key, size)
    return {
        "delivery": "s3",
        "bucket": bucket,
        "key": key,
        "url": url,
        "url_expires_at": expires.isoformat(timespec="seconds"),
        "url_expires_in_s": settings.s3.url_expiry_s,
    }


def base64_size(num_bytes: int) -> int:
    return 4 * ((num_bytes + 2) // 3)


def deliver_base64(video: Path, settings: Settings) -> dict[str, object]:
    """The video as base64 text in the result, if it fits under the payload limit."""
    encoded = base64_size(video.stat().st_size)
    if encoded > settings.max_base64_bytes:
        raise OutputTooLarge(
            f"the video is {encoded / 1e6:.1f} MB as base64, over the {settings.max_base64_mb:g} MB limit of "
            "the job result (MULTITALK_MAX_BASE64_MB); use output.delivery 's3' (worker needs "
            "MULTITALK_S3_BUCKET) or 'volume', or a shorter max_duration_s"
        )
    return {
        "delivery": "base64",
        "content_type": VIDEO_CONTENT_TYPE,
        "base64": base64.b64encode(video.read_bytes()).decode("ascii"),
    }


def deliver_volume(video: Path, relative: str, settings: Settings) -> dict[str, object]:
    """Copy the video to the volume (atomically: temp file then rename). Returns its absolute path."""
    dest = volume_destination(relative, settings)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".partial-", suffix=".mp4", dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(video, tmp_name)
            os.chmod(tmp_name, VOLUME_FILE_MODE)  # mkstemp makes it 0600: others on the volume read it too
            os.replace(tmp_name, dest)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    except OSError as exc:
        raise UploadFailed(f"cannot write {dest}: {exc.strerror}") from None
    logger.info("wrote video to %s", dest)
    return {"delivery": "volume", "path": str(dest)}
