"""The RunPod worker on several GPUs of one machine: every job's video made by all the processes.

Started by torchrun (`torchrun --nproc-per-node N -m multitalk_worker.worker`; docs/multi-gpu.md), each
process loads the whole model on `cuda:LOCAL_RANK` (gloo on CPUs). Rank 0 is the worker of worker.py: it
runs the runpod SDK's loop and does everything but the pipeline alone (fetch, validation, errors,
encoding, verification, delivery). For each job that reaches generation it broadcasts the
GenerationRequest (its files are in rank 0's scratch folder, on the same machine) and every rank calls the
same pipeline, whose DiT passes are split over the group. The other ranks (followers) loop: receive a
request, run the pipeline, discard the result; the stop message that rank 0 sends when it leaves the SDK
(also after `--test_input`) ends them.

Requests travel over a gloo group of their own with a long timeout, since a follower waits there between
jobs. The pipeline's collectives use the default group and its timeout (torch's default: 10 min for
NCCL, 30 min for gloo), which is what ends a rank left waiting in a collective:

* a failure every rank meets alike (a WorkerError: a request check, or a cancel, which is rank 0's word
  shared at each step) fails the job on rank 0 and the followers wait for the next one;
* any other exception on a follower ends that process; torchrun then stops the others, rank 0 included
  (a rank 0 waiting in a collective meanwhile errs at once on gloo, at the timeout on NCCL at worst);
* any other exception on rank 0 fails its job; the followers, left in a collective, fail at the timeout
  and end as above. Until then rank 0 refuses every job (the ranks are out of step).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from multitalk_worker.config import Settings
from multitalk_worker.distributed import Launch, exit_status, process_group
from multitalk_worker.errors import GenerationFailed, WorkerError
from multitalk_worker.pipeline.checkpoint import ClipCheckpoint
from multitalk_worker.pipeline.inputs import PreparedInputs
from multitalk_worker.pipeline.pipeline import DiscardFrames
from multitalk_worker.pipeline.request import (
    CancelCheck,
    FrameSink,
    GenerationRequest,
    GenerationResult,
    ProgressCallback,
)
from multitalk_worker.service.resident import PipelineHolder

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=365)  # how long a follower waits for the next job (a worker may idle for days)
Serve = Callable[[Settings, PipelineHolder], None]  # worker.serve: the runpod SDK loop on rank 0


class JobChannel:
    """Rank 0 to every rank: one GenerationRequest per job, None to stop (a gloo group of its own)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    @classmethod
    def create(cls) -> JobChannel:
        """Collective: every rank of the default group calls it."""
        group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        assert isinstance(group, dist.ProcessGroup)  # every rank is a member: never NON_GROUP_MEMBER
        return cls(group)

    def send(self, request: GenerationRequest | None) -> None:
        dist.broadcast_object_list([request], group=self.group, group_src=0)

    def receive(self) -> GenerationRequest | None:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]


class LeaderPipeline:
    """Rank 0's pipeline: sends each request to the followers, then runs it with them."""

    resumable = False  # every rank would need the clip loop's state: a sequence-parallel job starts afresh

    def __init__(self, pipeline: Any, channel: JobChannel) -> None:
        self.pipeline = pipeline
        self.channel = channel
        self.out_of_step: str | None = None  # the rank-0-only failure after which the ranks disagree

    def __call__(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        sink: FrameSink | None = None,
        inputs: PreparedInputs | None = None,
        checkpoint: ClipCheckpoint | None = None,
    ) -> GenerationResult:
        if checkpoint is not None:
            raise GenerationFailed(
                "a sequence-parallel job cannot resume from a checkpoint", stage="generate"
            )
        if self.out_of_step is not None:
            raise GenerationFailed(
                f"this worker's processes are out of step since a {self.out_of_step} on rank 0; "
                "it stops once the other ranks time out",
                stage="generate",
            )
        self.channel.send(request)
        logger.info("generating with %d processes", self.pipeline.sequence_parallel.world_size)
        try:
            return self.pipeline(request, progress=progress, cancel=cancel, sink=sink, inputs=inputs)
        except WorkerError:
            raise  # met alike by every rank: they are ready for the next job
        except Exception as exc:
            self.out_of_step = type(exc).__name__
            raise


class LeaderHolder(PipelineHolder):
    """PipelineHolder of rank 0: hands out the pipeline as a LeaderPipeline."""

    def __init__(self, holder: PipelineHolder, channel: JobChannel) -> None:
        super().__init__(holder.settings, holder.device, holder.sequence_parallel)
        self.channel = channel
        self.leader: LeaderPipeline | None = None

    def get(self) -> tuple[Any, float, bool]:
        pipeline, load_s, cold = super().get()
        if self.leader is None:
            self.leader = LeaderPipeline(pipeline, self.channel)
        return self.leader, load_s, cold


def follow(holder: PipelineHolder, channel: JobChannel) -> None:
    """A follower's loop: load, then run each request rank 0 sends until it sends the stop message."""
    holder.load()
    while (request := channel.receive()) is not None:
        try:
            if request.adapter is not None:  # rank 0 swapped its adapter before sending the request
                holder.use(request.model, request.adapter)
            # rank 0 keeps the result and the frames; the cancel decision comes from rank 0
            holder.get()[0](request, sink=DiscardFrames())
        except WorkerError as exc:  # rank 0 fails the job the same way
            logger.info("job failed alike on every rank: %s", exc.code)
    logger.info("stop message from rank 0")


def launch_of(settings: Settings) -> Launch:
    return Launch(settings.rank, settings.world_size, settings.local_rank, settings.local_world_size)


def run_parallel(settings: Settings, serve: Serve) -> int:
    """Serve RunPod with every torchrun process: rank 0 runs `serve`, the others follow. Exit status."""
    device = None if settings.device == "auto" else settings.device
    status = 0
    try:
        with process_group(launch_of(settings), device) as (here, parallel):
            channel = JobChannel.create()
            holder = PipelineHolder(settings, here, parallel)
            if parallel.rank != 0:
                follow(holder, channel)
                return 0
            try:
                serve(settings, LeaderHolder(holder, channel))
            except SystemExit as exc:  # how the SDK's loop ends (its --test_input mode: always)
                status = exit_status(exc)
            finally:
                channel.send(None)
    except WorkerError as exc:  # bad device settings, or a follower's model that does not load
        sys.stderr.write(f"multitalk-worker: rank {settings.rank}: {exc.code}: {exc.message}\n")
        return 2
    return status
