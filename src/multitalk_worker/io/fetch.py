"""Fetch job inputs (delivering the output is io/delivery.py's job).

One fetcher for every input form (https URL, s3:// URI, data URI, bare base64, volume path): size-capped,
time-limited, and checked by magic bytes before anything decodes it. Every hop of a URL (the first and each
redirect) passes url_policy's checks (https, no credentials, a valid port, public addresses only; loopback
only when the settings allow it) and is dialled on the address that was checked (runpod's `PinnedIPAdapter`
defeats DNS rebinding).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import certifi
import requests
import urllib3
from botocore.exceptions import BotoCoreError, ClientError
from runpod.serverless.utils.rp_ssrf import PinnedIPAdapter

from multitalk_worker.config import Settings
from multitalk_worker.errors import (
    AudioDecodeFailed,
    ImageDecodeFailed,
    InputFetchFailed,
    InputTooLarge,
    InvalidInput,
    VideoDecodeFailed,
)
from multitalk_worker.io.s3 import bucket_exists, make_s3_client, s3_reason, s3_retryable
from multitalk_worker.io.volume import check_name_lengths
from multitalk_worker.pipeline.request import ACCEPTED_IMAGES
from multitalk_worker.schema import InputSource, decode_base64
from multitalk_worker.url_policy import UnresolvedHost, UrlRefused, check_url, checked_address

logger = logging.getLogger(__name__)

MediaKind = Literal["image", "audio", "video"]
CHUNK = 1 << 16
MAX_REDIRECTS = 3
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


def pinned_session(address: str, settings: Settings) -> requests.Session:
    """A session whose https connections dial `address` (checked by url_policy) while TLS and Host name
    the URL's host, verified with MULTITALK_CA_BUNDLE or certifi's; no proxy, netrc or CA variables
    (Settings is the only configuration). Used for input URLs and the local API's webhooks."""
    session = requests.Session()
    session.trust_env = False
    session.mount("https://", PinnedIPAdapter(address))
    session.verify = str(settings.ca_bundle) if settings.ca_bundle else certifi.where()
    session.headers["User-Agent"] = "multitalk-worker"
    return session


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
        remaining = max(deadline - time.monotonic(), 0.01)
        with pinned_session(address, self.settings) as session:
            try:
                response = session.get(
                    url,
                    stream=True,
                    allow_redirects=False,
                    timeout=(min(remaining, 10.0), remaining),
                    headers={"Accept-Encoding": "identity"},
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
            return checked_address(host, port, allow_loopback=self.settings.allow_loopback)
        except UnresolvedHost as exc:
            raise InputFetchFailed(f"{label}: {exc}") from None
        except UrlRefused as exc:
            raise InvalidInput(f"{label}: {exc}; only public https URLs are fetched", stage="fetch") from None

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
            reason = s3_reason(exc)
            if reason == "no such key" and not bucket_exists(client, bucket):
                reason = "no such bucket"  # HEAD answers a bare 404 for both; ask the bucket
            raise InputFetchFailed(f"{label}: {uri}: {reason}", retryable=s3_retryable(exc)) from None
        except BotoCoreError as exc:
            raise InputFetchFailed(
                f"{label}: {uri}: S3 endpoint unreachable ({type(exc).__name__})"
            ) from None
        return dest

    def s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = make_s3_client(self.settings)
        return self._s3


def _safe_url(url: str) -> str:
    """Scheme, host and path only: never credentials or a query string (which may carry a signature)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{parts.path}"
