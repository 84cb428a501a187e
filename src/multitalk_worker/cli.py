"""`multitalk-worker` command line: `generate` makes one mp4; `weights` inspects and downloads model folders;
`schema` prints the job input's JSON Schema (the wire contract of docs/api.md).

`generate` reports each stage on stderr (load, audio, image, text, sampling with clip i/n and step s/S,
decode, encode) with an ETA that counts the decode (progress.py); `-v` adds our INFO logs and the model
libraries' load reports, which are quiet otherwise.

Bad inputs end with exit status 1 and one line on stderr (`error [CODE]: message`), never a traceback:
`main` is the one place where WorkerError becomes a message.

Under torchrun (WORLD_SIZE > 1) `generate` makes one video with all the processes (docs/multi-gpu.md):
each runs the same request and seed with the DiT passes split over the group (NCCL, one GPU per process,
or gloo on CPUs); rank 0 alone prints, shows progress and writes the mp4. There the first SIGINT or
SIGTERM (torchrun forwards them to every process) cancels at the next step on rank 0's word, so that
the processes stop together; a second one interrupts at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from tqdm import tqdm

import multitalk_worker
from multitalk_worker.config import VIDEO_CRF, Settings, SettingsError
from multitalk_worker.distributed import Launch, end_process, launch_from_env, process_group
from multitalk_worker.errors import InvalidInput, WorkerError
from multitalk_worker.logs import quiet_model_libraries
from multitalk_worker.pipeline.presets import PRESETS
from multitalk_worker.pipeline.request import ACCEPTED_IMAGES, DEFAULT_BACKGROUND, IMAGE_ORIENTATIONS
from multitalk_worker.progress import Progress, ProgressTracker, Snapshot
from multitalk_worker.registry import DEFAULT_MODEL, MODELS, get_model, pipeline_class

if TYPE_CHECKING:
    import torch

    from multitalk_worker.models.sequence_parallel import SequenceParallel
    from multitalk_worker.pipeline.request import GenerationRequest, Region

logger = logging.getLogger(__name__)

TINY_NOTE = (
    "note: --weights tiny is a tiny model with random weights; its video proves the plumbing "
    "(audio, image, sampling, encoding), not the quality"
)


def parse_region(text: str) -> Region:
    """`left`, `right`, `full` or `x0,y0,x1,y1` (fractions of the image, x to the right, y down)."""
    if text in ("left", "right", "full"):
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise InvalidInput(f"--region {text!r} is not accepted; use left, right, full or x0,y0,x1,y1 in 0..1")
    return values


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser(
        "generate", help="make a talking video (mp4) from an image, or dub a video, with speech"
    )
    gen.add_argument(
        "--model",
        choices=sorted(MODELS),
        default=DEFAULT_MODEL,
        help="multitalk (image to video) or infinitetalk (image to video of any length, or dubbing a video)",
    )
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help=f"reference image ({ACCEPTED_IMAGES})")
    source.add_argument(
        "--video", type=Path, help="video to dub to the speech (--model infinitetalk; any container/codec)"
    )
    gen.add_argument(
        "--adapter",
        default=None,
        help="audio adapter of the model (infinitetalk: single or multi; default: by the number of speakers)",
    )
    gen.add_argument(
        "--source-fps",
        choices=("resample", "reference"),
        default=None,
        help="video sources: resample to 25 fps by timestamp (default), or read frame n as output frame n "
        "as the reference does (right for 25 fps sources only)",
    )
    gen.add_argument(
        "--color-reference",
        choices=("first", "clip"),
        default=None,
        help="infinitetalk: correct colours towards the source's first frame (the reference) or each "
        "clip's own reference frame (sources whose colours change, e.g. several shots)",
    )
    gen.add_argument(
        "--image-orientation",
        choices=IMAGE_ORIENTATIONS,
        help="--image: exif (as a viewer shows it, EXIF Orientation applied; default) or stored (the stored "
        "pixels, EXIF ignored, as the reference does)",
    )
    gen.add_argument(
        "--image-background",
        metavar="#RRGGBB",
        help=f"--image: the colour transparent pixels are put on (default {DEFAULT_BACKGROUND}, white)",
    )
    gen.add_argument(
        "--audio", type=Path, action="append", required=True, help="speech of one speaker (repeat for two)"
    )
    gen.add_argument(
        "--audio-mode",
        choices=("parallel", "sequential"),
        default="parallel",
        help="two speakers: parallel (both tracks at once; a shorter track ends in silence) or "
        "sequential (the first speaker, then the second)",
    )
    gen.add_argument(
        "--region",
        action="append",
        default=None,
        help="per speaker, in --audio order: left, right, full or x0,y0,x1,y1 "
        "(fractions of the image, x to the right, y down); default: left and right halves",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None, help="default: the reference's negative prompt")
    gen.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="sampling recipe (default: the model's, registry.py): default (40 steps), or fusionx (8) / "
        "lightx2v (4) / fast (4), the recipes of the distillation LoRAs of those names, which need that LoRA "
        "merged (--lora) for good results; longcat-distill / longcat-1.5 / longcat-1.0 for LongCat",
    )
    gen.add_argument("--steps", type=int, default=None, help="denoising steps per clip (default: preset)")
    gen.add_argument("--text-guidance", type=float, default=None)
    gen.add_argument("--audio-guidance", type=float, default=None)
    gen.add_argument("--shift", type=float, default=None)
    gen.add_argument(
        "--seed",
        type=int,
        default=42,
        help="noise seed (default 42, so that a run repeats; the API draws one when a job names none); "
        "negative: a random seed, printed",
    )
    gen.add_argument("--teacache", type=float, default=None, metavar="THRESH", help="TeaCache threshold")
    gen.add_argument("--apg", action="store_true", help="adaptive projected guidance")
    gen.add_argument("--color-correction", type=float, default=None, help="strength 0..1 (default 1)")
    gen.add_argument(
        "--resolution",
        choices=("480p", "720p", "tiny"),
        default=None,
        help="bucket family (default: tiny for --weights tiny, else 480p)",
    )
    gen.add_argument("--max-duration", type=float, default=None, metavar="S", help="cap on the video length")
    gen.add_argument(
        "--segment-length",
        choices=("audio", "whole_segments"),
        default=None,
        help="LongCat-Video-Avatar: trim the video to the audio (default), or keep the reference's whole "
        "93 + 80*(S-1) frames",
    )
    gen.add_argument(
        "--vocal-separation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LongCat-Video-Avatar: drive the model with the separated vocals (default: when the model "
        "folder has vocal_separator/Kim_Vocal_2.onnx)",
    )
    gen.add_argument("--weights", required=True, help="model folder, or 'tiny' for the built-in tiny model")
    gen.add_argument(
        "--device",
        default=None,
        help="cpu or cuda (default: cuda when available); under torchrun each process uses cuda:LOCAL_RANK",
    )
    gen.add_argument(
        "--engine",
        choices=("reference", "fast"),
        default="reference",
        help="reference: the reference's numerics; fast: the single-GPU fast path (bench/RESULTS.md)",
    )
    gen.add_argument("--fp8", action="store_true", help="float8 DiT linears (Hopper GPUs; lower quality)")
    gen.add_argument(
        "--offload",
        action="store_true",
        help="low-memory mode: DiT and umT5 blocks stay in host memory (24 GB GPUs; ~50 GB host RAM)",
    )
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[=SCALE]",
        help="merge a LoRA (reference key format) into the DiT at load; repeatable; scale default 1.0",
    )
    gen.add_argument("--out", type=Path, required=True, help="output .mp4 path")
    gen.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON object: the mp4's path, the seed and every parameter as used "
        "(the API result's `resolved`)",
    )
    gen.add_argument(
        "--crf",
        type=int,
        default=VIDEO_CRF,
        choices=range(52),
        metavar="0-51",
        help=f"H.264 quality: 0 lossless, {VIDEO_CRF} default (the reference's final encode), 51 smallest",
    )
    gen.set_defaults(func=run_generate)


# wire fields (the API's names) as the CLI's flags, for messages; see cli_message
FIELD_FLAGS = {
    "max_duration_s": "--max-duration",
    "segment_length": "--segment-length",
    "vocal_separation": "--vocal-separation",
    "negative_prompt": "--negative-prompt",
    "audio_mode": "--audio-mode",
    "source_fps": "--source-fps",
    "color_reference": "--color-reference",
    "advanced.steps": "--steps",
    "advanced.text_guidance": "--text-guidance",
    "advanced.audio_guidance": "--audio-guidance",
    "advanced.shift": "--shift",
    "advanced.seed": "--seed",
    "advanced.teacache_threshold": "--teacache",
    "advanced.color_correction": "--color-correction",
    "advanced.apg": "--apg",
}
_SPEAKER_FIELD = re.compile(r"\bspeakers(?:\[\d+\]|\.\d+)?\.(audio|region)\b|(?:^|(?<=; ))speakers(?=:)")
_PLAIN_FIELD = re.compile(r"(^|; )(prompt|resolution|preset|model|adapter|image|video):")


def cli_message(message: str) -> str:
    """A message of the job contract with its field names as this CLI's flags (`max_duration_s` ->
    `--max-duration`); the API's messages keep the field names."""
    for field, flag in FIELD_FLAGS.items():
        message = re.sub(rf"\b{re.escape(field)}\b", flag, message)
    message = _SPEAKER_FIELD.sub(lambda m: f"--{m.group(1) or 'audio'}", message)
    return _PLAIN_FIELD.sub(lambda m: f"{m.group(1)}--{m.group(2)}:", message)


