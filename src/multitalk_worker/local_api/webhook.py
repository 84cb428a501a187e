"""A job's webhook: its final status POSTed as JSON to the URL the request named, as RunPod does.

The URL passed url_policy's checks when the job was submitted (`check_webhook`). At delivery the host is
resolved again (a name may re-bind), every address it resolves to must be public (loopback only where the
settings allow it, as for input URLs), and the POST dials the checked address (runpod's PinnedIPAdapter),
with the CA bundle of the settings. No redirects are followed. A non-2xx answer or a network fault is retried
twice, 10 s apart (as RunPod does); the outcome is logged (there is no caller left to tell).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import requests

from multitalk_worker.config import Settings
from multitalk_worker.errors import InvalidInput
from multitalk_worker.io.fetch import pinned_session
from multitalk_worker.url_policy import UnresolvedHost, UrlRefused, check_url, checked_address

logger = logging.getLogger(__name__)

ATTEMPTS = 3
RETRY_DELAY_S = 10.0
TIMEOUT_S = 10.0


def check_webhook(url: str, settings: Settings) -> None:
    """At submission: the URL passes url_policy and every address its host resolves to is allowed, or
    InvalidInput says why (a job is not queued whose webhook would be refused)."""
    try:
        hop = check_url(url)
        checked_address(hop.host, hop.port, allow_loopback=settings.allow_loopback)
    except (UrlRefused, UnresolvedHost) as exc:
        raise InvalidInput(f"webhook: {exc}; the webhook must be a public https URL") from None


def post_status(url: str, body: dict[str, Any], settings: Settings) -> bool:
    """POST `body` to `url` under the address policy; True once an attempt is answered 2xx."""
    for attempt in range(1, ATTEMPTS + 1):
        problem = _post_once(url, body, settings)
        if problem is None:
            logger.info("job %s: webhook delivered", body.get("id"))
            return True
        logger.warning("job %s: webhook attempt %d/%d: %s", body.get("id"), attempt, ATTEMPTS, problem)
        if problem.startswith("refused"):
            return False  # the address policy refuses it: a retry meets the same refusal
        if attempt < ATTEMPTS:
            time.sleep(RETRY_DELAY_S)
    return False


def post_status_in_background(url: str, body: dict[str, Any], settings: Settings) -> threading.Thread:
    thread = threading.Thread(
        target=post_status, args=(url, body, settings), name="multitalk-webhook", daemon=True
    )
    thread.start()
    return thread


def _post_once(url: str, body: dict[str, Any], settings: Settings) -> str | None:
    """None when answered 2xx, else what went wrong (starting "refused" when the policy refuses it)."""
    try:
        hop = check_url(url)
        address = checked_address(hop.host, hop.port, allow_loopback=settings.allow_loopback)
    except UrlRefused as exc:
        return f"refused: {exc}"
    except UnresolvedHost as exc:
        return str(exc)
    with pinned_session(address, settings) as session:
        try:
            response = session.post(url, json=body, timeout=TIMEOUT_S, allow_redirects=False)
        except requests.RequestException as exc:
            return f"{type(exc).__name__}"
    if 200 <= response.status_code < 300:
        return None
    return f"answered HTTP {response.status_code}"
