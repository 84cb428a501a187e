"""A long job as a chain of checkpoints: after each clip, what the next clip needs is on disk.

A `ClipCheckpoint` is one job's folder:

    meta.json      {"version", "digest", "clips_done", "frames_done", "seed", "updated_at"}
    state.pt       the loop's state after the last finished clip (`ClipState`, torch.save of tensors)
    segments/      the finished clips as H.264 segments (segments.py), one per clip

The clip loop (pipeline/pipeline.py) saves after each clip: the segment first, then the state, each written
under a temporary name and renamed, so a process killed at any point leaves the last complete checkpoint.
What the next clip needs is exactly: the RNG state (every draw of the clips so far done), the last M frames of
the previous clip after colour correction (the motion frames), the conditioner's own state (InfiniteTalk's
colour reference, frame 0 of the source, which a forward-only video reader cannot go back to), and the seed
(a random one is drawn once, then kept). Everything else (audio features, text, plan) is computed again from
the inputs, which the digest covers: `digest` is the caller's hash of the job's inputs and resolved
parameters; a checkpoint with another digest is discarded and the reason reported.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch
from torch import Tensor

from multitalk_worker.media import VIDEO_CRF
from multitalk_worker.segments import ClipSegments

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClipState:
    """The clip loop after `clips_done` clips."""

    clips_done: int
    seed: int
    rng: Tensor  # torch.Generator.get_state(): uint8 on the CPU
    motion: Tensor | None  # the previous clip's last M frames after colour correction [3, M, H, W]
    conditioner: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LoopStart:
    """Where a clip (or segment) loop starts: its seed, the state of an earlier run of the job (None: from
    the first clip) and the checkpoint it saves to (None: no saving)."""

    seed: int
    state: ClipState | None
    checkpoint: ClipCheckpoint | None


@dataclass(frozen=True)
class Resumed:
    """What opening a checkpoint found: the state to continue from (None: start afresh) and why."""

    state: ClipState | None
    reason: str  # "resumed after clip k", "no checkpoint", "inputs changed", ...


class ClipCheckpoint:
    """One job's checkpoint folder (created on first use). `sink` takes the finished clips' frames."""

    def __init__(
        self, folder: Path, digest: str, crf: int = VIDEO_CRF, lock: IO[bytes] | None = None
    ) -> None:
        """`lock`: the open lock file that `claim` holds for this process (closed by `remove`)."""
        self.folder, self.digest, self._lock = Path(folder), digest, lock
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sink = ClipSegments(self.folder / "segments", crf)
        self.save_s = 0.0  # seconds spent writing states (the segments' encoding is the sink's)
        self.saved_bytes = 0

    def open(self) -> Resumed:
        """The saved state when it belongs to this digest; otherwise clear the folder and start afresh."""
        meta = self._meta()
        if meta is None:
            self._clear("no checkpoint")
            return Resumed(None, "no checkpoint")
        if meta.get("version") != FORMAT_VERSION or meta.get("digest") != self.digest:
            reason = "the job's inputs or parameters changed since its checkpoint; started afresh"
            self._clear(reason)
            return Resumed(None, reason)
        state = self._load_state()
        if state is None or state.clips_done != meta.get("clips_done"):
            reason = "the checkpoint was incomplete; started afresh"
            self._clear(reason)
            return Resumed(None, reason)
        self.sink.keep(state.clips_done)
        return Resumed(state, f"resumed after clip {state.clips_done}")

    def save(self, state: ClipState) -> None:
        """Write `state` (after its clip's segment is complete): state.pt, then meta.json, each atomically."""
        start = time.perf_counter()
        payload = {
            "clips_done": state.clips_done,
            "seed": state.seed,
            "rng": state.rng.cpu(),
            "motion": None if state.motion is None else state.motion.cpu(),
            "conditioner": {k: v.cpu() for k, v in state.conditioner.items()},
        }
        _atomic_write(self.folder / "state.pt", lambda path: torch.save(payload, path))
        meta = {
            "version": FORMAT_VERSION,
            "digest": self.digest,
            "clips_done": state.clips_done,
            "frames_done": self.sink.frames_written,
            "seed": state.seed,
            "updated_at": time.time(),
        }
        _atomic_write(self.folder / "meta.json", lambda path: path.write_text(json.dumps(meta)))
        self.save_s += time.perf_counter() - start
        self.saved_bytes = (self.folder / "state.pt").stat().st_size

    def remove(self) -> None:
        """Delete the whole checkpoint (the job has succeeded) and give up its lock."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock is not None:
            Path(self._lock.name).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def _meta(self) -> dict[str, object] | None:
        try:
            return json.loads((self.folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def _load_state(self) -> ClipState | None:
        try:
            raw = torch.load(self.folder / "state.pt", map_location="cpu", weights_only=True)
        except Exception as exc:  # torch cannot read it back (cut short; any unpickler error): no state
            logger.warning("checkpoint %s: state unreadable (%s: %s)", self.folder, type(exc).__name__, exc)
            return None
        return ClipState(raw["clips_done"], raw["seed"], raw["rng"], raw["motion"], raw["conditioner"])

    def _clear(self, reason: str) -> None:
        if any(self.folder.iterdir()):
            logger.info("checkpoint %s: %s", self.folder, reason)
        for child in self.folder.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        self.sink = ClipSegments(self.folder / "segments", self.sink.crf)


def claim(folder: Path, digest: str, crf: int = VIDEO_CRF) -> ClipCheckpoint | None:
    """The checkpoint in `folder` for this process alone, or None while another live process holds it (the
    same job running twice at once, e.g. two local `--test_input` runs). The claim is an exclusive flock on
    `<folder>.lock`, which the kernel drops when the process ends however it ends, so a killed worker's
    checkpoint is free for the retry."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    handle = open(folder.with_name(folder.name + ".lock"), "ab")  # noqa: SIM115 (held until remove)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return ClipCheckpoint(folder, digest, crf, lock=handle)


def expire_checkpoints(root: Path, ttl_s: float, now: float | None = None) -> list[Path]:
    """Remove the checkpoint folders under `root` not updated for `ttl_s` seconds; returns them."""
    now = time.time() if now is None else now
    removed = []
    for folder in root.iterdir() if root.is_dir() else []:
        if not folder.is_dir():  # a claim's lock file
            continue
        meta = folder / "meta.json"
        updated = meta.stat().st_mtime if meta.exists() else folder.stat().st_mtime
        if now - updated > ttl_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