def cli_settings(args: argparse.Namespace) -> Settings:
    """The flags that configure a worker, as the worker's settings: the same limits and engine set-up."""
    env = {
        "MULTITALK_WEIGHTS": args.weights,
        "MULTITALK_MODEL": args.model,
        "MULTITALK_MAX_RESOLUTION": "720p",
        "MULTITALK_DEVICE": args.device or "auto",
        "MULTITALK_ENGINE": args.engine,
        "MULTITALK_FP8": "true" if args.fp8 else "false",
        "MULTITALK_OFFLOAD": "true" if args.offload else "false",
        "MULTITALK_LORAS": ",".join(args.lora),
        "MULTITALK_VIDEO_CRF": str(args.crf),
    }
    try:
        return Settings.from_env(env)
    except SettingsError as exc:
        raise InvalidInput(str(exc)) from None


def wire_input(args: argparse.Namespace) -> dict[str, object]:
    """The job's wire input (docs/api.md) from the flags: the CLI, the worker and the local API parse the
    same input with the same limits (schema.parse_job_input). Paths stay paths on this machine."""
    regions: list[Region | None] = (
        [parse_region(r) for r in args.region] if args.region else [None] * len(args.audio)
    )
    if len(regions) != len(args.audio):
        raise InvalidInput(
            f"{len(regions)} --region given for {len(args.audio)} --audio; give one per speaker"
        )
    speakers = [
        {"audio": str(audio)} | ({} if region is None else {"region": _wire_region(region)})
        for audio, region in zip(args.audio, regions, strict=True)
    ]
    advanced = {
        "steps": args.steps,
        "text_guidance": args.text_guidance,
        "audio_guidance": args.audio_guidance,
        "shift": args.shift,
        "seed": args.seed if args.seed >= 0 else None,  # negative: the pipeline draws one
        "teacache_threshold": args.teacache,
        "apg": True if args.apg else None,
        "color_correction": args.color_correction,
    }
    raw = {
        "model": args.model,
        "adapter": args.adapter,
        "image": None if args.image is None else str(args.image),
        "video": None if args.video is None else str(args.video),
        "source_fps": args.source_fps,
        "color_reference": args.color_reference,
        "image_orientation": args.image_orientation,
        "image_background": args.image_background,
        "speakers": speakers,
        "audio_mode": args.audio_mode,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "resolution": args.resolution,
        "max_duration_s": args.max_duration,
        "preset": args.preset,
        "segment_length": args.segment_length,
        "vocal_separation": args.vocal_separation,
        "advanced": {k: v for k, v in advanced.items() if v is not None},
    }
    return {k: v for k, v in raw.items() if v is not None}


