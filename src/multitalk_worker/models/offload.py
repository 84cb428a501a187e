"""Low-memory mode: a stack of blocks lives in (pinned) host memory and visits the GPU one block at a time.

While block i runs, block i+1 is copied to the GPU on a side stream; after block i has run its GPU copy
is dropped, so about two blocks are resident instead of all of them. Weights never change while
offloaded, so nothing is copied back. Written here rather than with diffusers' group offloading because
that traces its prefetch order through the top-level module's `forward`, which our sampling loop does
not call (it runs `embed`, the block stack and `project_out` separately, so TeaCache can skip the stack).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TypeVar, cast

import torch
from torch import nn

logger = logging.getLogger(__name__)


class BlockOffload:
    """Hooks on each module of `blocks` that bring its weights to `device` just in time.

    The modules must run in list order (the next one is prefetched, wrapping around to the first).
    On CUDA the host copies are pinned and the copies overlap the previous block's compute; on other
    devices the copies are plain and synchronous (this is what the CPU tests exercise).
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device) -> None:
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.host: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per block: (tensor, host copy)
        self.buffers: list[torch.Tensor] = []  # one per block; page-locked while they live
        for block in self.blocks:
            tensors = [*block.parameters(), *block.buffers()]
            buffer, copies = host_copies(tensors, pin=self.stream is not None)
            self.buffers.append(buffer)
            for tensor, host in zip(tensors, copies, strict=True):
                tensor.data = host
            self.host.append(list(zip(tensors, copies, strict=True)))
        self.ready: dict[int, torch.Event | None] = {}  # block index -> its copy's completion event
        self.index = {id(block): i for i, block in enumerate(self.blocks)}
        for block in self.blocks:  # outside any compiled graph: copies, streams and events stay eager
            block.register_forward_pre_hook(_eager(self._before))
            block.register_forward_hook(_eager(self._after))
        logger.info(
            "offloading %d blocks (%.2f GiB) to host memory; they run on %s",
            len(self.blocks),
            self.host_bytes() / 2**30,
            self.device,
        )

    def host_bytes(self) -> int:
        return sum(host.numel() * host.element_size() for pairs in self.host for _, host in pairs)

    def sync_host(self) -> None:
        """After the blocks' parameters were written in place (an adapter swap), make the host copies
        of blocks now on the device hold the same values (the host copy is what the next visit reads)."""
        for pairs in self.host:
            for tensor, host in pairs:
                if tensor.data.data_ptr() != host.data_ptr():
                    host.copy_(tensor.data)

    def resident(self) -> list[int]:
        """Indices of the blocks whose weights are on the device now."""
        return sorted(self.ready)

    def _load(self, index: int) -> None:
        if index in self.ready:
            return
        if self.stream is None:
            for tensor, host in self.host[index]:
                tensor.data = host.to(self.device, copy=True)
            self.ready[index] = None
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # host copies stay valid
        with torch.cuda.stream(self.stream):
            for tensor, host in self.host[index]:
                tensor.data = host.to(self.device, non_blocking=True)
            self.ready[index] = self.stream.record_event()

    def _before(self, module: nn.Module, args: object) -> None:
        index = self.index[id(module)]
        self._load(index)
        event = self.ready[index]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for tensor, _ in self.host[index]:  # memory made on the side stream, used on this one
                tensor.data.record_stream(compute)
        self._load((index + 1) % len(self.blocks))

    def _after(self, module: nn.Module, args: object, output: object) -> None:
        index = self.index[id(module)]
        for tensor, host in self.host[index]:
            tensor.data = host
        del self.ready[index]


def host_copies(tensors: list[torch.Tensor], *, pin: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One host buffer and copies of `tensors` as views of it, page-locked in place when `pin` (one
    cudaHostRegister of the exact size: PyTorch's pinned allocator rounds every request up to a power of
    two; pinning tensor by tensor made the offload of the 14B model's 43 GiB take 89 s, this 27 s)."""
    sizes = [tensor.numel() * tensor.element_size() for tensor in tensors]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + -(-size // _ALIGN) * _ALIGN)
    buffer = torch.empty(offsets[-1], dtype=torch.uint8)
    if pin:
        _register(buffer)
    copies = []
    for tensor, offset, size in zip(tensors, offsets, sizes, strict=False):
        host = buffer[offset : offset + size].view(tensor.dtype).view(tensor.shape)
        host.copy_(tensor.data)
        copies.append(host)
    return buffer, copies


_Hook = TypeVar("_Hook", bound=Callable[..., None])


def _eager(hook: _Hook) -> _Hook:
    """`hook` run outside any compiled graph (torch.compiler.disable, whose return type is not annotated)."""
    return cast(_Hook, torch.compiler.disable(hook))


_ALIGN = 64  # bytes: every view starts aligned for any dtype and for vectorised copies


def _register(buffer: torch.Tensor) -> None:
    """Page-lock `buffer` for asynchronous copies; unregistered when the buffer object is collected
    (keep it: views of it do not keep the registration alive)."""
    cudart = torch.cuda.cudart()
    if cudart is None:
        raise RuntimeError("page-locking host memory needs the CUDA runtime, which torch did not load")
    pointer = buffer.data_ptr()
    error = int(cudart.cudaHostRegister(pointer, buffer.numel(), 0))
    if error != 0:
        raise RuntimeError(f"cudaHostRegister of {buffer.numel() / 2**30:.2f} GiB failed: cudaError {error}")
    weakref.finalize(buffer, cudart.cudaHostUnregister, pointer)
