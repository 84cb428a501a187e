"""Who may drive the local HTTP API: the guards every request passes before any route runs.

* `Host` must name an allowed host (MULTITALK_ALLOWED_HOSTS; default the loopback names). A page on another
  site that re-binds its DNS name to 127.0.0.1 sends its own name as Host and is refused (DNS rebinding).
* A POST must come from no browser origin or from this server's own: an `Origin` other than
  `http://<Host>` (or `Sec-Fetch-Site: cross-site`/`same-site`) is refused (CSRF). A job POST must also say
  `Content-Type: application/json`; a form or `text/plain` body, which a foreign page can send without
  asking, is refused.
* With MULTITALK_API_TOKEN set, every request but `GET /health` and the page's own files needs
  `Authorization: Bearer <token>`. Without it, only loopback clients are served.

RunPod's operations are also served under an endpoint id (`/{endpoint_id}/run`, as the runpod SDK calls them);
the guards judge such a path as the operation's own (`route_path`).

Refusals are JSON `{"error": {code, message, stage: "request", retryable}}` with the status of API_ERRORS.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from multitalk_worker.config import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Errors of the local API itself (not of a job): code -> (HTTP status, retryable).
API_ERRORS: dict[str, tuple[int, bool]] = {
    "UNAUTHORIZED": (401, False),
    "FORBIDDEN": (403, False),
    "NOT_FOUND": (404, False),
    "METHOD_NOT_ALLOWED": (405, False),
    "NOT_READY": (409, True),
    "UNSUPPORTED_MEDIA_TYPE": (415, False),
    "QUEUE_FULL": (429, True),
}
JSON_BODY_PATHS = ("/run", "/runsync", "/generate")  # POSTs that carry a job
PUBLIC_PATHS = ("/health", "/", "/static/app.js", "/static/style.css", "/openapi.json", "/docs")  # no token
# RunPod's queue operations: `/{endpoint_id}/<operation>[/<job id>]` is served as `/<operation>[/<job id>]`
RUNPOD_OPERATIONS = ("run", "runsync", "status", "stream", "cancel", "health", "purge-queue")


def route_path(path: str) -> str:
    """`path` without a leading endpoint id when the rest is a RunPod operation: `/abc/run` -> `/run`."""
    parts = path.split("/")  # ["", endpoint_id, operation, ...]
    if len(parts) in (3, 4) and parts[1] and parts[2] in RUNPOD_OPERATIONS:
        return "/" + "/".join(parts[2:])
    return path


def api_error(code: str, message: str) -> JSONResponse:
    status, retryable = API_ERRORS[code]
    body = {"error": {"code": code, "message": message, "stage": "request", "retryable": retryable}}
    return JSONResponse(body, status_code=status)


def allowed_hosts(settings: Settings) -> frozenset[str]:
    return frozenset(h.strip().lower().strip("[]") for h in settings.allowed_hosts.split(",") if h.strip())


def host_name(header: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    text = header.strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _is_loopback_client(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """ASGI middleware applying the checks of this module, in order: Host, token or loopback, origin, type."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hosts = allowed_hosts(settings)
        self.token = settings.api_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if host_name(host) not in self.hosts:
            return api_error(
                "FORBIDDEN",
                f"Host {host_name(host)!r} is not served; allowed: {', '.join(sorted(self.hosts))} "
                "(MULTITALK_ALLOWED_HOSTS)",
            )
        path, method = route_path(scope["path"]), scope["method"]
        if self.token is not None:
            if not (method == "GET" and path in PUBLIC_PATHS) and not self._token_ok(headers):
                return api_error("UNAUTHORIZED", "send Authorization: Bearer <MULTITALK_API_TOKEN>")
        elif not _is_loopback_client(scope):
            return api_error("FORBIDDEN", "only loopback clients are served without MULTITALK_API_TOKEN")
        if method == "POST":
            return self._check_post(path, host, headers)
        return None

    def _token_ok(self, headers: dict[str, str]) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), str(self.token).encode()
        )

    def _check_post(self, path: str, host: str, headers: dict[str, str]) -> JSONResponse | None:
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if origin == "null" or parts.netloc.lower() != host.strip().lower():
                return api_error(
                    "FORBIDDEN", f"cross-origin request from {origin!r} refused; use this server's own page"
                )
        if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return api_error("FORBIDDEN", "cross-site request refused; use this server's own page")
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if path in JSON_BODY_PATHS and media_type != "application/json":
            return api_error(
                "UNSUPPORTED_MEDIA_TYPE",
                f"Content-Type {media_type or '(none)'} is not accepted; send application/json",
            )
        return None
