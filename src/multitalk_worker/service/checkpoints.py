"""Which checkpoint a job continues from: the folder (by job id, under MULTITALK_CHECKPOINT_DIR) and the
digest that must match (pipeline/checkpoint.py keeps the clip loop's state; this module knows jobs).

The digest covers what decides the video's bytes: every input file's contents (not its path or URL: a retry
fetches into a new scratch folder), every field of the request, and the worker settings that change the
numerics or the encoding (weights, engine, fp8, LoRAs, CRF). A random seed is part of the checkpoint, not
of the digest: the retry keeps the seed the first run drew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import uuid
from pathlib import Path

from multitalk_worker.config import Settings
from multitalk_worker.pipeline.checkpoint import ClipCheckpoint, claim, expire_checkpoints
from multitalk_worker.pipeline.request import GenerationRequest
from multitalk_worker.service.verify import sha256

logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = Path(".multitalk") / "checkpoints"


def checkpoint_root(settings: Settings) -> Path:
    """MULTITALK_CHECKPOINT_DIR, else `.multitalk/checkpoints` under the volume root when it exists (a
    RunPod retry on another worker sees the same network volume), else under the scratch dir."""
    if settings.checkpoint_dir is not None:
        return settings.checkpoint_dir
    if settings.volume_root.is_dir():
        return settings.volume_root / CHECKPOINT_FOLDER
    return Path(settings.work_dir or tempfile.gettempdir()) / "multitalk-checkpoints"


def job_digest(request: GenerationRequest, settings: Settings) -> str:
    """sha256 of the request with each file replaced by its contents' sha256, and the output-deciding
    settings."""

    def canonical(value: object) -> object:
        if isinstance(value, Path):
            return {"file_sha256": sha256(value)}
        if isinstance(value, tuple | list):
            return [canonical(item) for item in value]
        if isinstance(value, dict):
            return {key: canonical(item) for key, item in value.items()}
        return value

    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    fields["speakers"] = [dataclasses.asdict(s) for s in request.speakers]
    fields["sampling"] = dataclasses.asdict(request.sampling)
    worker = {
        "weights": settings.weights,
        "engine": settings.engine,
        "fp8": settings.fp8,
        "loras": settings.loras,
        "video_crf": settings.video_crf,
    }
    text = json.dumps({"request": canonical(fields), "worker": worker}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def open_checkpoint(settings: Settings, job_id: str, request: GenerationRequest) -> ClipCheckpoint | None:
    """The job's checkpoint (None when MULTITALK_CHECKPOINTS is off); expired ones are removed first."""
    if not settings.checkpoints:
        return None
    root = checkpoint_root(settings)
    for folder in expire_checkpoints(root, settings.checkpoint_ttl_s):
        logger.info("removed the expired checkpoint %s", folder.name)
    digest = job_digest(request, settings)
    checkpoint = claim(root / job_id, digest, settings.video_crf)
    if checkpoint is None:  # the same job id runs in another process now: this run keeps a folder of its own
        logger.warning("job %s is running in another process; this run does not share its checkpoint", job_id)
        checkpoint = claim(root / f"{job_id}.{uuid.uuid4().hex[:12]}", digest, settings.video_crf)
    return checkpoint
