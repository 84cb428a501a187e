"""Deliver the output video to exactly one place: S3 (boto3, any S3-compatible endpoint, presigned URL),
base64 in the result (capped below RunPod's payload limit), or the volume."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from multitalk_worker.config import Settings
from multitalk_worker.errors import InvalidInput, OutputTooLarge, UploadFailed
from multitalk_worker.io.s3 import s3_reason, s3_retryable, upload_reason
from multitalk_worker.io.volume import volume_destination

logger = logging.getLogger(__name__)

VIDEO_CONTENT_TYPE = "video/mp4"


def deliver_s3(video: Path, key: str, settings: Settings, client: Any) -> dict[str, object]:
    """Upload with content type video/mp4, confirm the stored size, return a presigned URL and its expiry."""
    bucket = settings.s3.bucket
    if not bucket:
        raise InvalidInput(
            "delivery s3 needs MULTITALK_S3_BUCKET on the worker; use base64 or volume", stage="output"
        )
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
            os.replace(tmp_name, dest)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    except OSError as exc:
        raise UploadFailed(f"cannot write {dest}: {exc.strerror}") from None
    logger.info("wrote video to %s", dest)
    return {"delivery": "volume", "path": str(dest)}
