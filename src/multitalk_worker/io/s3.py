"""S3 (any S3-compatible endpoint, boto3): the client, the output bucket's check, and S3 faults told apart
by their error codes."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from multitalk_worker.config import Settings


def make_s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the configured endpoint and credentials (none: boto3's default chain)."""
    s3 = settings.s3
    session = boto3.session.Session(
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        aws_session_token=s3.session_token,
        region_name=s3.region,
    )
    config = BotoConfig(
        signature_version="s3v4",
        connect_timeout=5,
        read_timeout=min(settings.fetch_timeout_s, 60.0),
        retries={"max_attempts": 2, "mode": "standard"},
    )
    verify = str(settings.ca_bundle) if settings.ca_bundle else None
    return session.client("s3", endpoint_url=s3.endpoint_url, config=config, verify=verify)


def s3_reason(exc: ClientError) -> str:
    code = str(exc.response.get("Error", {}).get("Code", "unknown"))
    reasons = {
        "404": "no such key",
        "NoSuchKey": "no such key",
        "NoSuchBucket": "no such bucket",
        "403": "access denied",
        "AccessDenied": "access denied",
        "InvalidAccessKeyId": "access denied (unknown access key)",
        "SignatureDoesNotMatch": "access denied (bad signature)",
    }
    return reasons.get(code, f"S3 error {code}")


def s3_retryable(exc: ClientError) -> bool:
    """Throttling and server errors may pass on retry; a missing object or a refused permission will not."""
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return status >= 500 or status in (408, 429) or status == 0


def bucket_exists(client: Any, bucket: str) -> bool:
    """False only when S3 says the bucket does not exist (404); True when it exists or we may not know."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        return s3_reason(exc) not in ("no such key", "no such bucket")
    except BotoCoreError:
        return True
    return True


def upload_reason(exc: Exception) -> str:
    """Why an upload failed, from S3's error code: boto3's upload_file raises S3UploadFailedError while
    handling S3's ClientError, which it leaves as the context. Never read from the message text."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ClientError):
        return s3_reason(cause)
    return f"S3 endpoint unreachable or refused ({type(exc).__name__})"
