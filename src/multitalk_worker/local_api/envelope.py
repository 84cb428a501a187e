"""A RunPod request's body as the local API reads it: `{"input": {...}, "policy": {...}, "webhook": "..."}`.

`input` is the job (schema.py checks it); `policy` and `webhook` are RunPod's own keys, read here:

* `policy.executionTimeout` (ms): a job running longer ends TIMED_OUT (it stops at its next denoising step);
* `policy.ttl` (ms): the job's whole life from submission, queue included; past it, it ends TIMED_OUT;
* `policy.lowPriority`: accepted, without effect (one queue, first in first out);
* `webhook`: an https URL that receives the job's final status as a POST (webhook.py), under the same address
  policy as input URLs (url_policy.py).

Bounds are RunPod's: executionTimeout 5 s to 7 days, ttl 10 s to 7 days. Anything else in the body, or in
`policy`, is INVALID_INPUT naming what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from multitalk_worker.errors import InvalidInput
from multitalk_worker.url_policy import UrlRefused, check_url

BODY_KEYS = ("input", "policy", "webhook")
WEEK_MS = 7 * 24 * 3600 * 1000


class Policy(BaseModel):
    """RunPod's per-job policy."""

    model_config = ConfigDict(extra="forbid", strict=True)

    executionTimeout: int | None = Field(  # noqa: N815 (RunPod's key)
        default=None, ge=5_000, le=WEEK_MS, description="ms a job may run; past it the job ends TIMED_OUT"
    )
    ttl: int | None = Field(
        default=None, ge=10_000, le=WEEK_MS, description="ms from submission (queue included) to TIMED_OUT"
    )
    lowPriority: bool = Field(  # noqa: N815 (RunPod's key)
        default=False, description="accepted for RunPod clients; no effect (one queue, in order)"
    )


@dataclass(frozen=True)
class JobRequest:
    input: Any
    policy: Policy
    webhook: str | None

    @property
    def execution_timeout_s(self) -> float | None:
        ms = self.policy.executionTimeout
        return None if ms is None else ms / 1000

    @property
    def ttl_s(self) -> float | None:
        return None if self.policy.ttl is None else self.policy.ttl / 1000


def parse_request(body: Any) -> JobRequest:
    """The job request in `body`, or InvalidInput saying what is wrong and what is accepted. The job input
    itself is not checked here (schema.parse_job_input does that)."""
    if not isinstance(body, dict) or "input" not in body or not set(body) <= set(BODY_KEYS):
        keys = ", ".join(sorted(body)) if isinstance(body, dict) else type(body).__name__
        raise InvalidInput(
            f'the body must be {{"input": {{...job...}}}} with optional "policy" and "webhook" '
            f"(got {keys}); see /docs"
        )
    try:
        policy = Policy.model_validate(body.get("policy") or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'policy'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(
            f"policy: {problems} (accepted: executionTimeout 5000-{WEEK_MS} ms, ttl 10000-{WEEK_MS} ms, "
            "lowPriority true/false)"
        ) from None
    webhook = body.get("webhook")
    if webhook is not None:
        if not isinstance(webhook, str):
            raise InvalidInput(f"webhook: must be an https URL string (got {type(webhook).__name__})")
        try:
            check_url(webhook)
        except UrlRefused as exc:
            raise InvalidInput(f"webhook: {exc}; the webhook must be a public https URL") from None
    return JobRequest(input=body["input"], policy=policy, webhook=webhook)
