"""Several processes for one video: torchrun's place of this process, and the process group over them.

Shared by the CLI and the RunPod worker (both can run under `torchrun --nproc-per-node N`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from multitalk_worker.config import TORCHRUN_VARS, SettingsError, torchrun_vars
from multitalk_worker.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from multitalk_worker.models.sequence_parallel import SequenceParallel


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes torchrun started for one video."""

    rank: int
    world_size: int
    local_rank: int  # the rank among the processes of this machine
    local_world_size: int


def launch_from_env(environ: Mapping[str, str]) -> Launch | None:
    """This process's place as torchrun describes it (config.torchrun_vars reads the variables, for the
    worker's Settings too); None for a single process (WORLD_SIZE unset or 1)."""
    try:
        values = torchrun_vars(environ)
    except SettingsError as exc:
        raise InvalidInput(
            f"{exc}: several processes need the integers {', '.join(TORCHRUN_VARS)} as torchrun sets them; "
            "start them with torchrun"
        ) from None
    if values["world_size"] <= 1:
        return None
    return Launch(**values)


@contextmanager
def process_group(launch: Launch, device: str | None) -> Iterator[tuple[torch.device, SequenceParallel]]:
    """The default process group over the torchrun processes (NCCL on cuda:LOCAL_RANK, else gloo on the
    CPU), destroyed on the way out, errors included. Yields (this process's device, the group's split)."""
    import torch
    import torch.distributed as dist

    from multitalk_worker.models.sequence_parallel import SequenceParallel

    if device not in (None, "cpu", "cuda"):
        raise InvalidInput(f"device {device} under torchrun: use cpu or cuda (cuda:LOCAL_RANK is taken)")
    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        here = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        if launch.local_world_size > torch.cuda.device_count():  # the same answer on every rank
            raise InvalidInput(
                f"{launch.local_world_size} processes on this machine need as many GPUs; "
                f"{torch.cuda.device_count()} visible (--nproc-per-node at most that, or --device cpu)"
            )
        here = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(here)
        dist.init_process_group("nccl", device_id=here)
    try:
        yield here, SequenceParallel.from_group(dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def exit_status(exc: SystemExit) -> int:
    """The exit status a SystemExit asks for, as the interpreter reads it (a message: said, then 1)."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    sys.stderr.write(f"{exc.code}\n")
    return 1


def end_process(status: int) -> NoReturn:
    """End a torchrun process with `status`, logs and output flushed, without interpreter finalization.

    Why: a gloo worker thread may still be releasing the tensors of a collective that has returned (the last
    job message); that needs the GIL, and a thread taking the GIL of a finalizing interpreter is ended in a
    way that aborts the process (SIGABRT, "terminate called without an active exception"; 7 of 46
    two-process worker runs on a 2-core machine). destroy_process_group() does not join gloo's threads.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
