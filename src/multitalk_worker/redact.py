"""Redaction of what the runpod SDK prints in local mode.

The SDK's local test mode (`--test_input`) prints the job's whole result at INFO ("Job result: ..."), and an
S3 result carries a presigned URL whose query holds the signature, the access key id and any session token.
Outside RunPod the worker's stdout passes through `RedactingStream`, which cuts the query string off every
URL it prints; the bucket and key stay readable.
"""

from __future__ import annotations

import re
from typing import TextIO

_URL_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"?#]+)\?[^\s'\"#]*")
REDACTED = "?<query redacted>"


def redact_urls(text: str) -> str:
    """`text` with the query string of every URL replaced by a marker."""
    return _URL_QUERY.sub(lambda match: match.group(1) + REDACTED, text)


class RedactingStream:
    """A text stream that writes `redact_urls(text)` to `inner` (print() writes each message in one call)."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        self.inner.write(redact_urls(text))
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)
