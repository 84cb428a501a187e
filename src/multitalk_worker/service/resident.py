"""The resident pipeline: loaded once per worker, kept, and switched between the resident adapters
(residency.py holds the adapters' state and counters). Also the engine options read from the settings, the
one place that turns MULTITALK_ENGINE/_FP8/_OFFLOAD/_LORAS into the pipeline's options."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitalk_worker.config import Settings
from multitalk_worker.errors import InvalidInput, ModelLoadFailed, ModelMissing, OutOfMemory, WorkerError
from multitalk_worker.registry import get_model, pipeline_class
from multitalk_worker.residency import (
    AdapterSet,
    adapter_model,
    check_swappable,
    first_adapter,
    load_adapter_set,
    resident_adapters,
)
from multitalk_worker.startup import resolve_device

if TYPE_CHECKING:
    import torch

    from multitalk_worker.models.sequence_parallel import SequenceParallel
    from multitalk_worker.pipeline.engine import EngineOptions

logger = logging.getLogger(__name__)


def engine_from_settings(settings: Settings) -> EngineOptions:
    """MULTITALK_ENGINE, _FP8, _OFFLOAD and _LORAS as the pipeline's engine options."""
    from multitalk_worker.pipeline.engine import engine_options, parse_lora_arg

    entries = [item.strip() for item in (settings.loras or "").split(",") if item.strip()]
    loras = tuple(map(parse_lora_arg, entries))
    return engine_options(settings.engine, fp8=settings.fp8, loras=loras, offload=settings.offload)


def lora_targets(engine: EngineOptions) -> list[str]:
    """The DiT parameters the configured LoRAs change (their headers' keys, parsed)."""
    if not engine.loras:
        return []
    from safetensors.torch import load_file

    from multitalk_worker.weights.lora import parse_lora

    targets = []
    for lora in engine.loras:
        if lora.path.is_file():  # a missing file fails the merge, with its own message
            updates, _ = parse_lora(load_file(str(lora.path)), file=lora.path.name)
            targets += [u.target for u in updates]
    return targets


class PipelineHolder:
    """Loads the pipeline once per worker and keeps it resident.

    `device` and `sequence_parallel`: this process's device and group under torchrun (parallel_worker.py);
    None: MULTITALK_DEVICE, one process."""

    def __init__(
        self,
        settings: Settings,
        device: torch.device | None = None,
        sequence_parallel: SequenceParallel | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.sequence_parallel = sequence_parallel
        self.pipeline: Any = None
        self.adapters: AdapterSet | None = None
        self.load_s = 0.0
        self.jobs_served = 0

    def load(self) -> None:
        if self.pipeline is not None:
            return
        import torch

        from multitalk_worker.pipeline.pipeline import TalkingVideoPipeline

        weights = self.settings.weights
        if not self.settings.tiny_model and not Path(weights).is_dir():
            raise ModelMissing(
                f"weights folder {weights} does not exist; download the weights (docs/deploy.md) "
                "or set MULTITALK_WEIGHTS=tiny for the built-in test model"
            )
        start = time.monotonic()
        spec = get_model(self.settings.default_model)
        try:
            engine = engine_from_settings(self.settings)
            if not spec.adapters:  # a model family with its own pipeline and no adapters (LongCat)
                self.pipeline = pipeline_class(spec.name).from_pretrained(
                    weights,
                    device=self.device or resolve_device(self.settings.device),
                    model=spec.name,
                    engine=engine,
                    sequence_parallel=self.sequence_parallel,
                )
                self.load_s = time.monotonic() - start
                return
            first = first_adapter(self.settings)
            check_swappable(
                adapters=len(resident_adapters(self.settings)),
                fp8=engine.fp8,
                lora_targets=lora_targets(engine),
            )
            self.pipeline = TalkingVideoPipeline.from_pretrained(
                weights,
                device=self.device or resolve_device(self.settings.device),
                sequence_parallel=self.sequence_parallel,
                engine=engine,
                model=adapter_model(first.name)[0],
                adapter=first.name,
            )
            bundle = self.pipeline.bundle
            self.adapters = load_adapter_set(
                weights, self.settings.adapters, bundle.config, bundle.dit.dtype, bundle.adapter
            )
        except WorkerError:
            raise
        except torch.OutOfMemoryError:
            raise OutOfMemory(
                "GPU out of memory while loading the model; use a bigger GPU", stage="load"
            ) from None
        except Exception as exc:
            raise ModelLoadFailed(f"loading {weights} failed: {type(exc).__name__}: {exc}") from exc
        self.load_s = time.monotonic() - start
        logger.info("pipeline loaded from %s in %.1f s", weights, self.load_s)

    def use(self, model: str, adapter: str) -> float:
        """Make the resident pipeline serve `model`/`adapter` (loading it first if needed): the seconds the
        adapter copy took, 0.0 when the DiT already holds it. InvalidInput when it is not resident."""
        self.load()
        if self.adapters is None:  # a pipeline without adapters serves its one model
            if model != self.pipeline.bundle.model:
                raise InvalidInput(
                    f"this worker serves model {self.pipeline.bundle.model}; the job asks for {model}"
                )
            return 0.0
        wanted = self.adapters.get(model, adapter)
        if self.adapters.current == adapter:
            return 0.0
        seconds = float(self.pipeline.use_adapter(model, adapter, wanted.state))
        logger.info("adapter %s -> %s/%s in %.3f s", self.adapters.current, model, adapter, seconds)
        self.adapters.current = adapter
        self.adapters.swaps += 1
        return seconds

    def get(self) -> tuple[Any, float, bool]:
        """(pipeline, its load time in s, whether this is the first job it serves)."""
        self.load()
        cold = self.jobs_served == 0
        self.jobs_served += 1
        return self.pipeline, self.load_s, cold

    def release_gpu_memory(self) -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
