"""Exceptions become typed errors here, and only here: `error_for` maps any exception to one WorkerError
and says whether the worker must be refreshed (its GPU state is suspect).

Faults are told apart by their type, never by their message: `torch.OutOfMemoryError` (also spelled
`torch.cuda.OutOfMemoryError`), `torch.AcceleratorError` (what torch raises for a CUDA error: an illegal
memory access, a launch failure, a device-side assert), `torch.distributed.DistBackendError` (an NCCL
failure), `MemoryError` (host memory). Any other exception is an internal error of this job, reported as
such, and the worker serves the next job without a refresh.
"""

from __future__ import annotations

import torch
from torch.distributed import DistBackendError

from multitalk_worker.errors import GenerationFailed, InputTooLarge, OutOfMemory, WorkerError

INPUT_STAGES = ("validate", "fetch")  # before the model: what goes wrong here comes from the job's inputs
DEVICE_FAULTS: tuple[type[BaseException], ...] = (torch.AcceleratorError, DistBackendError)


def error_for(exc: Exception, stage: str) -> tuple[WorkerError, bool]:
    """Map any exception to one typed error, and whether the worker must be refreshed (GPU state suspect)."""
    if isinstance(exc, WorkerError):
        return exc, isinstance(exc, OutOfMemory)
    if isinstance(exc, torch.OutOfMemoryError):
        message = f"GPU out of memory during {stage}; try a lower resolution, a shorter video or a bigger GPU"
        return OutOfMemory(message, stage=stage), True
    if isinstance(exc, MemoryError) and stage in INPUT_STAGES:  # the inputs' own cost: a retry fails again
        message = f"the inputs need more host memory than this worker has (during {stage}); send smaller ones"
        return InputTooLarge(message, stage=stage), False
    if isinstance(exc, MemoryError):
        return OutOfMemory(f"host memory exhausted during {stage}", stage=stage), True
    if isinstance(exc, DEVICE_FAULTS):
        name = type(exc).__name__
        return GenerationFailed(
            f"GPU fault ({name}) during {stage}; the worker will be replaced", stage=stage
        ), True
    return GenerationFailed(
        f"internal error ({type(exc).__name__}) during {stage}; see the worker log", stage=stage
    ), False
