"""Fetch job inputs and deliver the output video.

One fetcher for every input form (https URL, s3:// URI, data URI, bare base64, volume path): size-capped,
time-limited, and checked by magic bytes before anything decodes it. Every hop of a URL (the first and each
redirect) passes url_policy's checks (https, no credentials, a valid port, public addresses only; loopback
only when the settings allow it) and is dialled on the address that was checked (runpod's `PinnedIPAdapter`
defeats DNS rebinding). Outputs go to exactly one place: S3 (boto3, any S3-compatible
endpoint, presigned URL), base64 in the result (capped below RunPod's payload limit), or the volume.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import boto3
import certifi
import requests
import urllib3
from boto3.exceptions import Boto3Error
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from runpod.serverless.utils.rp_ssrf import PinnedIPAdapter

from multitalk_worker.config import Settings
from multitalk_worker.errors import (
    AudioDecodeFailed,
    ImageDecodeFailed,
    InputFetchFailed,
    InputTooLarge,
    InvalidInput,
    OutputTooLarge,
    UploadFailed,
    VideoDecodeFailed,
)
from multitalk_worker.pipeline.request import ACCEPTED_IMAGES
from multitalk_worker.schema import InputSource, decode_base64
from multitalk_worker.url_policy import UrlRefused, address_problem, check_url

logger = logging.getLogger(__name__)

MediaKind = Literal["image", "audio", "video"]
CHUNK = 1 << 16
MAX_REDIRECTS = 3
VIDEO_CONTENT_TYPE = "video/mp4"
_ACCEPTED_TYPES = {"image": ("image/",), "audio": ("audio/", "video/"), "video": ("video/",)}
_NEUTRAL_TYPES = ("application/octet-stream", "binary/octet-stream", "application/ogg", "application/mp4")
_FORMATS = {
    "image": ACCEPTED_IMAGES,
    "audio": "WAV, MP3, FLAC, OGG, M4A/MP4/MOV, WebM/MKV or AAC",
    "video": "MP4/MOV, WebM/MKV, AVI, MPEG-TS, MPEG-PS or Ogg",
}
_DECODE_ERRORS: dict[MediaKind, type[ImageDecodeFailed | AudioDecodeFailed | VideoDecodeFailed]] = {
    "image": ImageDecodeFailed,
    "audio": AudioDecodeFailed,
    "video": VideoDecodeFailed,
}
_MPEG_TS_PACKET = 188
# Major brands of HEIF files (ISO/IEC 23008-12): HEIC stills and sequences, generic HEIF, AVIF.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis")


# ----------------------------------------------------------------------------- magic bytes


def sniff(head: bytes, kind: MediaKind) -> str | None:
    """The container format named by the first bytes of a file, or None if it is not one we accept."""
    if kind == "video":
        return _sniff_video(head)
    if kind == "image":
        signatures = {
            b"\x89PNG\r\n\x1a\n": "png",
            b"\xff\xd8\xff": "jpeg",
            b"GIF87a": "gif",
            b"GIF89a": "gif",
            b"BM": "bmp",
            b"II*\x00": "tiff",
            b"MM\x00*": "tiff",
        }
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return "webp"
        if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
            return "avif" if head[8:12] in (b"avif", b"avis") else "heif"
    else:
        signatures = {b"fLaC": "flac", b"OggS": "ogg", b"ID3": "mp3", b"\x1a\x45\xdf\xa3": "matroska"}
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            return "wav"
        if head[4:8] == b"ftyp":
            return "mp4"
        if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
            return "mpeg-audio"  # MP3 frame sync or AAC ADTS
    for magic, name in signatures.items():
        if head.startswith(magic):
            return name
    return None


def _sniff_video(head: bytes) -> str | None:
    """Video containers (the decode that follows checks there is a video stream)."""
    if head[4:8] == b"ftyp":
        return "mp4"  # MP4, MOV (ftyp qt), 3GP
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # MKV, WebM
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg-ps"
    if head[:1] == b"G" and head[_MPEG_TS_PACKET : _MPEG_TS_PACKET + 1] == b"G":
        return "mpeg-ts"  # the sync byte at the start of two consecutive 188-byte packets
    if head.startswith(b"OggS"):
        return "ogg"
    return None


def check_signature(path: Path, kind: MediaKind, label: str) -> str:
    """Refuse a file whose magic bytes are not an accepted format. Returns the format name."""
    with path.open("rb") as handle:
        head = handle.read(_MPEG_TS_PACKET + 1)
    found = sniff(head, kind)
    if found is None:
        raise _DECODE_ERRORS[kind](
            f"{label}: not a supported {kind} file (accepted: {_FORMATS[kind]})", stage="fetch"
        )
    return found


# ----------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    seconds: float


class InputFetcher:
    """Fetches inputs into a job's scratch folder under the limits of `settings`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._s3: Any = None

    def fetch(self, source: InputSource, dest: Path, kind: MediaKind, label: str) -> Fetched:
        """Fetch one input to `dest` (volume paths are used in place), then check its magic bytes."""
        start = time.monotonic()
        if source.kind == "path":
            path = self._volume_path(source.value, label)
        elif source.kind in ("data", "base64"):
            path = self._decode_inline(source, dest, label)
        elif source.kind == "url":
            path = self._fetch_https(source, dest, kind, label)
        else:
            path = self._fetch_s3(source.value, dest, label)
        check_signature(path, kind, label)
        size = path.stat().st_size
        seconds = time.monotonic() - start
        logger.info("fetched %s (%s, %d bytes) in %.2f s", label, source.describe(), size, seconds)
        return Fetched(path, size, seconds)

    # -- volume and inline

    def _volume_path(self, text: str, label: str) -> Path:
        root = self.settings.volume_root.resolve()
        candidate = Path(text)
        check_name_lengths(candidate, root, label)
        try:
            path = (candidate if candidate.is_absolute() else root / candidate).resolve()
            if not path.is_relative_to(root):
                raise InvalidInput(f"{label}: paths must lie under the volume root {root}", stage="fetch")
            if not path.is_file():  # the job names a file that is not there: a retry finds none either
                raise InvalidInput(f"{label}: no such file on the volume: {path}", stage="fetch")
            size = path.stat().st_size
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            message = f"{label}: cannot read {text!r} on the volume ({reason})"
            raise InvalidInput(message, stage="fetch") from None
        self._check_size(size, label)
        return path

    def _decode_inline(self, source: InputSource, dest: Path, label: str) -> Path:
        self._check_size(len(source.value) * 3 // 4, label)
        try:
            data = decode_base64(source.value)
        except ValueError as exc:
            raise InvalidInput(f"{label}: {exc}", stage="fetch") from None
        self._check_size(len(data), label)
        dest.write_bytes(data)
        return dest

    def _check_size(self, size: int, label: str) -> None:
        limit = self.settings.max_input_bytes
        if size > limit:
            raise InputTooLarge(
                f"{label}: {size / 1e6:.1f} MB exceeds the limit of {limit / 1e6:.1f} MB "
                "(MULTITALK_MAX_INPUT_MB)"
            )

    def _write_capped(self, chunks: Iterable[bytes], dest: Path, deadline: float, label: str) -> None:
        """Write `chunks` to `dest`, stopping at the size limit or the deadline."""
        total = 0
        with dest.open("wb") as out:
            for chunk in chunks:
                total += len(chunk)
                self._check_size(total, label)
                if time.monotonic() > deadline:
                    raise self._timed_out(label)
                out.write(chunk)

    def _timed_out(self, label: str) -> InputFetchFailed:
        return InputFetchFailed(f"{label}: timed out after {self.settings.fetch_timeout_s:g} s")

    # -- https

    def _fetch_https(self, source: InputSource, dest: Path, kind: MediaKind, label: str) -> Path:
        deadline = time.monotonic() + self.settings.fetch_timeout_s
        url = source.value
        for _ in range(MAX_REDIRECTS + 1):
            with self._open(url, deadline, label) as response:
                if response.status_code in (301, 302, 303, 307, 308):
                    url = urljoin(url, response.headers.get("Location", ""))
                    continue
                self._check_response(response, kind, label)
                self._stream_to(response, dest, deadline, label)
                return dest
        raise InputFetchFailed(f"{label}: more than {MAX_REDIRECTS} redirects")

    @contextmanager
    def _open(self, url: str, deadline: float, label: str) -> Iterator[requests.Response]:
        """GET `url` on a checked address; the response and its session are closed on exit. The first URL
        and every redirect pass the same checks (url_policy)."""
        try:
            hop = check_url(url)
        except UrlRefused as exc:
            raise InvalidInput(f"{label}: {_safe_url(url)}: {exc}", stage="fetch") from None
        address = self._checked_address(hop.host, hop.port, label)
        verify = str(self.settings.ca_bundle) if self.settings.ca_bundle else certifi.where()
        remaining = max(deadline - time.monotonic(), 0.01)
        with requests.Session() as session:
            session.trust_env = False  # no proxy, netrc or CA variables: Settings is the only configuration
            session.mount("https://", PinnedIPAdapter(address))
            try:
                response = session.get(
                    url,
                    stream=True,
                    allow_redirects=False,
                    timeout=(min(remaining, 10.0), remaining),
                    verify=verify,
                    headers={"Accept-Encoding": "identity", "User-Agent": "multitalk-worker"},
                )
            except requests.Timeout:
                raise self._timed_out(label) from None
            except requests.RequestException as exc:
                raise InputFetchFailed(
                    f"{label}: cannot fetch {_safe_url(url)} ({type(exc).__name__})"
                ) from None
            with response:
                yield response

    def _checked_address(self, host: str, port: int, label: str) -> str:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise InputFetchFailed(f"{label}: cannot resolve host {host}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            problem = address_problem(address, allow_loopback=self.settings.allow_loopback)
            if problem is not None:
                raise InvalidInput(
                    f"{label}: {host} resolves to {address}, {problem}; only public https URLs are fetched",
                    stage="fetch",
                )
        return addresses[0]

    def _check_response(self, response: requests.Response, kind: MediaKind, label: str) -> None:
        status = response.status_code
        if status != 200:  # a client error stays one on retry; timeouts, throttling and 5xx may pass
            retryable = status >= 500 or status in (408, 425, 429)
            raise InputFetchFailed(f"{label}: server answered HTTP {status}", retryable=retryable)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type and not (
            content_type.startswith(_ACCEPTED_TYPES[kind]) or content_type in _NEUTRAL_TYPES
        ):
            raise _DECODE_ERRORS[kind](
                f"{label}: server sent Content-Type {content_type}, expected {kind} data", stage="fetch"
            )
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit():
            self._check_size(int(declared), label)

    def _stream_to(self, response: requests.Response, dest: Path, deadline: float, label: str) -> None:
        try:
            self._write_capped(iter(partial(response.raw.read1, CHUNK), b""), dest, deadline, label)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if time.monotonic() > deadline:
                raise self._timed_out(label) from None
            raise InputFetchFailed(f"{label}: download broke off ({type(exc).__name__})") from None

    # -- s3

    def _fetch_s3(self, uri: str, dest: Path, label: str) -> Path:
        parts = urlsplit(uri)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        deadline = time.monotonic() + self.settings.fetch_timeout_s
        client = self.s3_client()
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            self._check_size(int(head["ContentLength"]), label)
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            self._write_capped(body.iter_chunks(CHUNK), dest, deadline, label)
        except ClientError as exc:
            reason = _s3_reason(exc)
            if reason == "no such key" and not _bucket_exists(client, bucket):
                reason = "no such bucket"  # HEAD answers a bare 404 for both; ask the bucket
            raise InputFetchFailed(f"{label}: {uri}: {reason}", retryable=_s3_retryable(exc)) from None
        except BotoCoreError as exc:
            raise InputFetchFailed(
                f"{label}: {uri}: S3 endpoint unreachable ({type(exc).__name__})"
            ) from None
        return dest

    def s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = make_s3_client(self.settings)
        return self._s3


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


def _s3_reason(exc: ClientError) -> str:
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


def _s3_retryable(exc: ClientError) -> bool:
    """Throttling and server errors may pass on retry; a missing object or a refused permission will not."""
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return status >= 500 or status in (408, 429) or status == 0


def _bucket_exists(client: Any, bucket: str) -> bool:
    """False only when S3 says the bucket does not exist (404); True when it exists or we may not know."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        return _s3_reason(exc) not in ("no such key", "no such bucket")
    except BotoCoreError:
        return True
    return True


def _upload_reason(exc: Exception) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ClientError):
        return _s3_reason(cause)
    text = str(exc)
    if "AccessDenied" in text or "Forbidden" in text or "403" in text:
        return "access denied"
    if "NoSuchBucket" in text:
        return "no such bucket"
    return f"S3 endpoint unreachable or refused ({type(exc).__name__})"


def _safe_url(url: str) -> str:
    """Scheme, host and path only: never credentials or a query string (which may carry a signature)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{parts.path}"


# ----------------------------------------------------------------------------- delivery


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
        reason = _s3_reason(exc)
        raise UploadFailed(f"upload to s3://{bucket}/{key}: {reason}", retryable=_s3_retryable(exc)) from None
    except (BotoCoreError, Boto3Error) as exc:
        cause = exc.__cause__ or exc.__context__  # upload_file wraps S3's answer in S3UploadFailedError
        retryable = _s3_retryable(cause) if isinstance(cause, ClientError) else None
        raise UploadFailed(
            f"upload to s3://{bucket}/{key}: {_upload_reason(exc)}", retryable=retryable
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


def check_name_lengths(path: Path, root: Path, label: str) -> None:
    """Refuse a path with a name longer than the file system's limit (NAME_MAX of `root`)."""
    try:
        limit = int(os.pathconf(root, "PC_NAME_MAX"))
    except (OSError, ValueError):
        limit = 255
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise InvalidInput(
                f"{label}: the name {part[:32]!r}... is {size} bytes; names on the volume are at most "
                f"{limit} bytes",
                stage="fetch" if label != "output.path" else "output",
            )


def volume_destination(relative: str, settings: Settings) -> Path:
    """The checked absolute path of a volume output, made ready before generation: under the root, names
    within the limit, its folder created and writable (a probe file is made and removed). A destination
    that cannot be written is refused here, not after the whole generation."""
    root = settings.volume_root.resolve()
    check_name_lengths(Path(relative), root, "output.path")
    dest = (root / relative).resolve()
    if not dest.is_relative_to(root):
        raise InvalidInput(f"output.path must lie under the volume root {root}", stage="output")
    if dest.is_dir():
        raise InvalidInput(f"output.path {relative} is a folder on the volume; name a file", stage="output")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".probe-", dir=dest.parent):
            pass
    except (NotADirectoryError, FileExistsError):
        raise InvalidInput(
            f"output.path {relative}: a part of the folder is a file on the volume", stage="output"
        ) from None
    except OSError as exc:  # permissions, a read-only or full volume: a retry meets the same
        raise UploadFailed(f"cannot write {dest.parent}: {exc.strerror}", retryable=False) from None
    return dest


def check_s3_destination(settings: Settings, client: Any) -> None:
    """Before generation: the output bucket must exist. Access is not judged here (credentials that may
    only put objects cannot HEAD a bucket); a refusal at upload time is reported then, not retryable."""
    bucket = settings.s3.bucket
    if bucket and not _bucket_exists(client, bucket):
        raise UploadFailed(
            f"output bucket {bucket}: no such bucket (MULTITALK_S3_BUCKET)", stage="output", retryable=False
        )


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
