"""Paths on the volume (MULTITALK_VOLUME_ROOT): name lengths, and an output's destination checked before
generation."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from multitalk_worker.config import Settings
from multitalk_worker.errors import InvalidInput, UploadFailed


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