def _wire_region(region: Region) -> object:
    return list(region) if isinstance(region, tuple) else region


def build_request(args: argparse.Namespace, settings: Settings) -> GenerationRequest:
    """The flags' job, parsed as every door parses it, as the pipeline's request (service/request.py)."""
    from multitalk_worker.schema import GenerateInput, JobLimits, parse_job_input
    from multitalk_worker.service.request import build_request as request_for

    for path in [args.image, args.video, *args.audio]:
        if path is not None and not Path(path).is_file():
            flag = "--image" if path == args.image else "--video" if path == args.video else "--audio"
            raise InvalidInput(f"{flag} {path}: no such file")
    parsed = parse_job_input(wire_input(args), JobLimits.from_settings(settings))
    assert isinstance(parsed, GenerateInput)  # the wire input has no action: a generate job
    return request_for(
        parsed,
        default_model=settings.default_model,
        image=args.image,
        video=args.video,
        audio=list(args.audio),
    )


STAGE_TEXT = {
    "audio": "audio: decode, loudness, wav2vec2 features",
    "image": "image: bucket crop and speaker masks",
    "text": "text: umT5 prompt encoding",
}


class StageReport:
    """One line per stage on stderr, and a bar of the job's percent with its clip, step and ETA: the
    snapshot of progress.ProgressTracker, as the RunPod updates and the local API show it."""

    def __init__(self, tracker: ProgressTracker | None = None) -> None:
        self.bar: tqdm | None = None
        self.tracker = tracker or ProgressTracker()
        self.started = time.perf_counter()
        self._last_stage: str | None = None

    def line(self, text: str) -> None:
        message = f"[{time.perf_counter() - self.started:6.1f} s] {text}"
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def __call__(self, event: Progress) -> None:
        snapshot = self.tracker.update(event)
        if event.stage in ("sample", "decode"):
            self._show(snapshot)
        if event.stage == "decode":
            self.line(f"decode: VAE, clip {event.chunk}/{event.chunks}")
        elif event.stage == "condition":
            self.line(
                f"condition: clip {event.chunk}/{event.chunks} (CLIP and VAE encoding of its known frames)"
            )
        elif event.stage != self._last_stage and event.stage != "sample":
            self.line(STAGE_TEXT.get(event.stage, event.stage))
        self._last_stage = event.stage

    def _show(self, snapshot: Snapshot) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=100,
                desc="progress",
                file=sys.stderr,
                bar_format="{desc}: {n:5.1f}%|{bar}| [{elapsed}{postfix}]",
            )
        if snapshot.eta_s == 0.0 and snapshot.percent == 100.0:
            eta = ", done"
        else:
            eta = "" if snapshot.eta_s is None else f", ETA {snapshot.eta_s:.0f} s with decode"
        self.bar.set_postfix_str(
            f"clip {snapshot.chunk}/{snapshot.chunks} step {snapshot.step}/{snapshot.steps}{eta}",
            refresh=False,
        )
        self.bar.update((snapshot.percent or 0.0) - self.bar.n)

    def finish(self) -> None:
        """The job's video is complete: the bar at 100 % with no time left, then closed."""
        if self.bar is not None:
            self._show(self.tracker.snapshot().finished())
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _StopOnSignal:
    """A cancel check: true after the first SIGINT or SIGTERM; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %d: stopping at the next step (again to interrupt at once)", signum)

    def __call__(self) -> bool:
        return self.requested


def run_generate(args: argparse.Namespace, launch: Launch | None = None) -> int:
    quiet_model_libraries(verbose=args.verbose)
    settings = cli_settings(args)
    request = build_request(args, settings)
    if not args.out.parent.is_dir():
        raise InvalidInput(f"--out: the folder {args.out.parent} does not exist")
    # before loading any weights: the model's pipeline class (registry entry) checks its own inputs
    pipeline_class(request.model).check_inputs(request, tiny_model=settings.tiny_sizes)
    lead = launch is None or launch.rank == 0
    if lead and args.preset is not None and PRESETS[args.preset].needs_lora:
        logger.warning(
            "preset %s is a distillation-LoRA recipe; without that LoRA expect low quality", args.preset
        )
    if lead and args.weights == "tiny":
        print(TINY_NOTE, file=sys.stderr if args.json else sys.stdout, flush=True)
    if launch is None:
        return _generate(args, settings, request, args.device, None)
    with process_group(launch, args.device) as (device, parallel):
        return _generate(args, settings, request, device, parallel)


def _generate(
    args: argparse.Namespace,
    settings: Settings,
    request: GenerationRequest,
    device: str | torch.device | None,
    parallel: SequenceParallel | None,
) -> int:
    """Load, generate, and (rank 0 or a single process) write the mp4 and say so."""
    from multitalk_worker.pipeline.pipeline import DiscardFrames
    from multitalk_worker.segments import ClipSegments
    from multitalk_worker.service.resident import engine_from_settings

    started = time.perf_counter()
    lead = parallel is None or parallel.rank == 0
    cancel = None if parallel is None else _StopOnSignal()  # consulted on rank 0 only (the pipeline)
    engine = engine_from_settings(settings)
    report = StageReport() if lead else None
    if report is not None:
        report.line(f"load: {args.weights} ({request.model}, {args.engine} engine)")
    spec = get_model(request.model)
    adapter = spec.adapter(request.adapter, persons=len(request.speakers)).name if spec.adapters else None
    pipeline = pipeline_class(request.model).from_pretrained(
        args.weights,
        device=device,
        sequence_parallel=parallel,
        engine=engine,
        model=request.model,
        adapter=adapter,
    )
    # frames are encoded as each clip is final (segments.py, as the worker does: the same bytes); the
    # other ranks of a group leave them to rank 0
    try:
        with tempfile.TemporaryDirectory(prefix=".multitalk-", dir=args.out.parent) as scratch:
            sink = ClipSegments(Path(scratch), settings.video_crf) if lead else DiscardFrames()
            result = pipeline(request, progress=report, cancel=cancel, sink=sink)
            if isinstance(sink, ClipSegments):
                sink.assemble(args.out)
        if report is not None:  # the video is complete: encoded and closed
            report.finish()
    finally:
        if report is not None:
            report.close()
    if report is None:
        return 0
    report.line(f"encode: H.264 + AAC into {args.out} (each clip as it was final)")
    if args.json:  # the pipeline's report, as the worker's result carries it under `resolved`
        print(json.dumps({"out": str(args.out), "seed": result.seed, "resolved": result.resolved}))
        return 0
    count, (height, width) = result.frame_count, result.size
    processes = "" if parallel is None else f", {parallel.world_size} processes"
    print(
        f"wrote {args.out}: {count} frames ({count / result.fps:.2f} s) at {width}x{height}, "
        f"{result.resolved['clips']} clip(s), model {request.model}"
        f"{'' if pipeline.bundle.adapter is None else f' (adapter {pipeline.bundle.adapter})'}, "
        f"seed {result.seed}{processes}, "
        f"{time.perf_counter() - started:.1f} s"
    )
    source = describe_source(result.resolved.get("source"))
    if source:
        print(source)
    return 0


def describe_source(report: object) -> str | None:
    """One line on how the source was read, where there is something to say: a video's length as it decodes;
    an image turned by its EXIF orientation or with transparent pixels put on a background."""
    if not isinstance(report, dict):
        return None
    if report.get("kind") == "video":
        return (
            f"source: {report['frames']} frames, {report['duration_s']:.2f} s as decoded "
            f"({report['fps']:g} fps, counted by {report['counted_by']})"
        )
    notes = []
    if report.get("rotated"):
        notes.append(
            f"turned by its EXIF orientation {report['exif_orientation']} (--image-orientation stored)"
        )
    if report.get("background"):
        notes.append(f"transparent pixels on {report['background']} (--image-background)")
    return f"source: image ({report.get('mode')}), " + ", ".join(notes) if notes else None


def build_parser() -> argparse.ArgumentParser:
    from multitalk_worker.weights import cli as weights_cli

    parser = argparse.ArgumentParser(
        prog="multitalk-worker", description="MultiTalk talking-video generation (Wan2.1-I2V-14B + MultiTalk)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log details to stderr (and the model libraries' reports)",
    )
    parser.add_argument(
        "--version", action="version", version=f"multitalk-worker {multitalk_worker.__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    weights_cli.register(commands)
    schema = commands.add_parser("schema", help="print the JSON Schema of a job's input (wire contract v1)")
    schema.set_defaults(func=run_schema)
    return parser


def run_schema(args: argparse.Namespace) -> int:
    from multitalk_worker.schema import job_input_json_schema

    print(json.dumps(job_input_json_schema(), indent=2))
    return 0


def _configure_logging(verbose: bool, launch: Launch | None) -> None:
    """stderr; under torchrun rank 0 logs as a single process would, the other ranks errors only."""
    prefix = "" if launch is None else f"[rank {launch.rank}] "
    quiet = launch is not None and launch.rank != 0
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING,
        format=prefix + "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # the runpod SDK, when imported, has installed a root handler of its own
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launch = None
    try:
        if args.func is run_generate:
            launch = launch_from_env(os.environ)
        _configure_logging(args.verbose, launch)
        status = int(args.func(args) if launch is None else args.func(args, launch))
    except WorkerError as exc:
        if launch is None or launch.rank == 0:  # the other ranks fail the same way on the same inputs
            print(f"error [{exc.code}]: {cli_message(exc.message)}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        if launch is None or launch.rank == 0:
            print("error: interrupted", file=sys.stderr)
        status = 130
    if launch is not None:
        end_process(status)  # under torchrun: see end_process
    return status


if __name__ == "__main__":
    sys.exit(main())
